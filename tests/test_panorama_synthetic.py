"""The PANORAMA-format phantom set (preprocessing.synthetic_panorama): the public release's file
layout, label values and clinical sheet, read back with independent readers."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import openpyxl
import pytest

from preprocessing import clinical, synthetic_panorama
from preprocessing.__main__ import main as preprocessing_main


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("panorama_raw")
    res = synthetic_panorama.generate(out, n_patients=4, n_slices=10, size=48, msd_flagged=1, log=lambda *_: None)
    return out, res


def test_layout_and_names(phantoms):
    out, res = phantoms
    images = sorted(p.name for p in (out / "images").iterdir())
    manual = sorted(p.name for p in (out / "manual_labels").iterdir())
    automatic = sorted(p.name for p in (out / "automatic_labels").iterdir())
    # patients 900001-900002 PDAC (900001: 2 studies, manual; 900002: automatic), 900003-900004
    # non-PDAC (900003: 2 studies), 900005 the MSD-flagged extra patient
    assert images == ["900001_00001_0000.nii.gz", "900001_00002_0000.nii.gz", "900002_00001_0000.nii.gz",
                      "900003_00001_0000.nii.gz", "900003_00002_0000.nii.gz", "900004_00001_0000.nii.gz",
                      "900005_00001_0000.nii.gz"]
    assert manual == ["900001_00001.nii.gz", "900001_00002.nii.gz"]
    assert automatic == ["900002_00001.nii.gz", "900003_00001.nii.gz", "900003_00002.nii.gz",
                         "900004_00001.nii.gz", "900005_00001.nii.gz"]
    assert res["labels"] == [str(out / "manual_labels"), str(out / "automatic_labels")]


def test_sheet_xlsx_and_csv_as_published(phantoms):
    out, _ = phantoms
    rows = list(openpyxl.load_workbook(out / "clinical_information.xlsx").active.iter_rows(values_only=True))
    assert rows[0] == clinical.COLUMNS
    by_study = {r[1]: r for r in rows[1:]}
    assert len(by_study) == 7
    assert isinstance(by_study["900001_00001"][0], int) and by_study["900001_00001"][6] == "PDAC"
    assert by_study["900003_00002"][6] == "non-PDAC" and by_study["900003_00002"][7] == "radiology"
    assert by_study["900005_00001"][7] == "MSD_dataset" and by_study["900005_00001"][5] is None
    assert by_study["900004_00001"][5] == synthetic_panorama.SCANNER
    assert str(by_study["900004_00001"][3]).endswith("Y")
    with open(out / "clinical_information.csv", newline="") as fh:
        csv_rows = list(csv.reader(fh))
    assert tuple(csv_rows[0]) == clinical.COLUMNS and len(csv_rows) == 8
    # both read to the same studies
    assert clinical.read_sheet(out / "clinical_information.xlsx") == clinical.read_sheet(out / "clinical_information.csv")


def test_labels_and_lesions(phantoms):
    out, res = phantoms
    for study, info in res["studies"].items():
        label_img = nib.load(out / f"{info['source']}_labels" / f"{study}.nii.gz")
        image_img = nib.load(out / "images" / f"{study}_0000.nii.gz")
        assert nib.aff2axcodes(image_img.affine) == ("L", "P", "S")
        np.testing.assert_allclose(label_img.affine, image_img.affine)  # one scanner: the CT's own geometry
        label = np.asarray(label_img.dataobj)
        hu = np.asarray(image_img.dataobj)
        values = set(np.unique(label).tolist())
        assert values <= {0, 1, 3, 4, 5} and {3, 4} <= values
        if info["label"] == "PDAC":
            assert 1 in values
            # hypodense: the lesion is darker than the parenchyma by far more than the noise (12 HU)
            assert hu[label == 1].mean() < hu[label == 4].mean() - 50
            # inside the pancreas: every lesion slice holds parenchyma too
            lesion_slices = np.nonzero((label == 1).any(axis=(0, 1)))[0]
            assert all((label[:, :, k] == 4).any() for k in lesion_slices)
        else:
            assert 1 not in values


def test_mha_images_and_cli(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    out = tmp_path / "raw"
    assert preprocessing_main(["synthetic", "--scheme", "panorama", "--out", str(out), "--n", "2", "--slices", "6",
                               "--size", "40", "--image-format", "mha", "--orient", "LPS"]) == 0
    nii = tmp_path / "nii"
    synthetic_panorama.generate(nii, 2, 6, 40, log=lambda *_: None)
    for study in ("900001_00001", "900002_00001"):
        mha = sitk.ReadImage(str(out / "images" / f"{study}_0000.mha"))
        ref = nib.load(nii / "images" / f"{study}_0000.nii.gz")
        # the same voxels and the same world geometry (ITK is LPS, nibabel RAS)
        np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(mha), (2, 1, 0)), np.asarray(ref.dataobj))
        origin_ras = np.array(mha.GetOrigin()) * [-1, -1, 1]
        np.testing.assert_allclose(origin_ras, ref.affine[:3, 3], atol=1e-4)
        np.testing.assert_allclose(mha.GetSpacing(), ref.header.get_zooms()[:3], rtol=1e-6)
