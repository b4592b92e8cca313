"""Issue 19, preprocessing: a worker's error never hangs the pool, --exclude-overlap-with and
--split-from are checked before any volume is processed, read-only / full disks give one line
and leave nothing behind."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from preprocessing import synthetic, volumes
from preprocessing.__main__ import main
from tests._phantoms import small_volume, write_pair


@pytest.fixture(scope="module")
def abd(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("abd")
    return synthetic.generate(root / "raw", scheme="abd", n=3, n_slices=8, size=64, seed=1, log=lambda *a: None)


def _abd(raw: dict, out: Path, *extra) -> int:
    return main(["abd", "--images", raw["images"], "--labels", raw["labels"], "--out", str(out),
                 "--test-ratio", "0", "--val-ratio", "0", *map(str, extra)])


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def test_a_4d_nifti_in_the_overlap_folder_fails_at_once(abd, tmp_path, capsys):
    other = tmp_path / "msd_raw"
    _nifti(other / "pancreas_001.nii.gz", small_volume(64, 64, 10)[0])
    bad = _nifti(other / "pancreas_002.nii.gz", np.zeros((64, 64, 10, 3), dtype=np.int16))
    start = time.perf_counter()
    assert _abd(abd, tmp_path / "out", "--workers", "2", "--exclude-overlap-with", other) == 2
    assert _err(capsys) == f"error: {bad}: expected a 3-D volume, got shape (64, 64, 10, 3)"
    assert time.perf_counter() - start < 30  # it hung forever with --workers > 1
    assert not (tmp_path / "out").exists()  # refused before any volume was processed


def test_overlap_folder_missing_own_out_or_own_images(abd, tmp_path, capsys):
    assert _abd(abd, tmp_path / "out", "--exclude-overlap-with", "/nonexistent") == 2
    assert _err(capsys) == "error: --exclude-overlap-with /nonexistent: not found"
    assert not (tmp_path / "out").exists()  # checked first: no volume processed, nothing written
    assert _abd(abd, tmp_path / "out", "--workers", "1") == 0
    capsys.readouterr()
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    assert _abd(abd, tmp_path / "out", "--workers", "1", "--exclude-overlap-with", tmp_path / "out") == 2
    assert "is (or overlaps) this run's own --out" in _err(capsys)
    assert _abd(abd, tmp_path / "out2", "--exclude-overlap-with", abd["images"]) == 2
    assert f"holds this run's own input volumes (3: {', '.join(abd['volumes'])})" in _err(capsys)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before and not (tmp_path / "out2").exists()


def test_a_header_claiming_a_huge_volume_is_refused_before_decoding(abd, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(volumes, "decode_budget", lambda: 24 * 1024**3)  # this machine's RAM, any machine
    path = _nifti(tmp_path / "msd_raw" / "pancreas_001.nii", np.zeros((4, 4, 4), dtype=np.int16))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 4096, 4096, 2000, 1, 1, 1, 1)  # dim[0..7] of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    assert _abd(abd, tmp_path / "out", "--exclude-overlap-with", path.parent) == 2
    err = _err(capsys)
    assert err == (f"error: {path}: the header declares 4096x4096x2000 voxels, about 187.5 GB to decode, more than "
                   "this machine's memory (24.0 GB); crop or resample the volume, or check its header")
    assert not (tmp_path / "out").exists()


def _read_only(monkeypatch, root: Path) -> None:
    """Every creation under ``root`` fails as on a read-only file system (root ignores chmod)."""
    real_open, real_mkdir = os.open, os.mkdir

    def fail(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: fail(path)
                        if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                        else real_open(path, flags, *a, **k))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: fail(path) if str(path).startswith(str(root))
                        else real_mkdir(path, *a, **k))


def test_read_only_and_full_disks_give_one_line_and_leave_nothing(abd, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    with monkeypatch.context() as patch:
        _read_only(patch, out)
        assert _abd(abd, out, "--workers", "1") == 2
    assert _err(capsys) == f"error: {out}: read-only file system: choose another output folder"
    assert os.listdir(out) == []

    full = tmp_path / "full"
    full.mkdir()
    real_write = pathlib.Path.write_bytes

    def disk_full(self, data):
        if str(self).startswith(str(full / "slices")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_bytes", disk_full)
        assert _abd(abd, full, "--workers", "1") == 2
    err = _err(capsys)
    assert err.startswith(f"error: {full / 'slices'}/{abd['volumes'][0]}_slice_") and err.endswith(
        ".png: no space left on the device: free some space or choose another output folder")
    assert os.listdir(full) == []  # no empty slices/ and annotations/, no manifest, no lock
    assert _abd(abd, full, "--workers", "1") == 0  # and the folder is usable afterwards


def _prepared_msd(tmp_path: Path) -> Path:
    raw = tmp_path / "msd"
    for i in range(3):
        hu, label = small_volume(s=5, seed=i)
        label[4:8, 5:12, 1:4] = 1
        write_pair(raw, f"pancreas_00{i}", hu, label)
    out = tmp_path / "MSD"
    assert main(["msd", "--images", str(raw / "imagesTr"), "--labels", str(raw / "labelsTr"), "--out", str(out),
                 "--workers", "1", "--test-ratio", "0.34", "--val-ratio", "0"]) == 0
    return out


def test_split_from_with_a_broken_split_json_is_refused(tmp_path, capsys):
    prepared = _prepared_msd(tmp_path)
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 9 * i, dtype=np.uint8)).save(crops / f"pancreas_00{i}_slice_2.png")
    split = prepared / "annotations" / "split.json"
    capsys.readouterr()
    split.write_text("[1, 2, 3]\n")
    argv = ["tc-import", "--images", str(crops), "--out", str(tmp_path / "tc"), "--split-from", str(prepared)]
    assert main(argv) == 2
    assert _err(capsys) == f"error: {split}: not a split (expected an object with train/val/test lists, got list)"
    split.write_text(json.dumps({"train": ["pancreas_000", "pancreas_001"], "val": [], "test": ["pancreas_001",
                                                                                                  "pancreas_002"]}))
    assert main(argv) == 2
    assert _err(capsys) == (f"error: {split}: volume pancreas_001 is in both train and test; a volume belongs to one "
                            "split (re-run python -m preprocessing on that folder)")
    assert not (tmp_path / "tc").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--workers", "0", "argument --workers: expected a whole number >= 1, got 0"),
    ("--workers", "-3", "argument --workers: expected a whole number >= 1, got -3"),
    ("--test-ratio", "nan", "argument --test-ratio: expected a number in [0, 1], got nan"),
    ("--val-ratio", "2", "argument --val-ratio: expected a number in [0, 1], got 2"),
])
def test_bad_option_values_are_refused_before_anything_is_written(tmp_path, capsys, option, value, message):
    """The hostile re-run: --workers 0/-3 were taken silently, --test-ratio nan was blamed on the manifest."""
    from preprocessing.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["msd", "--images", str(tmp_path / "in"), "--labels", str(tmp_path / "lab"), "--out", str(tmp_path / "out"),
              option, value])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_window_is_refused(tmp_path, capsys):
    from preprocessing.__main__ import main

    with pytest.raises(SystemExit):
        main(["msd", "--images", str(tmp_path), "--labels", str(tmp_path), "--out", str(tmp_path / "o"),
              "--window", "nan", "250"])
    assert capsys.readouterr().err.strip().endswith("argument --window: expected a finite number, got nan")


def test_a_folder_prepared_for_another_dataset_is_not_replaced_even_with_overwrite(abd, tmp_path, capsys):
    """`msd --out <prepared ABD folder> --overwrite` used to replace that dataset's slices and split
    (checkpoints' provenance points at it): a folder is a run's own only for its own dataset."""
    assert _abd(abd, tmp_path / "ABD") == 0
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ABD").rglob("*"))
    msd = synthetic.generate(tmp_path / "raw_msd", scheme="msd", n=2, n_slices=8, size=64, seed=2, log=lambda *a: None)
    capsys.readouterr()
    status = main(["msd", "--images", msd["images"], "--labels", msd["labels"], "--out", str(tmp_path / "ABD"),
                   "--overwrite"])
    err = _err(capsys)
    assert status == 2 and "not a manifest written by python -m preprocessing for MSD" in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ABD").rglob("*")) == before
