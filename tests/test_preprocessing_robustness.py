"""Nothing lost, nothing silently wrong (issue 14): output-folder ownership, orientation-less
NIfTI, label maps, NIH pairing, DICOM geometry, NaN/huge voxels, empty splits, re-runs."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from preprocessing import normalize, synthetic, volumes
from preprocessing.__main__ import main
from tests._phantoms import small_volume, write_pair


def _with_pancreas(s: int = 5, seed: int = 0):
    hu, label = small_volume(s=s, seed=seed)
    label[4:8, 5:12, 1:3] = 1
    return hu, label


def _msd(folder: Path, out: Path, *extra) -> int:
    return main(["msd", "--images", str(folder / "imagesTr"), "--labels", str(folder / "labelsTr"),
                 "--out", str(out), "--workers", "1", "--test-ratio", "0", "--val-ratio", "0", *extra])


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- items 1 and 2: output folder


def test_tc_import_into_the_folder_holding_its_crops_is_refused(tmp_path, capsys):
    release = tmp_path / "release"
    for v in (1, 2):
        for k in (3, 4):
            path = release / "slices" / f"PANCREAS_{v:04d}_slice_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 5), 7 * v + k, dtype=np.uint8)).save(path)
    csv = tmp_path / "subset.csv"
    csv.write_text("image,dataset,volume,slice_index,answer\nPANCREAS_0001_slice_3.png,NIH,PANCREAS_0001,3,no\n")
    before = _tree(release)
    assert main(["tc-import", "--images", str(release / "slices"), "--csv", str(csv), "--out", str(release)]) == 2
    err = capsys.readouterr().err
    assert str(release) in err and "input" in err
    assert _tree(release) == before  # the 3 crops the CSV does not list are still there
    assert main(["tc-import", "--images", str(release / "slices"), "--csv", str(csv),
                 "--out", str(release / "slices" / "tc")]) == 2  # inside the input: refused too
    assert _tree(release) == before


def test_foreign_folder_is_refused_and_overwrite_keeps_foreign_files(tmp_path, capsys):
    write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    out = tmp_path / "out"
    foreign_png = out / "slices" / "other_slice_3.png"
    foreign_ann = out / "annotations" / "MSD_train.json"
    foreign_png.parent.mkdir(parents=True)
    foreign_ann.parent.mkdir(parents=True)
    foreign_png.write_bytes(b"someone else's slice")
    foreign_ann.write_text("[]")
    before = _tree(out)
    assert _msd(tmp_path, out) == 2  # non-empty, no manifest
    err = capsys.readouterr().err
    assert str(out) in err and "manifest" in err and "--overwrite" in err
    assert _tree(out) == before
    assert _msd(tmp_path, out, "--overwrite") == 2  # would replace annotations/MSD_train.json
    err = capsys.readouterr().err
    assert "annotations/MSD_train.json" in err
    assert _tree(out) == before
    foreign_ann.unlink()
    assert _msd(tmp_path, out, "--overwrite") == 0
    assert foreign_png.read_bytes() == b"someone else's slice"
    manifest = _json(out / "manifest.json")
    pngs = sorted(f"slices/{p.name}" for p in (out / "slices").glob("pancreas_001_*"))
    assert pngs == ["slices/pancreas_001_slice_1.png", "slices/pancreas_001_slice_2.png"]
    anns = sorted(f"annotations/{p.name}" for p in (out / "annotations").iterdir())
    assert manifest["files"] == sorted(pngs + anns)
    # a re-run with other parameters (--overwrite) removes only its own files
    assert _msd(tmp_path, out, "--overwrite", "--threshold", "0.5") == 0
    assert foreign_png.read_bytes() == b"someone else's slice"


def test_output_equal_to_containing_or_inside_an_input_is_refused(tmp_path, capsys):
    write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    before = _tree(tmp_path)
    for out in (tmp_path / "labelsTr", tmp_path / "imagesTr" / "prepared", tmp_path):
        assert _msd(tmp_path, out, "--overwrite") == 2, out
        err = capsys.readouterr().err
        assert "input" in err and str(out) in err
    assert _tree(tmp_path) == before


def test_synthetic_refuses_a_foreign_folder_and_removes_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "syn"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["synthetic", "--out", str(out), "--scheme", "msd", "--size", "32", "--slices", "4"]
    assert main(args + ["--n", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt"]
    assert main(args + ["--n", "2", "--overwrite"]) == 0
    assert len(list((out / "imagesTr").iterdir())) == 2
    assert main(args + ["--n", "1"]) == 0  # its own folder: the third file it wrote is removed
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["pancreas_001.nii.gz"]
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- item 3: orientation


def _strip_orientation(path: Path) -> None:
    img = nib.load(str(path))
    bare = nib.Nifti1Image(np.asanyarray(img.dataobj), None)
    bare.header.set_zooms(img.header.get_zooms())
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    path.write_bytes(gzip.compress(bare.to_bytes()))
    assert int(nib.load(str(path)).header["qform_code"]) == 0


@pytest.mark.parametrize("orient", ["RAS", "LPS"])
def test_nifti_without_orientation_is_refused_unless_assumed(tmp_path, capsys, orient):
    img, lab = write_pair(tmp_path, "pancreas_001", *_with_pancreas(), orient=orient)
    ref = tmp_path / "ref"
    assert _msd(tmp_path, ref) == 0
    _strip_orientation(img)
    _strip_orientation(lab)
    assert _msd(tmp_path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(img) in err and "qform_code" in err and "--assume-orientation" in err
    out = tmp_path / "assumed"
    assert _msd(tmp_path, out, "--assume-orientation", orient) == 0
    a = _json(ref / "annotations" / "MSD_slices_info.json")
    b = _json(out / "annotations" / "MSD_slices_info.json")
    assert [r["bbox_pancreas"] for r in a] == [r["bbox_pancreas"] for r in b]
    assert b[1]["bbox_pancreas"] == [5, 4, 11, 7]
    assert main(["msd", "--images", str(tmp_path / "imagesTr"), "--labels", str(tmp_path / "labelsTr"),
                 "--out", str(tmp_path / "bad"), "--assume-orientation", "RRS"]) == 2
    assert "--assume-orientation" in capsys.readouterr().err


def test_demo_volume_reader_refuses_a_nifti_without_orientation(tmp_path):
    from minigpt4.inference.readers import InputError, read_display_volume

    img, _ = write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    _strip_orientation(img)
    with pytest.raises(InputError, match=r"upload\.nii\.gz: .*qform_code"):
        read_display_volume(img, "upload.nii.gz")
    nan_image = _float_image(tmp_path / "nan", "pancreas_002", np.nan)
    with pytest.raises(InputError, match=r"upload\.nii\.gz: 1 NaN/Inf voxel"):
        read_display_volume(nan_image, "upload.nii.gz")


# ----------------------------------------------------------------------------- items 4 and 5


def test_label_map_with_shared_values_is_refused(tmp_path, capsys):
    write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    assert _msd(tmp_path, tmp_path / "out", "--label-map", "pancreas=1", "tumor=1") == 2
    err = capsys.readouterr().err
    assert "--label-map" in err and "pancreas" in err and "tumor" in err and "1" in err
    assert not (tmp_path / "out").exists()
    assert _msd(tmp_path, tmp_path / "out", "--label-map", "pancreas=0", "tumor=2") == 2
    assert "background" in capsys.readouterr().err


def _nih(folder: Path, out: Path) -> int:
    return main(["nih", "--images", str(folder / "images"), "--labels", str(folder / "labels"), "--out", str(out),
                 "--workers", "1", "--test-ratio", "0", "--val-ratio", "0"])


def _nih_pair(folder: Path, image_name: str, label_name: str, with_pancreas: bool, seed: int = 0):
    hu, label = _with_pancreas(seed=seed) if with_pancreas else small_volume(seed=seed)
    return write_pair(folder, "", hu, label, image_dir="images", label_dir="labels",
                      image_name=image_name, label_name=label_name)


def test_nih_pairs_by_the_four_digit_patient_number(tmp_path, capsys):
    _nih_pair(tmp_path, "ct_0001_5mm.nii.gz", "label0001.nii.gz", True)
    _nih_pair(tmp_path, "ct_0005_5mm.nii.gz", "label0005.nii.gz", False, seed=1)
    out = tmp_path / "out"
    assert _nih(tmp_path, out) == 0
    infos = _json(out / "annotations" / "NIH_slices_info.json")
    boxes = {(r["volume_name"], r["slice_index"]): r["bbox_pancreas"] for r in infos}
    assert boxes[("PANCREAS_0001", 1)] == [5, 4, 11, 7] and boxes[("PANCREAS_0005", 1)] == [0, 0, 0, 0]


@pytest.mark.parametrize("image_name, label_name, named", [
    ("PANCREAS_0001.nii.gz", "label0002.nii.gz", ["ct_0001_5mm.nii.gz", "PANCREAS_0001.nii.gz"]),
    ("ct_0002_5mm.nii.gz", "label_0001_v2.nii.gz", ["label0001.nii.gz", "label_0001_v2.nii.gz"]),
    ("PANCREAS_0002_2015.nii.gz", "label0002.nii.gz", ["PANCREAS_0002_2015.nii.gz"]),
])
def test_nih_ambiguous_pairing_names_the_files(tmp_path, capsys, image_name, label_name, named):
    _nih_pair(tmp_path, "ct_0001_5mm.nii.gz", "label0001.nii.gz", True)
    _nih_pair(tmp_path, image_name, label_name, True)
    assert _nih(tmp_path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert all(name in err for name in named), err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- item 7: DICOM


def _series(tmp_path: Path) -> tuple[Path, list[Path]]:
    hu, _, spacing = synthetic.phantom(32, 6, seed=1, scheme="nih")
    folder = tmp_path / "PANCREAS_0001"
    synthetic.write_dicom_series(folder, hu, spacing, "PANCREAS_0001", 0)
    return folder, sorted(folder.rglob("*.dcm"))


def test_dicom_slice_with_other_pixel_spacing_is_refused(tmp_path):
    folder, files = _series(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.save_as(files[3])
    with pytest.raises(volumes.VolumeError, match="PixelSpacing") as err:
        volumes.read_dicom_series(folder)
    assert files[3].name in str(err.value)


def test_dicom_slice_without_position_names_the_file_and_tag(tmp_path):
    folder, files = _series(tmp_path)
    ds = pydicom.dcmread(files[2])
    del ds.ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(volumes.VolumeError, match=r"ImagePositionPatient \(0020,0032\)") as err:
        volumes.read_dicom_series(folder)
    assert err.value.path == str(files[2]) and "missing slice" not in str(err.value)


def test_dicom_duplicated_slice_message_gives_its_position(tmp_path):
    folder, files = _series(tmp_path)
    copy = files[2].with_name("copy.dcm")
    shutil.copy(files[2], copy)
    z = float(pydicom.dcmread(files[2]).ImagePositionPatient[2])
    first = float(pydicom.dcmread(files[0]).ImagePositionPatient[2])
    assert abs(z - first) > 1  # the old message printed the first slice's position
    with pytest.raises(volumes.VolumeError, match="duplicated slice position") as err:
        volumes.read_dicom_series(folder)
    assert f"{z:.2f} mm" in str(err.value) and files[2].name in str(err.value) and "copy.dcm" in str(err.value)


# ----------------------------------------------------------------------------- item 9: NaN / huge voxels


def _float_image(tmp_path: Path, name: str, value: float) -> Path:
    hu, label = _with_pancreas()
    img, _ = write_pair(tmp_path, name, hu, label)
    arr, aff = synthetic.stored(hu.astype(np.float32), (1.0, 1.0, 2.0), "RAS")
    arr = arr.copy()
    arr[3, 2, 1] = value
    synthetic.write_nifti(img, arr, aff)
    return img


@pytest.mark.parametrize("value, problem", [(np.nan, "NaN/Inf"), (np.inf, "NaN/Inf"), (1e6, "outside")])
def test_bad_voxels_name_the_file_and_skip(tmp_path, capsys, value, problem):
    write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    img = _float_image(tmp_path, "pancreas_002", value)
    assert _msd(tmp_path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(img) in err and problem in err, err
    out = tmp_path / "skip"
    assert _msd(tmp_path, out, "--on-error", "skip") == 0
    assert "1 skipped" in capsys.readouterr().out
    skipped = _json(out / "manifest.json")["skipped"]
    assert [(s["volume"], s["file"]) for s in skipped] == [("pancreas_002", str(img))]
    assert problem in skipped[0]["reason"]


def test_equalize_of_a_huge_value_matches_the_same_ranks():
    rng = np.random.default_rng(0)
    values = rng.integers(-100, 100, size=(16, 16)).astype(np.float32)
    huge = values.copy()
    huge[0, 0] = 1e9  # 1e9 - (-100) bins: a 7.45 GiB histogram before
    capped = values.copy()
    capped[0, 0] = 500  # the same ranks: the maximum either way
    assert np.array_equal(normalize.equalize(huge), normalize.equalize(capped))
    with pytest.raises(ValueError, match="NaN"):
        normalize.equalize(np.full((4, 4), np.nan, dtype=np.float32))


# ----------------------------------------------------------------------------- item 11: empty labels


def test_empty_labels_are_summarised_and_an_empty_split_stops(tmp_path, capsys):
    write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    write_pair(tmp_path, "pancreas_002", *small_volume(seed=2))
    out = tmp_path / "out"
    assert _msd(tmp_path, out) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 without target (pancreas_002)" in last and "0 skipped" in last
    assert _msd(tmp_path, tmp_path / "no_val", "--val-ratio", "0.1") == 0
    assert "warning: the val split got no volume (--val-ratio 0.1 of 2 volume(s)" in capsys.readouterr().out
    # one volume per split, one of them the empty one: that split has nothing to train or test on
    rc = main(["msd", "--images", str(tmp_path / "imagesTr"), "--labels", str(tmp_path / "labelsTr"),
               "--out", str(tmp_path / "bad"), "--workers", "1", "--test-ratio", "0.5", "--val-ratio", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "split" in err and "no selected slice" in err and "pancreas_002" in err
    # every volume empty: non-zero, not rc 0 with empty splits
    only_empty = tmp_path / "only_empty"
    write_pair(only_empty, "pancreas_003", *small_volume(seed=3))
    assert _msd(only_empty, tmp_path / "out_empty") == 2
    assert "no selected slice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 12: re-run options


def test_rerun_with_other_error_handling_and_workers_is_the_same_folder(tmp_path):
    write_pair(tmp_path, "pancreas_001", *_with_pancreas())
    out = tmp_path / "out"
    assert _msd(tmp_path, out) == 0
    before = _tree(out / "annotations")
    assert _msd(tmp_path, out, "--on-error", "skip") == 0
    assert main(["msd", "--images", str(tmp_path / "imagesTr"), "--labels", str(tmp_path / "labelsTr"),
                 "--out", str(out), "--workers", "2", "--test-ratio", "0", "--val-ratio", "0"]) == 0
    assert _tree(out / "annotations") == before
    assert "on_error" not in _json(out / "manifest.json")["parameters"]
    # the case an error message advises: a run stopped by a bad volume, re-run with --on-error skip
    bad = _float_image(tmp_path, "pancreas_002", np.nan)
    stopped = tmp_path / "stopped"
    assert _msd(tmp_path, stopped) == 2
    assert _msd(tmp_path, stopped, "--on-error", "skip") == 0
    assert [s["file"] for s in _json(stopped / "manifest.json")["skipped"]] == [str(bad)]


def test_interrupted_run_is_finished_by_a_rerun_and_foreign_files_stay(tmp_path, monkeypatch):
    from preprocessing import pipeline

    for i in (1, 2):
        write_pair(tmp_path, f"pancreas_00{i}", *_with_pancreas(seed=i))
    ref = tmp_path / "ref"
    assert _msd(tmp_path, ref) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "slices").mkdir()
    (out / "slices" / "notes_slice_1.png").write_bytes(b"foreign")
    real = pipeline.process_volume

    def interrupted(job):
        if job.volume_name == "pancreas_002":
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(pipeline, "process_volume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _msd(tmp_path, out, "--overwrite")
    assert _json(out / "manifest.json")["volumes_in_progress"] == ["pancreas_001", "pancreas_002"]
    monkeypatch.setattr(pipeline, "process_volume", real)
    assert _msd(tmp_path, out) == 0  # same parameters: its own unfinished folder, no --overwrite needed
    assert {k: v for k, v in _tree(out).items() if k != "manifest.json"} == {
        **{k: v for k, v in _tree(ref).items() if k != "manifest.json"}, "slices/notes_slice_1.png": b"foreign"}


def test_dicom_image_of_another_series_without_geometry_is_ignored(tmp_path):
    folder, files = _series(tmp_path)
    expected = volumes.read_dicom_series(folder).array
    ds = pydicom.dcmread(files[0])  # e.g. a dose-report screenshot stored beside the CT series
    ds.SeriesInstanceUID = "1.2.3.999"
    del ds.ImagePositionPatient
    ds.save_as(folder / "dose_report.dcm")
    assert np.array_equal(volumes.read_dicom_series(folder).array, expected)
