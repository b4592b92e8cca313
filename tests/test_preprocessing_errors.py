"""Bad input → a clear error naming the file and the problem; ``--on-error skip`` lists it."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from preprocessing.__main__ import main
from preprocessing import synthetic, volumes
from tests._phantoms import small_volume, write_pair


def _label_with_pancreas(s=5):
    hu, label = small_volume(s=s)
    label[4:8, 5:12, 1:3] = 1
    return hu, label


def _good(folder: Path, name: str):
    hu, label = _label_with_pancreas()
    return write_pair(folder, name, hu, label)


def _run_msd(folder: Path, out: Path, *extra) -> int:
    return main(["msd", "--images", str(folder / "imagesTr"), "--labels", str(folder / "labelsTr"), "--out", str(out),
                 "--workers", "1", "--test-ratio", "0", "--val-ratio", "0", *extra])


def _error_is(capsys, *parts):
    err = capsys.readouterr().err
    for part in parts:
        assert part in err, err
    return err


def test_corrupt_and_truncated_nifti(tmp_path, capsys):
    img, _ = _good(tmp_path, "pancreas_001")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])  # truncated gzip
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(img), "corrupt or truncated")
    img.write_bytes(b"this is not a NIfTI file at all" * 10)
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(img), "corrupt or truncated")
    img.write_bytes(gzip.compress(b"\x00" * 400))  # valid gzip, garbage header
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(img))


def test_shape_and_affine_mismatch(tmp_path, capsys):
    _, lab = _good(tmp_path, "pancreas_001")
    hu, label = _label_with_pancreas(s=6)  # one slice more
    _, lab_aff = synthetic.stored(label, (1.0, 1.0, 2.0), "RAS")
    synthetic.write_nifti(lab, synthetic.stored(label, (1.0, 1.0, 2.0), "RAS")[0], lab_aff)
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(lab), "geometry does not match", "(20, 16, 6)")
    hu, label = _label_with_pancreas()
    arr, aff = synthetic.stored(label, (1.0, 1.0, 2.0), "RAS")
    aff = aff.copy()
    aff[0, 3] += 5.0  # shifted by 5 mm
    synthetic.write_nifti(lab, arr, aff)
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(lab), "geometry does not match")


def test_label_in_another_orientation_of_the_same_grid_is_accepted(tmp_path):
    img, lab = _good(tmp_path, "pancreas_001")
    ref = tmp_path / "ref"
    assert _run_msd(tmp_path, ref) == 0
    _, label = _label_with_pancreas()
    synthetic.write_nifti(lab, *synthetic.stored(label, (1.0, 1.0, 2.0), "LPS"))  # image stays RAS
    out = tmp_path / "out"
    assert _run_msd(tmp_path, out) == 0
    a = json.loads((ref / "annotations" / "MSD_slices_info.json").read_text())
    b = json.loads((out / "annotations" / "MSD_slices_info.json").read_text())
    assert a == b and a[1]["bbox_pancreas"] == [5, 4, 11, 7]  # hand-computed: rows 4-7, cols 5-11


def test_unexpected_and_non_integer_label_values(tmp_path, capsys):
    hu, label = _label_with_pancreas()
    label[0, 0, 0] = 3
    _, lab = write_pair(tmp_path, "pancreas_001", hu, label)
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(lab), "unexpected label values [3]", "--label-map")
    arr, aff = synthetic.stored(label.astype(np.float32) * 0.5, (1.0, 1.0, 2.0), "RAS")
    synthetic.write_nifti(lab, arr, aff)
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(lab), "non-integer")


def test_volume_without_target_is_kept_without_division_by_zero(tmp_path):
    _good(tmp_path, "pancreas_001")
    hu, empty = small_volume()
    write_pair(tmp_path, "pancreas_002", hu, empty)
    out = tmp_path / "out"
    assert _run_msd(tmp_path, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["volumes_without_target"] == ["pancreas_002"]
    info = [r for r in json.loads((out / "annotations" / "MSD_slices_info.json").read_text())
            if r["volume_name"] == "pancreas_002"]
    assert len(info) == 5 and all(r["pancreas_bbox_ratio"] == 0.0 and r["image"] is None for r in info)
    assert not list((out / "slices").glob("pancreas_002_*"))


def test_missing_label_missing_image_and_skip(tmp_path, capsys):
    _good(tmp_path, "pancreas_001")
    img2, lab2 = _good(tmp_path, "pancreas_002")
    lab2.unlink()
    _, lab3 = _good(tmp_path, "pancreas_003")
    (tmp_path / "imagesTr" / "pancreas_003.nii.gz").unlink()
    img4, _ = _good(tmp_path, "pancreas_004")
    img4.write_bytes(b"broken")
    assert _run_msd(tmp_path, tmp_path / "out") == 2
    _error_is(capsys, str(img2), "missing label")
    out = tmp_path / "skip"
    assert _run_msd(tmp_path, out, "--on-error", "skip") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {s["volume"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"pancreas_002", "pancreas_003", "pancreas_004"}
    assert "missing label" in skipped["pancreas_002"]["reason"]
    assert skipped["pancreas_003"]["file"] == str(lab3) and "label without image" in skipped["pancreas_003"]["reason"]
    assert skipped["pancreas_004"]["file"] == str(img4) and "corrupt" in skipped["pancreas_004"]["reason"]
    assert json.loads((out / "annotations" / "split.json").read_text())["train"] == ["pancreas_001"]


def test_missing_folders_and_bad_options(tmp_path, capsys):
    assert main(["msd", "--images", str(tmp_path / "nope"), "--labels", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _error_is(capsys, str(tmp_path / "nope"), "not found")
    (tmp_path / "empty").mkdir()
    assert main(["msd", "--images", str(tmp_path / "empty"), "--labels", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _error_is(capsys, "no MSD images")
    _good(tmp_path, "Case_00001")
    assert main(["abd", "--images", str(tmp_path / "imagesTr"), "--labels", str(tmp_path / "labelsTr"),
                 "--out", str(tmp_path / "o"), "--label-map", "liver=5", "kidney=2"]) == 2
    _error_is(capsys, "--label-map", "spleen")
    assert _run_msd(tmp_path, tmp_path / "o", "--threshold", "1.5") == 2
    _error_is(capsys, "threshold")


# ----------------------------------------------------------------------------- DICOM


def _series(tmp_path: Path) -> Path:
    hu, label, spacing = synthetic.phantom(32, 6, seed=1, scheme="nih")
    folder = tmp_path / "PANCREAS_0001"
    synthetic.write_dicom_series(folder, hu, spacing, "PANCREAS_0001", 0)
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def test_dicom_series_reads_to_hu_in_geometric_order(tmp_path):
    hu, _, spacing = synthetic.phantom(32, 6, seed=1, scheme="nih")
    folder = _series(tmp_path)
    (folder / "README.txt").write_text("not dicom")
    vol = volumes.read_dicom_series(folder)
    assert np.array_equal(volumes.to_display(vol.array, vol.affine), hu.astype(np.float32))
    assert np.allclose(vol.affine, synthetic.display_affine(hu.shape, spacing) @ np.array(
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))


@pytest.mark.parametrize("defect, message", [
    ("missing", "missing slice"),
    ("duplicate", "duplicated slice"),
    ("mixed", "mixed series"),
    ("oblique", "oblique geometry"),
])
def test_bad_dicom_series(tmp_path, defect, message):
    folder = _series(tmp_path)
    files = _files(folder)
    if defect == "missing":
        files[2].unlink()
    elif defect == "duplicate":
        shutil.copy(files[2], files[2].with_name("copy.dcm"))
    elif defect == "mixed":
        ds = pydicom.dcmread(files[0])
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.save_as(files[0])
    elif defect == "oblique":
        for f in files:
            ds = pydicom.dcmread(f)
            ds.ImageOrientationPatient = [0.9659258, 0.258819, 0, -0.258819, 0.9659258, 0]
            ds.save_as(f)
    with pytest.raises(volumes.VolumeError, match=message) as err:
        volumes.read_dicom_series(folder)
    assert str(folder) in str(err.value)


def test_nih_dicom_label_geometry_mismatch(tmp_path, capsys):
    folder = _series(tmp_path / "images")
    _, label, spacing = synthetic.phantom(32, 6, seed=1, scheme="nih")
    lab = tmp_path / "labels" / "label0001.nii.gz"
    arr, aff = synthetic.stored(label, (spacing[0], spacing[1], spacing[2] * 2), "RAS")  # wrong slice spacing
    synthetic.write_nifti(lab, arr, aff)
    assert main(["nih", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                 "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    _error_is(capsys, str(lab), "geometry does not match", str(folder))
