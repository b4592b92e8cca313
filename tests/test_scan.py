"""scan.py end to end: a folder holding a NIfTI, a DICOM folder and a DICOM zip in one call,
read back with independent readers (strict json, nibabel, pydicom, csv); re-runs skip what is
done; ``--on-error skip`` records a broken file and goes on; the default stops with one line."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from minigpt4.boxes import grid_to_pixel_inclusive
from minigpt4.data.transforms import ImageTransform
from minigpt4.inference.inputs import discover
from minigpt4.inference.pipeline import SingleModel
from minigpt4.inference.readers import load_volume
from minigpt4.scan_outputs import BOXES_FILE, DONE_FILE, MONTAGE_FILE, REPORT_FILE, SEG_FILE, read_dicom_source
from preprocessing import synthetic
from tests._phantoms import small_volume
from tests.tiny import random_checkpoints, tiny_model_config

STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")
SPACING = (0.8, 0.7, 2.5)
PANCREAS_GRID, TUMOR_GRID = (20, 25, 75, 80), (40, 40, 60, 60)


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


def make_inputs(folder: Path) -> Path:
    """``folder/`` with ``a_nifti.nii.gz`` (LPS-stored), ``b_series/`` (DICOM) and ``c_zip.zip``
    (another DICOM series), 40 × 48 pixels, 3–4 slices, plus a README that is not a volume."""
    folder.mkdir(parents=True)
    hu, _ = small_volume(h=40, w=48, s=4, seed=1)
    stored, affine = synthetic.stored(hu, SPACING, "LPS")
    synthetic.write_nifti(folder / "a_nifti.nii.gz", stored, affine)
    synthetic.write_dicom_series(folder / "b_series", small_volume(h=40, w=48, s=3, seed=2)[0], SPACING, "P2", 0)
    series = folder.parent / "zip_source"
    synthetic.write_dicom_series(series, small_volume(h=40, w=48, s=3, seed=3)[0], SPACING, "P3", 1)
    with zipfile.ZipFile(folder / "c_zip.zip", "w") as archive:
        for path in sorted(series.rglob("*.dcm")):
            archive.write(path, f"series/{path.name}")
    (folder / "README.txt").write_text("not a volume\n")
    return folder


@pytest.fixture(scope="module")
def stage_paths(tmp_path_factory) -> tuple[dict, object]:
    cfg = tiny_model_config(max_new_tokens=6)
    return random_checkpoints(tmp_path_factory.mktemp("ckpt"), cfg, STAGES), cfg


def scan_config(tmp_path: Path, stage_paths) -> Path:
    paths, cfg = stage_paths
    doc = {"model": OmegaConf.to_container(OmegaConf.structured(cfg)),
           "cascade": {"stages": paths, "threshold": 0.5, "slice_threshold": 0.5, "aggregation": "max", "top_k": 3,
                       "z_rule": "none", "min_boxed_slices": 1},
           "run": {"device": "cpu", "eval_batch_size": 8}}
    path = tmp_path / "scan.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(doc)))
    return path


class AlwaysBoxes:
    """Scripted stage model: every slice gets the pancreas box PANCREAS_GRID, P(tumor) 0.75 and
    the tumor box TUMOR_GRID, so every file that needs a box is written."""

    image_transform = ImageTransform(16)

    def encode_tower(self, images):
        return images

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        grid = TUMOR_GRID if "tumor" in instructions[0] else PANCREAS_GRID
        return ["{" + "".join(f"<{v}>" for v in grid) + "}"] * len(instructions)

    def yes_probability(self, images, questions):
        return torch.full((len(questions),), 0.75)


# ----------------------------------------------------------------------------- inputs


def test_discover_expands_folders_of_volumes(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    found = discover([inputs])
    assert [(e.name, e.path.name) for e in found] == [("a_nifti", "a_nifti.nii.gz"), ("b_series", "b_series"),
                                                      ("c_zip", "c_zip.zip")]
    # a series folder given directly is one volume; a file of another type is refused by name
    assert [e.name for e in discover([inputs / "b_series", inputs / "a_nifti.nii.gz"])] == ["a_nifti", "b_series"]
    with pytest.raises(ValueError, match=r"README.txt: not a CT volume"):
        discover([inputs / "README.txt"])
    # the same file named twice is one volume; two files of one name get unique folder names
    assert [e.name for e in discover([inputs, inputs / "a_nifti.nii.gz"])] == ["a_nifti", "b_series", "c_zip"]
    (inputs / "a_nifti.zip").write_bytes((inputs / "c_zip.zip").read_bytes())
    assert [(e.name, e.path.name) for e in discover([inputs])][:2] == [("a_nifti", "a_nifti.nii.gz"),
                                                                       ("a_nifti-2", "a_nifti.zip")]
    with pytest.raises(FileNotFoundError, match="missing: --inputs path not found"):
        discover([tmp_path / "missing"])


def test_load_volume_gives_the_inputs_geometry_and_dicom_headers(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    nifti = load_volume(inputs / "a_nifti.nii.gz")
    image = nib.load(str(inputs / "a_nifti.nii.gz"))
    assert nifti.geometry.shape == image.shape and np.allclose(nifti.geometry.affine, image.affine)
    assert nifti.geometry.display_shape == (40, 48, 4) and nifti.slices.shape == (4, 40, 48)
    assert nifti.dicom_headers is None
    (tmp_path / "work").mkdir()
    for path, source in ((inputs / "b_series", inputs / "b_series"), (inputs / "c_zip.zip", tmp_path / "zip_source")):
        volume = load_volume(path, workdir=tmp_path / "work")
        geometry, headers = read_dicom_source(source)
        assert volume.geometry.shape == geometry.shape == (48, 40, 3)
        assert np.allclose(volume.geometry.affine, geometry.affine)
        assert [h.SOPInstanceUID for h in volume.dicom_headers] == [h.SOPInstanceUID for h in headers]


# ----------------------------------------------------------------------------- end to end


def test_scan_writes_every_volume_and_skips_what_is_done(tmp_path, stage_paths):
    import scan

    torch.set_num_threads(1)
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    config = scan_config(tmp_path, stage_paths)
    rows = scan.main(["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(out)])
    assert [r["volume"] for r in rows] == ["a_nifti", "b_series", "c_zip"] and not any(r["error"] for r in rows)
    assert {p.name for p in out.iterdir()} == {"a_nifti", "b_series", "c_zip", "summary.csv", "scan.json",
                                               "index.html", "manifest.json"}
    checkpoints = strict_json(out / "scan.json")["checkpoints"]
    assert [c["stage"] for c in checkpoints] == sorted(STAGES) and all(len(c["sha256"]) == 64 for c in checkpoints)
    sources = {"a_nifti": inputs / "a_nifti.nii.gz", "b_series": inputs / "b_series", "c_zip": inputs / "c_zip.zip"}
    for name, source in sources.items():
        report = strict_json(out / name / REPORT_FILE)
        assert report["checkpoints"] == checkpoints and report["volume"] == name
        assert report["patient"]["decision"] in ("tumor", "no tumor", "inconclusive")
        assert report["config"]["threshold"] == 0.5 and len(report["slices"]) == report["counts"]["n_slices"]
        boxes = nib.load(str(out / name / BOXES_FILE))
        if name == "a_nifti":
            image = nib.load(str(source))
            assert boxes.shape == image.shape and np.allclose(boxes.affine, image.affine)
        else:
            geometry, _ = read_dicom_source(source if name == "b_series" else tmp_path / "zip_source")
            assert boxes.shape == geometry.shape and np.allclose(boxes.affine, geometry.affine)
        assert (out / name / DONE_FILE).is_file()
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["volume"] for r in table] == ["a_nifti", "b_series", "c_zip"] and not any(r["error"] for r in table)

    # a re-run skips every volume (same inputs, checkpoints and settings): nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob(REPORT_FILE)}
    scan.main(["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob(REPORT_FILE)} == stamps
    # another threshold is another scan: every volume is written again
    scan.main(["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(out),
               "--options", "cascade.threshold=0.25"])
    assert all(p.stat().st_mtime_ns != stamps[p] for p in stamps)
    assert strict_json(out / "a_nifti" / REPORT_FILE)["patient"]["threshold"] == 0.25


def test_scan_with_boxes_writes_seg_and_label_volumes(tmp_path, stage_paths, monkeypatch):
    """A scripted model that boxes every slice: boxes.nii.gz holds the inclusive pixel boxes of
    the grid answers on every slice, the DICOM inputs get a SEG with one frame per slice and
    segment, referencing their source images."""
    import pydicom

    import scan
    from minigpt4.commands import scan as scan_command

    monkeypatch.setattr(scan_command, "load_stages", lambda *args, **kwargs: SingleModel(AlwaysBoxes()))
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    scan.main(["--cfg-path", str(scan_config(tmp_path, stage_paths)), "--inputs", str(inputs), "--out", str(out)])
    pancreas = grid_to_pixel_inclusive(PANCREAS_GRID, 48, 40)
    tumor = grid_to_pixel_inclusive(TUMOR_GRID, 48, 40)
    for name, n_slices in (("a_nifti", 4), ("b_series", 3), ("c_zip", 3)):
        report = strict_json(out / name / REPORT_FILE)
        # no operating point with a map: the score is uncalibrated (issue 28.1)
        assert report["patient"] == {"decision": "tumor", "score": 0.75, "threshold": 0.5, "aggregation": "max",
                                     "top_k": None, "n_slices_boxed": n_slices, "verdict":
                                     f"tumor suspected on the {n_slices} slice(s) where a pancreas was found "
                                     f"({n_slices} of {n_slices} slice(s))",
                                     "likelihood": {"raw": 0.75, "calibrated": None, "calibration": None}}
        assert report["assessed"] == {"slices_with_pancreas": n_slices, "slices_total": n_slices,
                                      "slices_boxed_by_stage1": n_slices, "boxes_dropped_by_z_rule": 0,
                                      "min_slices_required": 1, "enough": True}
        # boxes on every slice reach the first and last one; the random HU of the inputs hold no air (issue 28.3)
        checks = {c["check"]: c for c in report["fitness"]}
        assert checks["z_coverage"]["status"] == "failed" and "first and last slice" in checks["z_coverage"]["reason"]
        assert checks["hu_sanity"]["status"] == "failed" and report["outside_validated_range"] is True
        # the stages' checkpoints were saved without an envelope: thickness cannot be judged, and says why
        assert checks["slice_thickness"]["status"] == "unknown" and "records no envelope" in checks["slice_thickness"]["reason"]
        assert checks["modality"]["status"] == ("unknown" if name == "a_nifti" else "passed")
        assert [s["pancreas_box"]["pixels"] for s in report["slices"]] == [list(pancreas)] * n_slices
        assert [s["tumor_box"]["pixels"] for s in report["slices"]] == [list(tumor)] * n_slices
        label = np.asarray(nib.load(str(out / name / BOXES_FILE)).dataobj)
        tumor_voxels = (tumor[2] - tumor[0] + 1) * (tumor[3] - tumor[1] + 1)
        pancreas_voxels = (pancreas[2] - pancreas[0] + 1) * (pancreas[3] - pancreas[1] + 1)
        assert int((label == 2).sum()) == n_slices * tumor_voxels
        assert int((label == 1).sum()) == n_slices * (pancreas_voxels - tumor_voxels)  # the tumor box wins
        assert (out / name / MONTAGE_FILE).is_file()
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["outside_validated_range"], r["failed_checks"], r["likelihood"]) for r in table] == \
        [("true", "hu_sanity;z_coverage", "")] * 3
    assert not (out / "a_nifti" / SEG_FILE).exists()  # NIfTI input: no SEG
    for name, source in (("b_series", inputs / "b_series"), ("c_zip", tmp_path / "zip_source")):
        seg = pydicom.dcmread(str(out / name / SEG_FILE))
        assert int(seg.NumberOfFrames) == 3 * 2  # 3 slices x (pancreas, tumor)
        referenced = {frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                      for frame in seg.PerFrameFunctionalGroupsSequence}
        assert referenced == {pydicom.dcmread(str(p)).SOPInstanceUID for p in source.rglob("*.dcm")}
        # the SR beside it (tests/test_clinical_pages.py reads its content), recorded in report.json
        sr = pydicom.dcmread(str(out / name / "sr.dcm"))
        assert sr.Modality == "SR" and sr.StudyInstanceUID == seg.StudyInstanceUID
        assert strict_json(out / name / REPORT_FILE)["structured_report"] == {"file": "sr.dcm", "error": None}
    assert not (out / "a_nifti" / "sr.dcm").exists() and strict_json(out / "a_nifti" / REPORT_FILE)["structured_report"] is None
    # the pages: one per volume, the index links them; no private path (the inputs live under tmp_path)
    index = (out / "index.html").read_text()
    for name, n_slices in (("a_nifti", 4), ("b_series", 3), ("c_zip", 3)):
        page = (out / name / "report.html").read_text()
        # the cascade's verdict line, saying how much was assessed (issue 25.5), heads the page
        assert f"Tumor suspected on the {n_slices} slice(s) where a pancreas was found" in page
        assert str(tmp_path) not in page
        assert f'<a href="{name}/report.html">{name}</a>' in index
    assert str(tmp_path) not in index
    assert str(tmp_path).encode() not in (out / "b_series" / "sr.dcm").read_bytes()


def test_on_error_skip_records_a_broken_volume_and_stop_exits_2(tmp_path, stage_paths, monkeypatch, capsys):
    import scan
    from minigpt4.cli import run_main
    from minigpt4.commands import scan as scan_command

    monkeypatch.setattr(scan_command, "load_stages", lambda *args, **kwargs: SingleModel(AlwaysBoxes()))
    inputs = make_inputs(tmp_path / "in")
    (inputs / "broken.nii.gz").write_bytes((inputs / "a_nifti.nii.gz").read_bytes()[:200])  # truncated
    config = scan_config(tmp_path, stage_paths)
    out = tmp_path / "out"
    rows = scan.main(["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(out), "--on-error", "skip"])
    assert [r["volume"] for r in rows] == ["a_nifti", "b_series", "broken", "c_zip"]
    assert [bool(r["error"]) for r in rows] == [False, False, True, False]
    assert rows[2]["error"].startswith("broken.nii.gz: ")
    assert strict_json(out / "broken" / "error.json")["volume"] == "broken"
    assert strict_json(out / "scan.json")["counts"]["failed"] == 1
    assert strict_json(out / "manifest.json")["status"] == "failed"
    # default --on-error stop: one error line, exit 2; the volumes written before it are kept
    capsys.readouterr()
    stopped = tmp_path / "stopped"
    status = run_main(scan.main, ["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(stopped)], prog="scan.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("scan.py: error: broken.nii.gz: ") and "Traceback" not in "\n".join(err)
    assert (stopped / "a_nifti" / DONE_FILE).is_file() and (stopped / "b_series" / DONE_FILE).is_file()
    assert not (stopped / "c_zip").exists()  # stopped before it


def _run(args: list[str]) -> str:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_process_writes(tmp_path, stage_paths):
    """``torchrun --nproc-per-node 2 scan.py`` (gloo on CPU): each rank writes its own volumes,
    rank 0 the summary; byte-identical report.json files and summary.csv as one process."""
    root = Path(__file__).resolve().parents[1]
    inputs = make_inputs(tmp_path / "in")
    config = scan_config(tmp_path, stage_paths)
    args = ["--cfg-path", str(config), "--inputs", str(inputs)]
    log = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(root / "scan.py"), *args,
                "--out", str(tmp_path / "two")])
    # shard by sorted name: rank 0 a_nifti and c_zip, rank 1 b_series
    assert "volumes (rank 0): 2/2" in log and "volumes (rank 1): 1/1" in log, log[-2000:]
    _run([str(root / "scan.py"), *args, "--out", str(tmp_path / "one")])
    for name in ("a_nifti", "b_series", "c_zip"):
        for file in (REPORT_FILE, BOXES_FILE):
            assert (tmp_path / "two" / name / file).read_bytes() == (tmp_path / "one" / name / file).read_bytes()
    assert (tmp_path / "two" / "summary.csv").read_bytes() == (tmp_path / "one" / "summary.csv").read_bytes()
    assert strict_json(tmp_path / "two" / "scan.json")["counts"] == strict_json(tmp_path / "one" / "scan.json")["counts"]
    assert not list((tmp_path / "two").glob(".minigpt4.lock*"))  # the lock is released


@pytest.mark.slow
def test_eval_cascade_under_torchrun_predicts_what_one_process_predicts(tmp_path, stage_paths):
    """``eval_cascade.py`` shards its volumes the same way: 2 gloo ranks write the predictions of one process."""
    from preprocessing import pipeline

    root = Path(__file__).resolve().parents[1]
    roots = {}
    for scheme, n in (("msd", 4), ("nih", 4)):
        raw = synthetic.generate(tmp_path / "raw" / scheme, scheme, n, 6, 48, "RAS", 0, "nifti", log=lambda *a: None)
        roots[scheme] = tmp_path / scheme.upper()
        pipeline.prepare(pipeline.Options(dataset=scheme.upper(), images=[raw["images"]], labels=raw["labels"],
                                          out=str(roots[scheme]), all_slices=True, workers=1), log=lambda *a: None)
    paths, cfg = stage_paths
    doc = {"model": OmegaConf.to_container(OmegaConf.structured(cfg)),
           "datasets": {k: {"root": str(v), "task": "pancreas_detection"} for k, v in roots.items()},
           "cascade": {"stages": paths, "threshold": 0.0, "top_k": 2, "bootstrap": 5},
           "run": {"device": "cpu", "eval_batch_size": 8}}
    config = tmp_path / "cascade.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(doc)))
    args = [str(root / "eval_cascade.py"), "--cfg-path", str(config), "--no-figures", "--options"]
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
          f"run.output_dir={tmp_path / 'two'}"])
    _run([*args, f"run.output_dir={tmp_path / 'one'}"])
    two, one = (tmp_path / name / "predictions.jsonl" for name in ("two", "one"))
    assert len(one.read_text().splitlines()) > 0 and two.read_bytes() == one.read_bytes()
    m2, m1 = (strict_json(tmp_path / name / "metrics.json") for name in ("two", "one"))
    assert m2["patient"] == m1["patient"] and m2["slice"] == m1["slice"]


def test_out_folder_rule_and_config_checks(tmp_path, stage_paths, capsys):
    """--out follows the output-folder rule (a foreign non-empty folder is refused before any
    model work); a config without the val operating point is refused with the key named."""
    import scan
    from minigpt4.cli import run_main

    inputs = make_inputs(tmp_path / "in")
    config = scan_config(tmp_path, stage_paths)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run_main(scan.main, ["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(foreign)],
                    prog="scan.py") == 2
    err = capsys.readouterr().err
    assert "scan.py: error: " in err and "folder is not empty and has no manifest.json" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    for option, message in (("cascade.threshold=null", "cascade.threshold is not set"),
                            ("cascade.aggregation=auto", "cascade.aggregation is 'auto'"),
                            ("cascade.slice_threshold=null", "cascade.slice_threshold is not set"),  # issue 25.4
                            ("cascade.z_rule=auto", "cascade.z_rule is 'auto'"),
                            ("cascade.min_boxed_slices=null", "cascade.min_boxed_slices is not set"),
                            (f"cascade.operating_point={tmp_path / 'none.json'}", "none.json not found")):
        assert run_main(scan.main, ["--cfg-path", str(config), "--inputs", str(inputs), "--out", str(tmp_path / "o"),
                                    "--options", option], prog="scan.py") == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_scan_takes_normalization_in_both_spellings():
    """``--normalization`` as ``python -m preprocessing`` spells it; ``--normalisation`` still works."""
    from minigpt4.commands.scan import build_parser

    base = ["--cfg-path", "eval_configs/scan_cpu.yaml", "--inputs", "a.nii.gz", "--out", "out"]
    assert build_parser().parse_args(base).normalization is None  # left out: the operating point's, else paper
    assert build_parser().parse_args([*base, "--normalization", "window"]).normalization == "window"
    assert build_parser().parse_args([*base, "--normalisation", "window"]).normalization == "window"


def test_scan_with_a_calibration_map_reports_the_likelihood_beside_the_raw_score(tmp_path, stage_paths, monkeypatch):
    """The operating point's calibration (here given directly: cascade.operating_point is the
    cascade work's key) reaches report.json, summary.csv and the scan's fingerprint."""
    import scan
    from minigpt4.commands import scan as scan_command
    from minigpt4.inference.calibration import CalibrationMap

    patient = CalibrationMap("isotonic", {"x": [0.0, 1.0], "y": [0.0, 0.4]}, {"split": "val", "n_volumes": 12, "dataset": "MSD+NIH"})
    per_slice = CalibrationMap("platt", {"a": 0.0, "b": 0.0}, target="slice P(tumor)")
    monkeypatch.setattr(scan_command, "load_stages", lambda *args, **kwargs: SingleModel(AlwaysBoxes()))
    monkeypatch.setattr(scan_command, "configured_calibration", lambda cascade: (patient, per_slice))
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    scan.main(["--cfg-path", str(scan_config(tmp_path, stage_paths)), "--inputs", str(inputs), "--out", str(out)])
    report = strict_json(out / "a_nifti" / REPORT_FILE)
    assert report["patient"]["likelihood"] == {"raw": 0.75, "calibrated": 0.3,  # 0.75 × 0.4
                                               "calibration": {"method": "isotonic", "fitted_on": "val: 12 volumes of MSD+NIH"}}
    assert {s["p_tumor_calibrated"] for s in report["slices"]} == {0.5}
    assert report["config"]["calibration"]["method"] == "isotonic"  # part of the fingerprint: a new map rescans
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        assert [r["likelihood"] for r in csv.DictReader(handle)] == ["0.3"] * 3
