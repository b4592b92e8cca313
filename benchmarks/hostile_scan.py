"""Careless and hostile input to ``scan.py`` (and the volume reader the demo shares): a probe that
runs every case against the command line and sorts what happened (issue 25, items 12-20; 51 cases).

Each case builds its inputs in a fresh sandbox, runs ``scan.py`` (in-process through
``run_main``, or as a subprocess where a kill or a second concurrent run is part of the case)
with the tiny random stages of the tests, and is judged:

* ``ok``        exit 0 and the case's own check holds (every volume answered or skipped with a word);
* ``clear``     exit 2 with one ``error:`` line naming the input and the problem;
* ``traceback`` an exception that is not a user error, or ``Traceback`` on stderr;
* ``silent``    exit 0 but the case's check fails (a volume dropped or answered wrongly without a word);
* ``lost``      a file outside ``--out``, or a user's file inside it, changed or deleted;
* ``hang``      no answer within the case's time limit;
* ``leak``      a file written outside ``--out``.

Usage: ``python benchmarks/hostile_scan.py [--only NAME] [--keep DIR]``; prints one line per case
and the counts; exit status 1 when a case is traceback/silent/lost/hang/leak.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from minigpt4.io import write_json_atomic  # noqa: E402
from preprocessing import synthetic  # noqa: E402
from tests._phantoms import rewrite_dicom_headers, small_volume  # noqa: E402
from tests.tiny import random_checkpoints, tiny_model_config  # noqa: E402

STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")
SPACING = (0.8, 0.7, 2.5)
BAD = ("traceback", "silent", "lost", "hang", "leak")


# ----------------------------------------------------------------------------- inputs


def nifti(path: Path, seed: int = 0, shape=(40, 48, 3), affine=None, data=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None and data is None:
        stored, aff = synthetic.stored(small_volume(*shape, seed=seed)[0], SPACING, "LPS")
        synthetic.write_nifti(path, stored, aff)
        return path
    array = data if data is not None else small_volume(*shape, seed=seed)[0]
    image = nib.Nifti1Image(array, affine if affine is not None else np.diag([*SPACING, 1.0]))
    if path.name.lower().endswith(".nii"):
        nib.save(image, str(path))
    else:
        path.write_bytes(__import__("gzip").compress(image.to_bytes()))
    return path


def series(folder: Path, seed: int = 2, slices: int = 3, patient: Optional[str] = None) -> Path:
    synthetic.write_dicom_series(folder, small_volume(h=40, w=48, s=slices, seed=seed)[0], SPACING,
                                 patient or f"P{seed}", seed)
    return folder


edit = rewrite_dicom_headers


def zipped(path: Path, folder: Path, member=lambda p, k: f"series/{p.name}") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for k, file in enumerate(sorted(folder.rglob("*.dcm"))):
            archive.write(file, member(file, k))
    return path


def snapshot(root: Path, skip: Path) -> dict:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and skip not in p.parents and p != skip:
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- running


class Timeout(Exception):
    pass


class AlwaysBoxes:
    """Scripted stages: every slice boxed (pancreas and tumor), P(tumor) 0.75, so the SEG and
    montage writers are exercised (random tiny weights rarely answer a box)."""

    def __init__(self):
        from minigpt4.data.transforms import ImageTransform

        self.image_transform = ImageTransform(16)

    def encode_tower(self, images):
        return images

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        grid = (40, 40, 60, 60) if "tumor" in instructions[0] else (20, 25, 75, 80)
        return ["{" + "".join(f"<{v}>" for v in grid) + "}"] * len(instructions)

    def yes_probability(self, images, questions):
        import torch

        return torch.full((len(questions),), 0.75)


@contextlib.contextmanager
def scripted_stages():
    """Every stage loader the scan may call answers with :class:`AlwaysBoxes`."""
    import importlib

    from minigpt4.inference.pipeline import SingleModel

    patched = []
    for name in ("minigpt4.models.stages", "minigpt4.commands.scan", "minigpt4.scan"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "load_stages"):
            patched.append((module, module.load_stages))
            module.load_stages = lambda *a, **k: SingleModel(AlwaysBoxes())
    try:
        yield
    finally:
        for module, original in patched:
            module.load_stages = original


def run_inprocess(argv: list[str], limit: int, boxes: bool = False) -> tuple[Optional[int], str, Optional[str]]:
    """(exit status or None on hang, stderr, traceback text of a non-user exception)."""
    import scan
    from minigpt4.cli import run_main

    def alarm(*_):
        raise Timeout()

    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stderr(err), (scripted_stages() if boxes else contextlib.nullcontext()):
            status = run_main(scan.main, argv, prog="scan.py")
        return status, err.getvalue(), None
    except Timeout:
        return None, err.getvalue(), None
    except BaseException as exc:  # noqa: BLE001 - a probe sorts every failure
        import traceback

        return 1, err.getvalue(), "".join(traceback.format_exception(exc))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def subprocess_scan(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "scan.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(out: Path) -> list[dict]:
    import csv

    if not (out / "summary.csv").is_file():
        return []
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def skipped(out: Path) -> list[str]:
    try:
        return [Path(s["path"]).name for s in json.loads((out / "scan.json").read_text())["skipped"]]
    except (OSError, ValueError, KeyError):
        return []


# ----------------------------------------------------------------------------- cases
# A case: (name, build(sandbox) -> (inputs, extra args, check(out, stderr) -> problem | None,
#          expected words of a clear error or None when exit 0 is expected), mode)

CASES: list[tuple[str, Callable]] = []


def case(name: str):
    def register(build):
        CASES.append((name, build))
        return build
    return register


def expect_volumes(*names: str, skipped_names: tuple = ()):
    def check(out: Path, err: str) -> Optional[str]:
        got = [r["volume"] for r in rows(out)]
        if got != list(names):
            return f"volumes {got}, expected {list(names)}"
        bad = [r for r in rows(out) if r["error"]]
        if bad:
            return f"failed rows {[(r['volume'], r['error'][:80]) for r in bad]}"
        if sorted(skipped(out)) != sorted(skipped_names):
            return f"skipped {skipped(out)}, expected {list(skipped_names)}"
        return None
    return check


@case("nifti folder with a stray scout.dcm")
def _(s):
    nifti(s / "in" / "case1.nii.gz", 1), nifti(s / "in" / "case2.nii.gz", 2)
    src = series(s / "scout_src", 9, slices=1)
    next(src.rglob("*.dcm")).rename(s / "in" / "scout.dcm")
    return [s / "in"], [], expect_volumes("case1", "case2", skipped_names=("scout.dcm",)), None


@case("nifti next to an extension-less series folder")
def _(s):
    nifti(s / "in" / "case1.nii.gz", 1)
    edit(series(s / "in" / "plain", 3), lambda ds: None, lambda p: p.with_suffix(""))
    return [s / "in"], [], expect_volumes("case1", "plain"), None


@case("extension-less series folder given directly")
def _(s):
    edit(series(s / "plain", 3), lambda ds: None, lambda p: p.with_suffix(""))
    return [s / "plain"], [], expect_volumes("plain"), None


@case("two series in one folder")
def _(s):
    for seed in (4, 5):
        for f in series(s / f"src{seed}", seed).rglob("*.dcm"):
            (s / "in").mkdir(exist_ok=True)
            f.rename(s / "in" / f"{seed}_{f.name}")
    def check(out, err):
        got = [r["volume"] for r in rows(out)]
        return None if len(got) == 2 and len(set(got)) == 2 and not any(r["error"] for r in rows(out)) else f"{got}"
    return [s / "in"], [], check, None


@case("series given as .. from a sub-folder")
def _(s):
    series(s / "patient", 2)
    (s / "patient" / "sub").mkdir()
    (s / "report.json").write_text('{"mine": 1}')
    (s / "montage.png").write_bytes(b"mine")
    os.chdir(s / "patient" / "sub")
    return [".."], [], expect_volumes("patient"), None


@case("--inputs . (a series folder)")
def _(s):
    series(s / "patient", 2)
    os.chdir(s / "patient")
    return ["."], [], expect_volumes("patient"), None


@case("file named ...nii.gz")
def _(s):
    nifti(s / "in" / "...nii.gz", 1)
    return [s / "in" / "...nii.gz"], [], expect_volumes("volume"), None


@case("volumes named summary.csv and manifest.json")
def _(s):
    nifti(s / "in" / "summary.csv.nii.gz", 1)
    nifti(s / "in" / "manifest.json.nii", data=small_volume(40, 48, 3)[0], affine=np.diag([*SPACING, 1.0]))
    return [s / "in"], [], expect_volumes("manifest.json-2", "summary.csv-2"), None


@case("a.nii.gz and a.zip (one name)")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    zipped(s / "in" / "a.zip", series(s / "src", 3))
    return [s / "in"], [], expect_volumes("a", "a-2"), None


@case("same file given twice")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    return [s / "in", s / "in" / "a.nii.gz"], [], expect_volumes("a"), None


@case("name with a newline and a colon")
def _(s):
    nifti(s / "in" / "bad\nna:me.nii.gz", 1)
    return [s / "in"], [], expect_volumes("bad_na_me"), None


@case("hidden sub-folder inside a series")
def _(s):
    folder = series(s / "case", 2)
    extra = sorted(series(s / "more", 2, slices=4).rglob("*.dcm"))[-1]
    (folder / ".extra").mkdir()
    extra.rename(folder / ".extra" / extra.name)
    return [folder], [], expect_volumes("case", skipped_names=(".extra",)), None


@case("--overwrite into a folder with the user's summary.csv")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "out").mkdir()
    (s / "out" / "summary.csv").write_text("mine")
    return [s / "in"], ["--overwrite"], None, ("summary.csv", "did not write")


@case("--overwrite into a folder with the user's <vol>/report.json")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "out" / "a").mkdir(parents=True)
    (s / "out" / "a" / "report.json").write_text("mine")
    return [s / "in"], ["--overwrite"], None, ("did not write",)


@case("--overwrite with a foreign notes.txt (kept)")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "out").mkdir()
    (s / "out" / "notes.txt").write_text("mine")
    def check(out, err):
        return None if (out / "notes.txt").read_text() == "mine" and rows(out) else "notes.txt changed"
    return [s / "in"], ["--overwrite"], check, None


@case("non-empty foreign folder without --overwrite")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "out").mkdir()
    (s / "out" / "notes.txt").write_text("mine")
    return [s / "in"], [], None, ("not empty",)


@case("--out inside the input folder")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    return [s / "in"], ["--out", str(s / "in" / "scans")], None, ("must not equal, contain or lie inside",)


@case("--out is a file")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "outfile").write_text("x")
    return [s / "in"], ["--out", str(s / "outfile")], None, ("not a folder",)


@case("FIFO as input")
def _(s):
    os.mkfifo(s / "pipe.nii.gz")
    return [s / "pipe.nii.gz"], [], None, ("FIFO",)


@case("missing input")
def _(s):
    return [s / "nope.nii.gz"], [], None, ("not found",)


@case("README only")
def _(s):
    (s / "in").mkdir()
    (s / "in" / "README.txt").write_text("x")
    return [s / "in"], [], None, ("no NIfTI file", "README.txt")


@case("empty folder")
def _(s):
    (s / "in").mkdir()
    return [s / "in"], [], None, ("no NIfTI file",)


@case("text file named .nii.gz")
def _(s):
    (s / "in").mkdir()
    (s / "in" / "x.nii.gz").write_text("hello")
    return [s / "in"], [], None, ("x.nii.gz",)


@case("truncated NIfTI, --on-error skip")
def _(s):
    good = nifti(s / "in" / "a.nii.gz", 1)
    (s / "in" / "b.nii.gz").write_bytes(good.read_bytes()[:300])
    def check(out, err):
        r = {x["volume"]: x for x in rows(out)}
        return None if r["a"]["decision"] and r["b"]["error"].startswith("b.nii.gz: ") else f"{r}"
    return [s / "in"], ["--on-error", "skip"], check, None


@case("truncated DICOM slice")
def _(s):
    folder = series(s / "case", 2)
    victim = sorted(folder.rglob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    return [folder], [], None, (victim.name,)


@case("zip with a duplicated slice")
def _(s):
    folder = series(s / "src", 2)
    path = zipped(s / "dup.zip", folder, lambda p, k: f"x/IM{k}.dcm")
    with zipfile.ZipFile(path, "a") as archive:
        archive.write(sorted(folder.rglob("*.dcm"))[0], "x/copy.dcm")
    return [path], [], None, ("dup.zip", "copy.dcm")


@case("zip slip member names")
def _(s):
    path = zipped(s / "evil.zip", series(s / "src", 2), lambda p, k: f"../../evil{k}.dcm")
    return [path], [], expect_volumes("evil"), None


@case("zip of a non-DICOM file")
def _(s):
    with zipfile.ZipFile(s / "junk.zip", "w") as archive:
        archive.writestr("a.txt", "hello")
    return [s / "junk.zip"], [], None, ("junk.zip",)


@case("not a zip named .zip")
def _(s):
    (s / "fake.zip").write_text("nope")
    return [s / "fake.zip"], [], None, ("fake.zip", "zip")


def flagged(name: str, check: str):
    def judge_flag(out: Path, err: str) -> Optional[str]:
        report = json.loads((out / name / "report.json").read_text())
        failed = [c["check"] for c in report.get("fitness") or [] if c["status"] == "failed"]
        return None if report.get("outside_validated_range") and check in failed else f"not flagged: {failed}"
    return judge_flag


@case("MR series (answered, flagged by the fitness checks)")
def _(s):
    return [edit(series(s / "mr", 2), lambda ds: setattr(ds, "Modality", "MR"))], [], flagged("mr", "modality"), None


@case("MR next to a CT")
def _(s):
    edit(series(s / "in" / "mr", 2), lambda ds: setattr(ds, "Modality", "MR"))
    series(s / "in" / "ct", 3)
    def check(out, err):
        return expect_volumes("ct", "mr")(out, err) or flagged("mr", "modality")(out, err)
    return [s / "in"], [], check, None


@case("oblique NIfTI")
def _(s):
    a = np.radians(10)
    rot = np.array([[np.cos(a), -np.sin(a), 0, 0], [np.sin(a), np.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return [nifti(s / "obl.nii.gz", affine=rot @ np.diag([*SPACING, 1.0]))], [], None, ("oblique",)


@case("oblique DICOM")
def _(s):
    c, n = np.cos(np.radians(10)), np.sin(np.radians(10))
    return [edit(series(s / "obl", 2), lambda ds: setattr(ds, "ImageOrientationPatient", [c, n, 0, -n, c, 0]))], \
        [], None, ("oblique",)


@case("coronal NIfTI with 3 mm slices")
def _(s):
    data = np.random.default_rng(0).integers(-200, 300, size=(48, 6, 40)).astype(np.int16)
    aff = np.array([[0.8, 0, 0, 0], [0, 0, 3.0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]])
    return [nifti(s / "cor.nii.gz", data=data, affine=aff)], [], None, ("squashed",)


@case("NIfTI without orientation")
def _(s):
    image = nib.Nifti1Image(small_volume(40, 48, 3)[0], None)
    image.header.set_qform(None, code=0), image.header.set_sform(None, code=0)
    (s / "in").mkdir()
    nib.save(image, str(s / "in" / "noorient.nii.gz"))
    return [s / "in" / "noorient.nii.gz"], [], None, ("no orientation",)


@case("NIfTI with NaN")
def _(s):
    data = small_volume(40, 48, 3)[0].astype(np.float32)
    data[1, 1, 1] = np.nan
    return [nifti(s / "nan.nii.gz", data=data, affine=np.diag([*SPACING, 1.0]))], [], None, ("NaN",)


@case("4-D NIfTI")
def _(s):
    return [nifti(s / "four.nii.gz", data=np.zeros((40, 48, 3, 2), np.int16), affine=np.eye(4))], [], None, \
        ("four.nii.gz",)


@case("constant NIfTI")
def _(s):
    return [nifti(s / "flat.nii.gz", data=np.zeros((40, 48, 3), np.int16), affine=np.eye(4))], [], None, ("empty",)


@case("tiny slices 8x8")
def _(s):
    return [nifti(s / "tiny.nii.gz", data=small_volume(8, 8, 3)[0], affine=np.eye(4))], [], None, ("outside",)


@case("1.1 GB sparse .nii")
def _(s):
    path = nifti(s / "big.nii", data=small_volume(40, 48, 3)[0], affine=np.diag([*SPACING, 1.0]))
    with open(path, "r+b") as handle:
        handle.truncate(1100 * 1024**2)
    return [path], [], expect_volumes("big"), None


@case("header claiming 2 TB of voxels")
def _(s):
    header = nib.Nifti1Header()
    header.set_data_shape((20000, 20000, 2000))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    (s / "huge.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1000)
    return [s / "huge.nii"], [], None, ("huge.nii",)


@case("series without SliceThickness/UIDs, empty charset")
def _(s):
    def strip(ds):
        for name in ("SliceThickness", "SeriesInstanceUID", "StudyInstanceUID"):
            if name in ds:
                delattr(ds, name)
        ds.SpecificCharacterSet = ""
    def check(out, err):
        problem = expect_volumes("anon")(out, err)
        record = json.loads((out / "anon" / "report.json").read_text()).get("dicom_seg") or {}
        if problem or not (out / "anon" / "seg.dcm").is_file() or len(record.get("generated_identifiers", {})) != 3:
            return problem or f"no SEG or identifiers not recorded: {record}"
        return None
    return [edit(series(s / "anon", 2), strip)], ["--on-error", "skip", "BOXES"], check, None


@case("series without FrameOfReferenceUID")
def _(s):
    def strip(ds):
        del ds.FrameOfReferenceUID
    def check(out, err):
        problem = expect_volumes("nofor")(out, err)
        record = json.loads((out / "nofor" / "report.json").read_text()).get("dicom_seg") or {}
        return problem or (None if record.get("error") and (out / "nofor" / "boxes.nii.gz").is_file()
                           else f"the SEG failure is not recorded: {record}")
    return [edit(series(s / "nofor", 2), strip)], ["--on-error", "skip", "BOXES"], check, None


@case("volume folder symlinked outside --out")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "elsewhere").mkdir()
    (s / "out").mkdir()
    write_json_atomic(s / "out" / "manifest.json", {"command": "scan", "status": "complete"})
    os.symlink(s / "elsewhere", s / "out" / "a")
    return [s / "in"], [], None, ("writes only inside --out",)


@case("re-run with another model.seed")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    return [s / "in"], ["RERUN", "--options", "model.seed=5"], None, None


@case("unicode and spaces in the name")
def _(s):
    nifti(s / "in" / "Müller 7 (2).nii.gz", 1)
    return [s / "in"], [], expect_volumes("Müller 7 (2)"), None


@case("--out under a read-only folder")
def _(s):
    nifti(s / "in" / "a.nii.gz", 1)
    (s / "ro").mkdir()
    os.chmod(s / "ro", 0o555)
    if os.access(s / "ro", os.W_OK):  # root ignores the mode: nothing to probe
        os.chmod(s / "ro", 0o755)
        return [s / "in"], [], expect_volumes("a"), None
    return [s / "in"], ["--out", str(s / "ro" / "out")], None, ("ro",)


@case("zip inside a zip")
def _(s):
    inner = zipped(s / "inner.zip", series(s / "src", 2))
    with zipfile.ZipFile(s / "outer.zip", "w") as archive:
        archive.write(inner, "inner.zip")
    return [s / "outer.zip"], [], None, ("outer.zip",)


@case("folder of PNG slices (a prepared dataset)")
def _(s):
    from PIL import Image

    (s / "in").mkdir()
    for k in range(3):
        Image.fromarray(np.full((40, 48), 10 * k, np.uint8)).save(s / "in" / f"slice_{k}.png")
    return [s / "in"], [], None, ("no NIfTI file", "slice_0.png")


# subprocess cases (kill -9 and a concurrent scan)
@case("kill -9 mid-scan, then re-run")
def _(s):
    for k in range(4):
        nifti(s / "in" / f"v{k}.nii.gz", k)
    return [s / "in"], ["KILL"], expect_volumes("v0", "v1", "v2", "v3"), None


@case("second scan while one is writing")
def _(s):
    for k in range(4):
        nifti(s / "in" / f"v{k}.nii.gz", k)
    return [s / "in"], ["BUSY"], None, ("another run is writing",)


# ----------------------------------------------------------------------------- the probe


def judge(name: str, build: Callable, config: Path, root: Path) -> tuple[str, str]:
    sandbox = Path(tempfile.mkdtemp(prefix="case_", dir=root))
    cwd = os.getcwd()
    try:
        inputs, extra, check, words = build(sandbox)
        extra = list(extra)
        out = sandbox / "out"
        if "--out" in extra:
            i = extra.index("--out")
            out = Path(extra[i + 1])
            del extra[i:i + 2]
        mode = next((m for m in ("RERUN", "KILL", "BUSY") if m in extra), None)
        if mode:
            extra.remove(mode)
        boxes = "BOXES" in extra
        if boxes:
            extra.remove("BOXES")
        argv = ["--cfg-path", str(config), "--inputs", *[str(p) for p in inputs], "--out", str(out)]
        before = snapshot(sandbox, out)
        user_inside = snapshot(out, out / "\0") if out.is_dir() else {}
        traceback_text = None
        if mode == "RERUN":
            status, err, traceback_text = run_inprocess(argv, 300)
            first = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
            time.sleep(0.01)
            status, err, traceback_text = run_inprocess(argv + extra, 300)
            again = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
            if status == 0 and first and all(again[p] != first[p] for p in first):
                check = None
            else:
                check = (lambda out, err: "a model.seed change did not rescan")
        elif mode in ("KILL", "BUSY"):
            proc = subprocess_scan(argv)
            deadline = time.monotonic() + 300
            while not (out / "v0" / "done.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is not None:
                return "ok?", "the scan ended before it could be interrupted"
            if mode == "BUSY":
                status, err, traceback_text = run_inprocess(argv, 300)
                proc.wait(timeout=600)
            else:
                proc.kill()
                proc.wait()
                status, err, traceback_text = run_inprocess(argv, 300)
        else:
            status, err, traceback_text = run_inprocess(argv + extra, 300, boxes)
        os.chdir(cwd)
        after = snapshot(sandbox, out)
        if status is None:
            return "hang", "no answer in 300 s"
        if traceback_text or "Traceback" in err:
            return "traceback", (traceback_text or err).strip().splitlines()[-1][:200]
        changed = [k for k in before if after.get(k) != before[k]]
        if changed:
            return "lost", f"changed or deleted outside --out: {changed[:3]}"
        new = [k for k in after if k not in before]
        if new:
            return "leak", f"written outside --out: {new[:3]}"
        inside = snapshot(out, out / "\0") if out.is_dir() else {}
        touched = [k for k in user_inside if inside.get(k) != user_inside[k] and k != "manifest.json"]
        if touched:
            return "lost", f"user's files in --out changed: {touched[:3]}"
        last = err.strip().splitlines()[-1] if err.strip() else ""
        if status == 0:
            try:
                problem = check(out, err) if check else None
            except (OSError, ValueError, KeyError) as exc:  # an expected output is missing or unreadable
                problem = f"{type(exc).__name__}: {exc}"
            if words is not None:
                return "silent", f"exit 0 where an error was expected ({words})"
            return ("silent", problem) if problem else ("ok", last[:160])
        if status == 2 and last.startswith("scan.py: error: "):
            if words is None:
                return "clear", f"(expected exit 0) {last[:200]}"
            if all(w in last for w in words):
                return "clear", last[:200]
            return "clear", f"(words {words} missing) {last[:200]}"
        return "traceback", f"exit {status}: {last[:200]}"
    finally:
        os.chdir(cwd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--keep", help="sandbox folder to keep (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    root = Path(args.keep or tempfile.mkdtemp(prefix="hostile_scan_"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_model_config(max_new_tokens=4)
    paths = random_checkpoints(root / "ckpt", cfg, STAGES)
    config = root / "scan.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "model": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "cascade": {"stages": paths, "threshold": 0.5, "aggregation": "max", "top_k": 3},
        "run": {"device": "cpu", "eval_batch_size": 8}})))
    counts: dict[str, int] = {}
    for name, build in CASES:
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        outcome, detail = judge(name, build, config, root)
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{outcome:9s} {time.perf_counter() - started:5.1f}s  {name}: {detail}", flush=True)
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {sum(counts.values())})")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(counts.get(k) for k in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
