"""Careless input to ``scan.py``, the volume reader and the outputs (issue 25, items 12-20):
nothing written or deleted outside ``--out``, the user's files never replaced, no stale answer
reused, no volume dropped without a word, a SEG problem costs the SEG only, an interrupted scan
resumes, one geometry rule for NIfTI and DICOM, no private path for a demo user, and messages
that name the user's file and the problem.

Each test drives the command line (``scan.main`` / ``run_main``) or a public function with a
tiny model and volumes of a few slices, and reads the files back with independent readers."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from minigpt4.cli import run_main
from minigpt4.inference.pipeline import PatientResult, SliceResult, VolumeResult
from minigpt4.inference.readers import InputError, load_volume
from minigpt4.io import write_json_atomic
from minigpt4.scan_outputs import (
    BOXES_FILE,
    DONE_FILE,
    REPORT_FILE,
    SEG_FILE,
    CheckpointIdentity,
    read_dicom_source,
    write_volume_outputs,
)
from preprocessing import synthetic
from tests._phantoms import rewrite_dicom_headers, small_volume
from tests.test_scan import SPACING, STAGES, make_inputs, scan_config, strict_json
from tests.tiny import random_checkpoints, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = [CheckpointIdentity("tumor_detection", "ckpt", "c" * 64)]


@pytest.fixture(scope="module")
def stage_paths(tmp_path_factory):
    cfg = tiny_model_config(max_new_tokens=4)
    return random_checkpoints(tmp_path_factory.mktemp("ckpt"), cfg, STAGES), cfg


@pytest.fixture()
def config(tmp_path, stage_paths):
    torch.set_num_threads(1)
    return scan_config(tmp_path, stage_paths)


def scan(config: Path, inputs, out: Path, *extra: str, capsys=None) -> tuple[int, str]:
    """``scan.py --cfg-path config --inputs ... --out out ...`` → (exit status, stderr)."""
    import scan as entry_point

    if capsys is not None:
        capsys.readouterr()
    argv = ["--cfg-path", str(config), "--inputs", *[str(p) for p in inputs], "--out", str(out), *extra]
    status = run_main(entry_point.main, argv, prog="scan.py")
    return status, (capsys.readouterr().err if capsys is not None else "")


def nifti(path: Path, shape=(40, 48, 3), seed: int = 0, spacing=SPACING, orient: str = "LPS") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    stored, affine = synthetic.stored(small_volume(*shape, seed=seed)[0], spacing, orient)
    synthetic.write_nifti(path, stored, affine)
    return path


def series(folder: Path, seed: int = 2, slices: int = 3, patient: str = "P2") -> Path:
    synthetic.write_dicom_series(folder, small_volume(h=40, w=48, s=slices, seed=seed)[0], SPACING, patient, seed)
    return folder


rewrite_headers = rewrite_dicom_headers


def tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- 12: inside --out


def test_dot_dot_series_and_dotted_names_stay_inside_out(tmp_path, config, monkeypatch, capsys):
    """A DICOM series given as ``..`` (from inside a sub-folder), a file named ``...nii.gz`` and
    ``--inputs .``: every output lies in its own folder directly inside ``--out``; the user's
    report.json and montage.png next to ``--out`` are untouched."""
    home = tmp_path / "home"
    series(home / "patient")
    (home / "patient" / "sub").mkdir()
    user = {"report.json": b'{"mine": true}\n', "montage.png": b"my picture"}
    for name, data in user.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(home / "patient" / "sub")
    status, err = scan(config, [".."], tmp_path / "scans", capsys=capsys)
    assert status == 0, err
    assert {n: (tmp_path / n).read_bytes() for n in user} == user
    assert sorted(p.name for p in (tmp_path / "scans").iterdir()) == ["index.html", "manifest.json", "patient",
                                                                      "scan.json", "summary.csv"]
    assert [r["volume"] for r in summary(tmp_path / "scans")] == ["patient"]
    assert (tmp_path / "scans" / "patient" / DONE_FILE).is_file()

    dotted = tmp_path / "dotted"
    nifti(dotted / "...nii.gz")
    nifti(dotted / "summary.csv.nii.gz", seed=1)  # a volume named like the summary file
    status, err = scan(config, [dotted / "...nii.gz", dotted], tmp_path / "scans2", capsys=capsys)
    assert status == 0, err
    assert {n: (tmp_path / n).read_bytes() for n in user} == user
    names = [r["volume"] for r in summary(tmp_path / "scans2")]
    assert names == ["summary.csv-2", "volume"]
    assert all((tmp_path / "scans2" / n / REPORT_FILE).is_file() for n in names)
    assert strict_json(tmp_path / "scans2" / "summary.csv-2" / REPORT_FILE)["source"].endswith("summary.csv.nii.gz")
    assert strict_json(tmp_path / "scans2" / "scan.json")["skipped"] == []  # given by name: not a skipped hidden file

    monkeypatch.chdir(home / "patient")
    status, err = scan(config, ["."], tmp_path / "scans3", capsys=capsys)
    assert status == 0, err
    assert [r["volume"] for r in summary(tmp_path / "scans3")] == ["patient"]


def test_out_inside_an_input_folder_is_refused(tmp_path, config, capsys):
    """The next run would scan the outputs (boxes.nii.gz) as volumes."""
    inputs = make_inputs(tmp_path / "in")
    status, err = scan(config, [inputs], inputs / "scans", capsys=capsys)
    assert status == 2 and "must not equal, contain or lie inside the input" in err, err
    assert not (inputs / "scans").exists()


def test_volume_names_are_unique_and_never_a_path():
    from minigpt4.inference.inputs import safe_name, unique_names, volume_name

    assert [safe_name(t) for t in ("..", ".", "", "a/b", "a\\b", " .x. ", "\x00c")] == [
        "volume", "volume", "volume", "a_b", "a_b", "x", "_c"]
    assert volume_name("...nii.gz") == "volume" and volume_name("case.NII.GZ") == "case"
    assert unique_names(["a", "A", "a", "manifest.json"]) == ["a", "A-2", "a-3", "manifest.json-2"]


def test_find_volumes_says_what_it_skipped(tmp_path):
    from minigpt4.inference.inputs import find_volumes

    folder = tmp_path / "in"
    nifti(folder / "a.nii.gz")
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.nii.gz").write_bytes((folder / "a.nii.gz").read_bytes())
    series(tmp_path / "elsewhere")
    (folder / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    found = find_volumes([folder])
    assert [(v.name, v.kind) for v in found.volumes] == [("a", "nifti")]
    assert [(s.path.name, s.reason.split(" (")[0]) for s in found.skipped] == [
        ("link", "a link to a folder"), (".hidden.nii.gz", "hidden file"),
        ("notes.txt", "not a NIfTI, MHA/NRRD, zip or DICOM file")]
    assert found.summary().startswith("found 1 volume(s): 1 NIfTI file; skipped 3: ")


# ----------------------------------------------------------------------------- 13: foreign files


def test_overwrite_never_replaces_files_the_scan_did_not_write(tmp_path, config, capsys):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    (out / "a_nifti").mkdir(parents=True)
    user = {"summary.csv": b"my,table\n", "scan.json": b"{}", "a_nifti/report.json": b'{"mine": 1}'}
    for name, data in user.items():
        (out / name).write_bytes(data)
    status, err = scan(config, [inputs], out, "--overwrite", capsys=capsys)
    assert status == 2 and "did not write" in err and "Traceback" not in err, err
    assert tree(out) == user


def test_a_volume_folder_with_foreign_outputs_is_left_untouched(tmp_path):
    geometry = synthetic_geometry()
    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "montage.png").write_bytes(b"my montage")
    from minigpt4.outputs import OutputFolderError

    with pytest.raises(OutputFolderError, match="montage.png that scan.py did not write"):
        write_volume_outputs(folder, volume="case", source="case", geometry=geometry,
                             result=VolumeResult([SliceResult(0, 0.2)], None), checkpoints=CHECKPOINTS,
                             fingerprint="f" * 64)
    assert tree(folder) == {"montage.png": b"my montage"}


def synthetic_geometry():
    from minigpt4.scan_outputs import geometry_from_affine

    return geometry_from_affine(np.diag([0.7, 0.8, 2.5, 1.0]), (48, 40, 3))


# ----------------------------------------------------------------------------- 14: fingerprint


def test_another_model_setting_or_hidden_input_file_is_another_scan(tmp_path, config, capsys):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert scan(config, [inputs], out, capsys=capsys)[0] == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob(REPORT_FILE)}
    assert scan(config, [inputs], out, capsys=capsys)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob(REPORT_FILE)} == stamps  # same settings: skipped
    time.sleep(0.01)
    assert scan(config, [inputs], out, "--options", "model.seed=7", capsys=capsys)[0] == 0
    assert all(p.stat().st_mtime_ns != stamps[p] for p in stamps), "a model.* change must rescan"
    assert strict_json(out / "scan.json")["config"]["model"]["seed"] == 7


def test_hidden_subfolder_is_not_read_and_is_said(tmp_path, config, capsys):
    folder = series(tmp_path / "case")
    extra = tmp_path / "more"
    series(extra, seed=2, slices=4)  # the same series, one slice more
    files = sorted(extra.rglob("*.dcm"))
    (folder / ".extra").mkdir()
    files[-1].rename(folder / ".extra" / files[-1].name)
    status, err = scan(config, [folder], tmp_path / "out", capsys=capsys)
    assert status == 0, err
    assert strict_json(tmp_path / "out" / "case" / REPORT_FILE)["counts"]["n_slices"] == 3
    skipped = strict_json(tmp_path / "out" / "scan.json")["skipped"]
    assert [(Path(s["path"]).name, s["reason"]) for s in skipped] == [(".extra", "hidden folder")]
    assert ".extra (hidden folder)" in err


def test_summary_never_lists_a_volume_of_other_settings(tmp_path, config, capsys):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert scan(config, [inputs], out, capsys=capsys)[0] == 0
    (inputs / "b_broken.nii.gz").write_bytes((inputs / "a_nifti.nii.gz").read_bytes()[:300])
    status, err = scan(config, [inputs], out, "--options", "cascade.threshold=0.25", capsys=capsys)
    assert status == 2 and "b_broken.nii.gz" in err
    rows = {r["volume"]: r for r in summary(out)}
    assert rows["a_nifti"]["decision"] and not rows["a_nifti"]["error"]  # rescanned before the failure
    for name in ("b_series", "c_zip"):  # done under threshold 0.5, not reached under 0.25
        assert rows[name]["decision"] == "" and "other settings" in rows[name]["error"]
    assert strict_json(out / "scan.json")["counts"]["decisions"] == {rows["a_nifti"]["decision"]: 1}


# ----------------------------------------------------------------------------- 15: found by content


def test_volumes_are_found_by_content_one_per_series(tmp_path, config, capsys):
    """case1/case2 NIfTIs, a stray single-image ``scout.dcm``, an extension-less series in a
    sub-folder and a folder holding two series: each series is one volume, the scout is skipped
    with its reason, and the command says what it found and skipped."""
    folder = tmp_path / "in"
    nifti(folder / "case1.nii.gz", seed=1)
    nifti(folder / "case2.nii.gz", seed=2)
    scout = series(tmp_path / "scout_src", seed=9, slices=1)
    next(scout.rglob("*.dcm")).rename(folder / "scout.dcm")
    series(folder / "plain", seed=3)
    rewrite_headers(folder / "plain", lambda ds: None, rename=lambda p: p.with_suffix(""))
    for seed, patient in ((4, "A"), (5, "B")):  # two series side by side in one folder
        for file in series(tmp_path / patient, seed=seed, patient=patient).rglob("*.dcm"):
            (folder / "two").mkdir(exist_ok=True)
            file.rename(folder / "two" / f"{patient}_{file.name}")
    status, err = scan(config, [folder], tmp_path / "out", capsys=capsys)
    assert status == 0, err
    rows = summary(tmp_path / "out")
    names = [r["volume"] for r in rows]
    assert names[:3] == ["case1", "case2", "plain"] and len(names) == 5
    assert all(n.startswith("two_series-") for n in names[3:]) and names[3] != names[4], names
    assert all(int(r["n_slices"]) == 3 for r in rows[2:])
    skipped = strict_json(tmp_path / "out" / "scan.json")["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["scout.dcm"] and "single DICOM image" in skipped[0]["reason"]
    assert "found 5 volume(s)" in err and "scout.dcm" in err


def test_extension_less_series_folder_given_directly(tmp_path, config, capsys):
    folder = series(tmp_path / "plain", seed=3)
    rewrite_headers(folder, lambda ds: None, rename=lambda p: p.with_suffix(""))
    status, err = scan(config, [folder], tmp_path / "out", capsys=capsys)
    assert status == 0, err
    assert [r["volume"] for r in summary(tmp_path / "out")] == ["plain"]


# ----------------------------------------------------------------------------- 16: SEG headers


def boxed_results(n: int = 3):
    return VolumeResult([SliceResult(k, 0.8, (2, 3, 20, 25), (5, 6, 10, 12)) for k in range(n)],
                        PatientResult(score=0.8, aggregation="max", top_k=3, threshold=0.5, decision="tumor",
                                      n_slices_boxed=n))


def write_dicom_volume(folder: Path, out: Path, change) -> dict:
    rewrite_headers(folder, change)
    geometry, headers = read_dicom_source(folder)
    write_volume_outputs(out, volume="v", source=str(folder), geometry=geometry, result=boxed_results(),
                         checkpoints=CHECKPOINTS, fingerprint="f" * 64, dicom_headers=headers)
    assert (out / DONE_FILE).is_file() and (out / BOXES_FILE).is_file()
    report = strict_json(out / REPORT_FILE)
    assert report["patient"]["decision"] == "tumor"
    return report


def test_seg_gets_generated_identifiers_and_the_default_character_set(tmp_path):
    import pydicom

    def strip(ds):
        for name in ("SliceThickness", "SeriesInstanceUID", "StudyInstanceUID"):
            if name in ds:
                delattr(ds, name)
        ds.SpecificCharacterSet = ""

    report = write_dicom_volume(series(tmp_path / "s"), tmp_path / "out", strip)
    record = report["dicom_seg"]
    assert record["written"] is True and record["error"] is None
    generated = record["generated_identifiers"]
    assert set(generated) == {"SliceThickness", "SeriesInstanceUID", "StudyInstanceUID"}
    assert generated["SliceThickness"] == pytest.approx(SPACING[2])
    seg = pydicom.dcmread(str(tmp_path / "out" / SEG_FILE))
    assert seg.StudyInstanceUID == generated["StudyInstanceUID"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == generated["SeriesInstanceUID"]
    # the same series gets the same identifiers again
    again = write_dicom_volume(tmp_path / "s", tmp_path / "out2", lambda ds: None)
    assert again["dicom_seg"]["generated_identifiers"] == generated


def test_a_seg_that_cannot_be_written_costs_the_seg_only(tmp_path):
    def no_frame(ds):
        del ds.FrameOfReferenceUID

    report = write_dicom_volume(series(tmp_path / "s"), tmp_path / "out", no_frame)
    assert report["dicom_seg"]["written"] is False and "FrameOfReferenceUID" in report["dicom_seg"]["error"]
    assert not (tmp_path / "out" / SEG_FILE).exists()
    done = json.loads((tmp_path / "out" / DONE_FILE).read_text())["files"]
    assert SEG_FILE not in done and {BOXES_FILE, REPORT_FILE, "report.html"} <= set(done)


# ----------------------------------------------------------------------------- 17: resume, busy


def _scan_process(config: Path, inputs: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "scan.py"), "--cfg-path", str(config), "--inputs",
                             str(inputs), "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_scan_resumes_and_a_concurrent_one_is_told_it_is_busy(tmp_path, config, capsys):
    inputs = make_inputs(tmp_path / "in")
    for k in range(3):
        nifti(inputs / f"d_more{k}.nii.gz", seed=10 + k)
    out = tmp_path / "out"
    proc = _scan_process(config, inputs, out)
    try:
        deadline = time.monotonic() + 240
        while not (out / "a_nifti" / DONE_FILE).is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the scan ended before it could be killed: " + proc.communicate()[1][-2000:]
        # while it runs, a second scan into the same folder is told who is writing there
        status, err = scan(config, [inputs], out, capsys=capsys)
        assert status == 2 and "another run is writing into this folder" in err, err
        proc.kill()  # kill -9 mid-scan
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = (out / "a_nifti" / REPORT_FILE).stat().st_mtime_ns
    status, err = scan(config, [inputs], out, capsys=capsys)
    assert status == 0, err
    assert (out / "a_nifti" / REPORT_FILE).stat().st_mtime_ns == first  # resumed: the finished volume is kept
    assert len(summary(out)) == 6 and not any(r["error"] for r in summary(out))
    assert strict_json(out / "manifest.json")["status"] == "complete"


def test_a_scan_stopped_by_a_full_disk_resumes(tmp_path, config, capsys, monkeypatch):
    import errno

    from minigpt4 import io as io_module
    from minigpt4.scan_outputs import run as scan_run

    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    real_nifti, real_bytes = scan_run.write_box_nifti, io_module.write_bytes_atomic
    full = []

    def nifti_on_a_filling_disk(path, *args, **kwargs):
        if "b_series" in str(path):  # the disk fills while the second volume is written ...
            full.append(path)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_nifti(path, *args, **kwargs)

    def bytes_on_a_filling_disk(path, data):  # ... and every later write fails too (error.json, summary, manifest)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_bytes(path, data)

    monkeypatch.setattr(scan_run, "write_box_nifti", nifti_on_a_filling_disk)
    monkeypatch.setattr(io_module, "write_bytes_atomic", bytes_on_a_filling_disk)
    status, err = scan(config, [inputs], out, capsys=capsys)
    assert status == 2 and "no space left" in err and "Traceback" not in err, err
    first = (out / "a_nifti" / REPORT_FILE).stat().st_mtime_ns
    monkeypatch.setattr(scan_run, "write_box_nifti", real_nifti)
    monkeypatch.setattr(io_module, "write_bytes_atomic", real_bytes)
    status, err = scan(config, [inputs], out, capsys=capsys)
    assert status == 0, err
    assert (out / "a_nifti" / REPORT_FILE).stat().st_mtime_ns == first  # kept, not redone
    assert [r["volume"] for r in summary(out)] == ["a_nifti", "b_series", "c_zip"]
    assert not any(r["error"] for r in summary(out))


@pytest.mark.slow
def test_torchrun_into_a_busy_folder_gives_one_line_per_rank(tmp_path, config):
    """Every rank says the folder is busy; none is left at a barrier rank 0 never reaches."""
    from filelock import FileLock

    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    write_json_atomic(out / "manifest.json", {"command": "scan", "status": "running"})
    lock = FileLock(str(out / ".minigpt4.lock"), timeout=0)
    lock.acquire()
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(REPO / "scan.py"), "--cfg-path", str(config), "--inputs", str(inputs), "--out",
                               str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert proc.stderr.count("scan.py: error: ") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("another run is writing into this folder") == 2, proc.stderr[-3000:]
    assert "barrier" not in proc.stderr and 'minigpt4/' not in proc.stderr  # no trace from our code
    assert sorted(p.name for p in out.iterdir()) == [".minigpt4.lock", "manifest.json"]


# ----------------------------------------------------------------------------- 18: geometry


def test_an_mr_series_is_flagged_not_answered_as_plain_ct(tmp_path, config, capsys):
    """Issue 25.18 defers the modality to the fitness checks (issue 28.3): the MR series is
    answered but flagged outside the validated range in report.json, summary.csv and on stderr;
    next to a CT in one folder both are found, each its own volume."""
    def mr(ds):
        ds.Modality = "MR"

    both = tmp_path / "both"
    rewrite_headers(series(both / "mr"), mr)
    series(both / "ct", seed=3, patient="P3")
    status, err = scan(config, [both], tmp_path / "out", capsys=capsys)
    assert status == 0, err
    rows = {r["volume"]: r for r in summary(tmp_path / "out")}
    assert sorted(rows) == ["ct", "mr"]
    report = strict_json(tmp_path / "out" / "mr" / REPORT_FILE)
    modality = {c["check"]: c for c in report["fitness"]}["modality"]
    assert modality["status"] == "failed" and report["outside_validated_range"] is True
    assert rows["mr"]["outside_validated_range"] == "true" and "modality" in rows["mr"]["failed_checks"]
    assert "warning: mr: " in err and "modality" in err


def test_oblique_nifti_is_refused_like_oblique_dicom(tmp_path):
    path = nifti(tmp_path / "oblique.nii.gz", orient="RAS")
    image = nib.load(str(path))
    angle = np.radians(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0],
                         [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), rotation @ image.affine), str(path))
    with pytest.raises(InputError, match=r"oblique.nii.gz: oblique geometry \(a voxel axis 10.0° off"):
        load_volume(path)

    def tilt(ds):
        c, s = np.cos(angle), np.sin(angle)
        ds.ImageOrientationPatient = [c, s, 0, -s, c, 0]

    folder = series(tmp_path / "dicom")
    rewrite_headers(folder, tilt)
    with pytest.raises(InputError, match="dicom: oblique geometry"):
        load_volume(folder)


def test_a_coronal_volume_with_thick_slices_is_refused_not_squashed(tmp_path):
    # a coronal acquisition: stored axes 0.8 mm left-right, 0.8 mm head-feet, and 40 coronal slices
    # 3 mm apart front-back; its axial slices would have pixels of 0.8 (columns) × 3 mm (rows)
    data = np.random.default_rng(0).integers(-200, 300, size=(48, 6, 40)).astype(np.int16)
    affine = np.array([[0.8, 0, 0, 0], [0, 0, 3.0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "coronal.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    with pytest.raises(InputError, match=r"coronal.nii.gz: axial pixels of 0.80 × 3.00 mm \(3.75 : 1\)"):
        load_volume(path)
    # the same anatomy with 0.8 mm isotropic voxels is reoriented, not refused
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 0.8, 1.0])[[0, 2, 1, 3]]), str(path))
    assert load_volume(path).slices.shape == (6, 40, 48)


# ----------------------------------------------------------------------------- 19: modes


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"b": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_scan_outputs_are_readable_under_umask_022(tmp_path, config, capsys):
    old = os.umask(0o022)
    try:
        assert scan(config, [make_inputs(tmp_path / "in")], tmp_path / "out", capsys=capsys)[0] == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path / "out").as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_a_demo_user_sees_no_server_paths_and_a_dotted_upload_stays_in_its_folder(tmp_path, stage_paths):
    """The page header (the served checkpoints), the downloaded report.json and the folder a
    scan of an upload named ``...nii.gz`` is written to."""
    from minigpt4.config import load_config
    from minigpt4.demo.app import DemoHandlers
    from minigpt4.demo.service import DemoService, load_service
    from minigpt4.inference.pipeline import CascadeSettings, SingleModel
    from tests.test_demo import PANCREAS_Q, TUMOR_Q, ScriptedModel

    paths, _ = stage_paths
    service = load_service(load_config(scan_config(tmp_path, stage_paths)))
    assert service.description and not any(str(Path(p).parent) in service.description for p in paths.values())
    assert all(f"`{Path(p).name}`" in service.description for p in paths.values())

    model = ScriptedModel({PANCREAS_Q: "{<25><25><75><75>}", TUMOR_Q: "{<40><40><60><60>}"})
    weights = tmp_path / "weights" / "stage.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    service = DemoService(model, stages=SingleModel(model), cascade=CascadeSettings(threshold=0.0),
                          checkpoints={"tumor_detection": str(weights)})
    workdir = tmp_path / "work"
    workdir.mkdir()
    upload = nifti(tmp_path / "upload" / "...nii.gz", shape=(40, 48, 3))
    h = DemoHandlers(service, workdir)
    state, *_ = h.on_upload(str(upload), "paper", [], None)
    *_, history, files = h.on_scan([], state)
    assert files, history[-1]
    folder = Path(files[0]).parent
    assert folder.name == "volume" and folder.parent.parent == workdir, files  # never the workdir's root
    report = strict_json(Path(files[0]))
    assert [c["path"] for c in report["checkpoints"]] == ["stage.safetensors"]
    assert str(tmp_path) not in Path(files[0]).read_text()


# ----------------------------------------------------------------------------- 20: messages


def test_zip_errors_name_the_users_members(tmp_path):
    source = series(tmp_path / "src")
    files = sorted(source.rglob("*.dcm"))
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for number, file in enumerate(files):
            archive.write(file, f"export/IM{number:04d}.dcm")
        archive.write(files[0], "export/copy/IM_copy.dcm")  # the same slice twice
    with pytest.raises(InputError) as err:
        load_volume(path)
    message = str(err.value)
    assert message.startswith("dup.zip: duplicated slice position: ") and "IM_copy.dcm" in message, message
    assert "000" not in message.replace("IM0000", "")  # no generated member name


def test_a_truncated_slice_is_named_not_its_folder(tmp_path):
    folder = series(tmp_path / "case")
    victim = sorted(folder.rglob("*.dcm"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError) as err:
        load_volume(folder)
    assert str(err.value).startswith(f"case: study/series/{victim.name}: cannot decode pixel data"), str(err.value)


def test_a_fifo_input_is_named_as_such(tmp_path, config, capsys):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    status, err = scan(config, [fifo], tmp_path / "out", capsys=capsys)
    assert status == 2 and "pipe.nii.gz: --inputs is a FIFO (named pipe)" in err, err
    assert "output path" not in err


def test_reader_messages_do_not_point_at_preprocessing_options(tmp_path):
    path = nifti(tmp_path / "plain.nii.gz")
    image = nib.load(str(path))
    image.header.set_qform(None, code=0)
    image.header.set_sform(None, code=0)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, image.header), str(tmp_path / "noorient.nii.gz"))
    nan = np.asarray(image.dataobj).astype(np.float32)
    nan[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), str(tmp_path / "nan.nii.gz"))
    for name, expected in (("noorient.nii.gz", "no orientation in the header"), ("nan.nii.gz", "NaN/Inf voxel")):
        with pytest.raises(InputError) as err:
            load_volume(tmp_path / name)
        assert expected in str(err.value) and "python -m preprocessing" not in str(err.value), str(err.value)
        assert "--assume-orientation" not in str(err.value)


def test_a_large_nifti_is_not_refused_by_the_demos_upload_limit(tmp_path, config, capsys):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "big.nii"
    nib.save(nib.Nifti1Image(small_volume(40, 48, 3)[0], np.diag([*SPACING, 1.0])), str(path))
    with open(path, "r+b") as handle:  # 1.1 GB, sparse: nibabel reads the header's voxels only
        handle.truncate(1100 * 1024**2)
    with pytest.raises(InputError, match="over the demo's limit"):
        load_volume(path)  # the demo's limits
    status, err = scan(config, [path], tmp_path / "out", capsys=capsys)
    assert status == 0 and "demo" not in err, err
    assert strict_json(tmp_path / "out" / "big" / REPORT_FILE)["counts"]["n_slices"] == 3
