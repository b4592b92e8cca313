"""Real CT (../shared/data): TotalSegmentator example through ``abd --label-map``, a JPEG-2000
DICOM series against its LAS label volume, and the release's TC crops through ``tc-import``."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from preprocessing import volumes
from preprocessing.__main__ import main
from preprocessing.layout import read_prepared
from tests._phantoms import SHARED_DATA

CT = SHARED_DATA / "ct"
EXAMPLE = CT / "totalseg_example"
DICOM = CT / "totalseg_dicom"
TC = SHARED_DATA / "tc_crops"

needs_example = pytest.mark.skipif(not (EXAMPLE / "example_ct.nii.gz").is_file(),
                                   reason=f"real CT example not found at {EXAMPLE} (../shared/data is absent)")
needs_dicom = pytest.mark.skipif(not (DICOM / "dicom").is_dir(),
                                 reason=f"real DICOM series not found at {DICOM} (../shared/data is absent)")
needs_tc = pytest.mark.skipif(not (TC / "labels.csv").is_file(),
                              reason=f"release TC crops not found at {TC} (../shared/data is absent)")


@needs_example
def test_totalseg_example_through_abd_label_map(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    labels.mkdir()
    # AbdomenCT-1K names, pointing at the shared files (never copied)
    os.symlink(EXAMPLE / "example_ct.nii.gz", images / "Case_00001_0000.nii.gz")
    os.symlink(EXAMPLE / "example_seg_fast_force_split.nii.gz", labels / "Case_00001.nii.gz")
    out = tmp_path / "abd"
    assert main(["abd", "--images", str(images), "--labels", str(labels), "--out", str(out), "--workers", "1",
                 "--label-map", "liver=5", "kidney=2", "spleen=1", "pancreas=7",
                 "--test-ratio", "0", "--val-ratio", "0"]) == 0
    seg = np.asarray(nib.load(str(EXAMPLE / "example_seg_fast_force_split.nii.gz")).dataobj)
    info = json.loads((out / "annotations" / "ABD_slices_info.json").read_text())
    assert len(info) == 112
    with_pancreas = [r["slice_index"] for r in info if r["pixels_pancreas"] > 0]
    assert with_pancreas == list(range(81, 100))  # exactly the axial slices where the label map has it (RAS)
    assert [r["pixels_pancreas"] for r in info] == (seg == 7).sum(axis=(0, 1)).tolist()
    r = info[90]
    assert (r["width"], r["height"]) == (122, 101)  # columns = R/L axis, rows = A/P axis
    livers = [r for r in info if r["pixels_liver"] > 0]
    assert len(livers) > 20
    assert all((r["bbox_liver"][0] + r["bbox_liver"][2]) / 2 < r["width"] / 2 for r in livers)
    kidneys = [r for r in info if r["pixels_kidney"] > 0]
    assert kidneys and all(r["bbox_kidney"][2] < r["width"] / 2 for r in kidneys)  # right kidney, image left
    # The PNG of a pancreas slice exists at the native size.
    with Image.open(out / info[90]["image"]) as im:
        assert im.size == (122, 101)
    recs = read_prepared(out, "organ_detection", "train")
    assert {x["target"] for x in recs} == {"liver", "kidney", "spleen", "pancreas"}


@needs_dicom
def test_jpeg2000_dicom_reads_to_hu_and_lines_up_with_las_label():
    vol = volumes.read_dicom_series(DICOM / "dicom")
    assert vol.array.shape == (512, 512, 20)
    assert vol.array.min() == -1024.0  # RescaleIntercept -1024 applied
    assert np.allclose(np.diag(vol.affine)[:3], [-0.9765625, -0.9765625, 2.0])  # 2 mm from positions, not SliceThickness
    lab_vol = volumes.load_nifti(DICOM / "example_seg_dicom.nii.gz")
    assert "".join(nib.aff2axcodes(lab_vol.affine)) == "LAS"
    label = volumes.align_label_to_image(volumes.label_array(lab_vol), lab_vol.affine, vol.array.shape,
                                         vol.affine, "label", "dicom")
    liver = label == 5
    hu = vol.array[liver]
    assert 40 < hu.mean() < 130 and np.mean(hu < -200) < 0.01  # soft tissue, no air: aligned
    assert vol.array[liver[:, ::-1]].mean() < 40  # the same label without the row flip would not fit
    assert np.nonzero((label == 7).any(axis=(0, 1)))[0].tolist() == [0, 1, 2, 3]


@needs_dicom
def test_dicom_series_through_nih(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    os.symlink(DICOM / "dicom", images / "PANCREAS_0001")
    os.symlink(DICOM / "example_seg_dicom.nii.gz", labels / "label0001.nii.gz")
    out = tmp_path / "nih"
    assert main(["nih", "--images", str(images), "--labels", str(labels), "--out", str(out), "--workers", "1",
                 "--label-map", "pancreas=7", "--test-ratio", "0", "--val-ratio", "0"]) == 0
    info = json.loads((out / "annotations" / "NIH_slices_info.json").read_text())
    assert [r["slice_index"] for r in info if r["image"]] == [0, 1, 2, 3]
    assert all(r["volume_name"] == "PANCREAS_0001" and (r["width"], r["height"]) == (512, 512) for r in info)


@needs_tc
def test_release_crops_through_tc_import(tmp_path):
    with open(TC / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    subset = [r for r in rows if r["dataset"] == "NIH"][:12] + [r for r in rows if r["dataset"] == "MSD"][:12]
    sub_csv = tmp_path / "subset.csv"
    with open(sub_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    out = tmp_path / "tc"
    assert main(["tc-import", "--images", str(TC / "images"), "--csv", str(sub_csv), "--out", str(out),
                 "--test-ratio", "0.5", "--val-ratio", "0"]) == 0
    recs = read_prepared(out, "tumor_classification", "train") + read_prepared(out, "tumor_classification", "test")
    assert len(recs) == 24
    by_image = {os.path.basename(r["image"]): r for r in recs}
    for row in subset:
        r = by_image[row["image"]]
        assert (r["width"], r["height"]) == (int(row["width"]), int(row["height"]))
        assert (r["answer"], r["dataset"]) == (row["answer"], row["dataset"])
        assert (r["answer"] == "yes") == row["image"].startswith("pancreas_")  # release naming: MSD = yes
