"""Orientation from the affine: display frame = anterior up, patient's right on the image left."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from preprocessing.__main__ import main
from preprocessing import volumes


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.mark.parametrize("codes, affine_diag, voxel", [
    # RAS: i grows toward the patient's right, j anterior → the marker at i=6 of 8, j=4 of 6 is one
    # column from the image's left edge (patient's right) and one row from the top (anterior).
    ("RAS", (1.0, 1.0, 2.0), (6, 4)),
    # LPS: i grows toward the patient's left, j posterior → the same anatomical point is i=1, j=1.
    ("LPS", (-1.0, -1.0, 2.0), (1, 1)),
])
def test_hand_made_volume_lands_in_display_frame(tmp_path, codes, affine_diag, voxel):
    label = np.zeros((8, 6, 3), dtype=np.uint8)
    label[voxel[0], voxel[1], 1] = 1
    affine = np.diag([*affine_diag, 1.0])
    assert "".join(nib.aff2axcodes(affine)) == codes
    disp = volumes.to_display(label, affine)
    assert disp.shape == (6, 8, 3)  # rows = A/P axis, cols = R/L axis
    assert np.argwhere(disp).tolist() == [[1, 1, 1]]


def test_inferior_stored_axis_keeps_its_order():
    label = np.zeros((4, 4, 5), dtype=np.uint8)
    label[0, 0, 1] = 1
    affine = np.diag([1.0, 1.0, -2.0, 1.0])  # RAI: slice 0 is the most superior
    assert np.argwhere(volumes.to_display(label, affine))[0][2] == 1


def _prepare(tmp_path: Path, orient: str, scheme="msd", extra=()) -> Path:
    syn = tmp_path / f"syn_{scheme}_{orient}"
    assert main(["synthetic", "--out", str(syn), "--scheme", scheme, "--n", "3", "--size", "64", "--slices", "12",
                 "--orient", orient, "--seed", "5"]) == 0
    out = tmp_path / f"out_{scheme}_{orient}"
    sub = {"msd": ("imagesTr", "labelsTr"), "abd": ("images", "masks"), "nih": ("images", "labels")}[scheme]
    assert main([scheme, "--images", str(syn / sub[0]), "--labels", str(syn / sub[1]), "--out", str(out),
                 "--workers", "1", "--threshold", "0.3", *extra]) == 0
    return out


def test_ras_lps_las_give_identical_pngs_and_json(tmp_path):
    outs = [_prepare(tmp_path, o) for o in ("RAS", "LPS", "LAS")]
    ref = outs[0]
    ref_pngs = sorted(p.name for p in (ref / "slices").iterdir())
    assert len(ref_pngs) > 10
    for out in outs[1:]:
        assert sorted(p.name for p in (out / "slices").iterdir()) == ref_pngs
        for name in ref_pngs:
            assert (out / "slices" / name).read_bytes() == (ref / "slices" / name).read_bytes(), name
        for name in ("MSD_slices_info.json", "MSD_train.json", "MSD_tumor_test.json", "split.json"):
            assert json.loads((out / "annotations" / name).read_text()) == json.loads((ref / "annotations" / name).read_text())


def test_liver_on_image_left_spine_at_bottom(tmp_path):
    out = _prepare(tmp_path, "LPS", scheme="abd", extra=["--normalization", "window"])
    info = json.loads((out / "annotations" / "ABD_slices_info.json").read_text())
    livers = [r for r in info if r["pixels_liver"] > 0]
    assert livers
    for r in livers:
        x1, _, x2, _ = r["bbox_liver"]
        assert (x1 + x2) / 2 < r["width"] / 2  # patient's right = image left
    kidneys = [r for r in info if r["pixels_kidney"] > 0]
    assert kidneys and all(r["bbox_kidney"][2] < r["width"] / 2 for r in kidneys)  # right kidney only
    spleens = [r for r in info if r["pixels_spleen"] > 0]
    assert spleens and all(r["bbox_spleen"][0] > r["width"] / 2 for r in spleens)
    # Vertebra (650 HU → 255 in the window) on the midline in the lower (posterior) half.
    rec = livers[0]
    png = np.asarray(Image.open(out / rec["image"]))
    h, w = png.shape
    mid = png[:, w // 2 - 1: w // 2 + 2].mean(axis=1)
    assert np.argmax(mid) > h * 0.6
    # Pancreas (anterior to the spine): box centre above the vertebra.
    pan = [r for r in info if r["pixels_pancreas"] > 0]
    assert all((r["bbox_pancreas"][1] + r["bbox_pancreas"][3]) / 2 < h * 0.7 for r in pan)


def test_dicom_and_nifti_nih_give_identical_output(tmp_path):
    dicom = _prepare(tmp_path, "LAS", scheme="nih")
    syn = tmp_path / "syn_nifti"
    assert main(["synthetic", "--out", str(syn), "--scheme", "nih", "--n", "3", "--size", "64", "--slices", "12",
                 "--orient", "RAS", "--seed", "5", "--nih-format", "nifti"]) == 0
    nifti = tmp_path / "out_nih_nifti"
    assert main(["nih", "--images", str(syn / "images"), "--labels", str(syn / "labels"), "--out", str(nifti),
                 "--workers", "1", "--threshold", "0.3"]) == 0
    for name in ("NIH_slices_info.json", "NIH_train.json", "split.json"):
        assert json.loads((dicom / "annotations" / name).read_text()) == json.loads((nifti / "annotations" / name).read_text())
    names = sorted(p.name for p in (dicom / "slices").iterdir())
    assert names and names == sorted(p.name for p in (nifti / "slices").iterdir())
    assert all((dicom / "slices" / n).read_bytes() == (nifti / "slices" / n).read_bytes() for n in names)
