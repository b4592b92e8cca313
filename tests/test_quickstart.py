"""The README's main command, shrunk to a few steps per stage: the whole cascade end to end."""

import json
import sys

import pytest

from minigpt4.commands.quickstart import main
from tests._markdown import markdown_tables


@pytest.mark.slow
def test_quickstart_smoke_runs_the_whole_cascade(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--smoke", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    # every stage trained from the previous one's best checkpoint, and was evaluated
    for stage, parent in [("stage1_pancreas_detection_cascade", "stage1_pancreas_detection"),
                          ("stage2_tumor_classification", "stage1_pancreas_detection_cascade"),
                          ("stage3_tumor_detection", "stage2_tumor_classification"),
                          ("abd_organ_detection", "stage1_pancreas_detection")]:
        saved = (tmp_path / "configs" / f"{stage}.yaml").read_text()
        assert f"init_from: {tmp_path / 'runs' / parent / 'checkpoint_best'}" in saved
        assert ("init_lr: 0.0005" in saved) == (stage == "stage2_tumor_classification")  # STAGE_OPTIONS
    for stage in ["stage1_pancreas_detection", "stage1_pancreas_detection_cascade", "stage3_tumor_detection",
                  "abd_organ_detection"]:
        metrics = json.loads((tmp_path / "eval" / stage / "metrics.json").read_text())
        assert 0.0 <= metrics["weighted"]["mean_iou"] <= 1.0 and metrics["weighted"]["n"] > 0
        assert (tmp_path / "eval" / stage / "tables.md").is_file()
    classification = json.loads((tmp_path / "eval" / "stage2_tumor_classification" / "metrics.json").read_text())
    assert set(classification) >= {"accuracy", "precision", "recall", "f1", "auc"}
    assert (tmp_path / "runs" / "stage3_tumor_detection" / "checkpoint_best" / "model.safetensors").is_file()
    # stage 1 of the cascade trains on slices without pancreas too (issue 26); Table 1's configs do not
    assert "empty_share: 0.2" in (tmp_path / "configs" / "stage1_pancreas_detection_cascade.yaml").read_text()
    assert "empty_share: 0.0" in (tmp_path / "configs" / "stage1_pancreas_detection.yaml").read_text()
    # the phantoms are windowed, and the scan and the demo follow the operating point's normalisation
    assert json.loads((tmp_path / "data" / "MSD" / "manifest.json").read_text())["parameters"]["normalization"] == "window"
    point = json.loads((tmp_path / "eval" / "cascade" / "operating_point.json").read_text())
    assert point["normalization"] == {"method": "window", "window": [-150.0, 250.0]}
    assert "cascade.operating_point=" in printed
    assert "TINY model on SYNTHETIC phantoms" in printed
    # every stage's result is printed next to what an image-blind answer gets on the same records
    assert printed.count("vs image-blind baseline, constant box (mean training box per target): mean IoU") == 4
    assert printed.count("vs image-blind baseline, always '") == 1
    assert "python demo.py --cfg-path eval_configs/demo_cpu.yaml --options model.ckpt=" in printed
    # the clinical cascade ran on every slice of the test volumes and its tables were printed
    cascade = json.loads((tmp_path / "eval" / "cascade" / "metrics.json").read_text())
    assert set(cascade) >= {"slice", "patient", "selection"}
    assert cascade["slice"]["n_slices"] == sum(1 for _ in open(tmp_path / "eval" / "cascade" / "predictions.jsonl"))
    assert "## Patient level (test volumes)" in printed
    # every table printed or written renders: a header row above each separator (issue 18 item 8)
    tables = markdown_tables(printed)
    assert markdown_tables(printed.split("## Patient level (test volumes)")[1])[0].header[0] != ""
    written = {p: markdown_tables(p.read_text()) for p in (tmp_path / "eval").rglob("tables.md")}
    assert len(written) == 7 and all(written.values()) and len(tables) >= 7
    # the paper-faithful stage 1 through the same stages 2-3, beside the cascade's (issue 26)
    assert "## Stage 1 compared (the same stages 2-3 and volumes)" in printed
    assert "| compared: `stage1_pancreas_detection` | this cascade: `stage1_pancreas_detection_cascade` |" in printed
    assert set(cascade["stage1_compared"]) == {"baseline", "this", "note"}
    # the PANORAMA path: phantoms prepared, the cascade's evaluation scored the PANORAMA way
    panorama = json.loads((tmp_path / "eval" / "cascade_panorama" / "metrics.json").read_text())["panorama"]
    assert set(panorama) >= {"auroc", "ap", "score", "ci95", "n_studies", "patient_truth"}
    assert "clinical sheet" in panorama["patient_truth"] and panorama["n_studies"] > 0
    maps = sorted((tmp_path / "eval" / "cascade_panorama" / "detection_maps").iterdir())
    assert len(maps) == panorama["n_studies"]
    assert "## PANORAMA scoring (picai_eval)" in printed and "0.92 (95 % CI 0.90–0.93)" in printed
    assert f"cascade.stages.tumor_detection={tmp_path / 'runs' / 'stage3_tumor_detection' / 'checkpoint_best'}" in printed
    # scan.py on one new volume, as a NIfTI and as a DICOM series, at the cascade's val operating point
    scan = tmp_path / "scan"
    assert sorted(p.name for p in scan.iterdir()) == ["index.html", "manifest.json", "phantom", "phantom_dicom", "scan.json",
                                                      "summary.csv"]
    for name in ("phantom", "phantom_dicom"):
        report = json.loads((scan / name / "report.json").read_text())
        assert report["config"]["threshold"] == cascade["selection"]["threshold"]
        # the whole operating point eval_cascade chose on val, through its operating_point.json (issue 25.4)
        assert report["config"]["slice_threshold"] == cascade["selection"]["slice_threshold"] is not None
        assert report["config"]["z_rule"] == cascade["selection"]["z_rule"]
        assert report["config"]["min_boxed_slices"] == cascade["min_assessed"]["min_slices"]
        assert report["config"]["operating_point"] == str(tmp_path / "eval" / "cascade" / "operating_point.json")
        assert report["config"]["normalisation"] == "window"  # from the operating point, not asked for
        assert report["patient"]["verdict"].count("slice(s)") >= 1 and "assessed" in report
        assert (scan / name / "boxes.nii.gz").is_file() and (scan / name / "report.html").is_file()
    # the same phantom read from NIfTI and from DICOM: the same slices, so the same answers
    nifti, dicom = (json.loads((scan / n / "report.json").read_text()) for n in ("phantom", "phantom_dicom"))
    assert [(s["p_tumor"], s["pancreas_answer"]) for s in nifti["slices"]] == \
        [(s["p_tumor"], s["pancreas_answer"]) for s in dicom["slices"]]
    assert (f"scan outputs (report.json, boxes.nii.gz over the CT, seg.dcm and sr.dcm for DICOM, montage.png, "
            f"report.html; index.html across volumes): {scan}") in printed


def test_printed_demo_command_installs_gradio_when_it_is_missing(monkeypatch, tmp_path):
    """After ./quickstart.sh (which installs only '.') the printed demo command must work as printed."""
    import importlib.util
    import shutil
    import tomllib

    from minigpt4.commands import quickstart

    monkeypatch.chdir(quickstart.REPO)
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable if name == "python" else None)
    config, ckpt = quickstart.REPO / "eval_configs" / "demo_cpu.yaml", tmp_path / "checkpoint_best"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real_find_spec(name, *a))
    assert quickstart.demo_command(config, [f"model.ckpt={ckpt}"]) == (
        "python -m pip install -e '.[demo]' && "
        f"python demo.py --cfg-path eval_configs/demo_cpu.yaml --options model.ckpt={ckpt}")
    extras = tomllib.loads((quickstart.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("gradio>") for req in extras["demo"])  # what the install brings
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    if real_find_spec("gradio") is not None:  # installed: the plain command
        assert quickstart.demo_command(config, [f"model.ckpt={ckpt}"]) == (
            f"python demo.py --cfg-path eval_configs/demo_cpu.yaml --options model.ckpt={ckpt}")
    # run from another folder, with another interpreter than `python`: both are spelled out
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    command = quickstart.demo_command(config, [f"model.ckpt={ckpt}"])
    assert command.startswith(f"cd {quickstart.REPO} && ") and f"{sys.executable} demo.py" in command
