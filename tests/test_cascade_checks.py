"""``eval_cascade.py`` numbers a reviewer can trust (issue 18 items 1, 7, 9, 11; issue 19 items 5, 6):
the leakage guard for every stage, stage identity, the slice gate chosen on val, inconclusive
volumes, screening operating points, NaN stops, the output-folder rule and an empty test split,
each checked before the model is loaded."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_cascade
from minigpt4.evaluation import cascade, operating_points
from minigpt4.inference import pipeline
from minigpt4.inference.patient import AGGREGATIONS
from minigpt4.provenance import check_cascade_leakage
from tests.test_cascade import STAGES, _cascade_config, prepare_phantoms
from tests.tiny import random_checkpoints, tiny_model_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    return prepare_phantoms(tmp_path_factory.mktemp("cascade_data"))


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the check")


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if eval_cascade gets as far as building the stages."""
    import minigpt4.commands.eval_cascade as eval_cascade_command
    import minigpt4.models.stages as stages

    monkeypatch.setattr(stages, "load_stages", _no_model)
    monkeypatch.setattr(eval_cascade_command, "load_stages", _no_model)  # bound where it is used
    monkeypatch.setattr(stages, "build_model", _no_model)


def _save(folder: Path, provenance=None, tasks=None) -> str:
    """A tiny checkpoint with the given provenance record and tasks (weights do not matter here)."""
    from minigpt4.models.checkpoints import save_checkpoint
    from minigpt4.models.minigpt_v2 import build_model

    return str(save_checkpoint(build_model(tiny_model_config()), folder, provenance=provenance, tasks=tasks).parent)


def _provenance(tmp_path: Path, name: str, datasets: dict, init_from=None) -> dict:
    """What the trainer records for a run on ``datasets`` ({name: (root, task)}) from ``init_from``."""
    from minigpt4.config import Config, DatasetConfig
    from minigpt4.provenance import training_provenance

    cfg = Config(datasets={n: DatasetConfig(root=str(r), task=t) for n, (r, t) in datasets.items()})
    cfg.run.output_dir = str(tmp_path / "runs" / name)
    cfg.model.init_from = init_from
    return training_provenance(cfg)


# ----------------------------------------------------------------------------- 18.1 leakage
def test_eval_cascade_stops_on_a_stage_trained_on_cascade_test_volumes(tmp_path, prepared, no_model, capsys):
    """The issue's case: a TC folder imported without --split-from puts every cascade test volume into
    stage 2's train split; stage 3, trained from stage 2, inherits the leak through its recorded chain."""
    from minigpt4.cli import run_main
    from minigpt4.provenance import LeakageError, split_keys
    from preprocessing.tc import import_tc

    import_tc(prepared["TC"] / "slices", tmp_path / "TC_imported", test_ratio=0, val_ratio=0)  # everything → train
    s1 = _save(tmp_path / "s1", _provenance(tmp_path, "s1", {"msd": (prepared["MSD"], "pancreas_detection"),
                                                                "nih": (prepared["NIH"], "pancreas_detection")}),
               ["pancreas_detection"])
    s2 = _save(tmp_path / "s2", _provenance(tmp_path, "s2", {"tc": (tmp_path / "TC_imported", "tumor_classification")},
                                            init_from=s1), ["tumor_classification"])
    s3 = _save(tmp_path / "s3", _provenance(tmp_path, "s3", {}, init_from=s2), ["tumor_detection"])
    paths = dict(zip(STAGES, (s1, s2, s3)))
    config = _cascade_config(tmp_path, prepared, paths, tiny_model_config())
    with pytest.raises(LeakageError) as caught:
        eval_cascade.main(["--cfg-path", str(config)])
    message = str(caught.value)
    test_keys = split_keys(prepared["MSD"], "test") | split_keys(prepared["NIH"], "test")
    crops = {p.name.split("_slice_")[0] for p in (prepared["TC"] / "slices").glob("*.png")}
    leaked = sorted(k for k in test_keys if k[1] in crops)
    assert leaked, "the phantom TC folder holds crops of test volumes"
    assert f"stage tumor_classification: checkpoint {os.path.abspath(s2)}: " in message
    assert f"stage tumor_detection: checkpoint {os.path.abspath(s3)}: " in message
    assert "an ancestor of checkpoint" in message  # stage 3 is caught through stage 2's record
    assert "stage pancreas_detection" not in message  # stage 1 trained on train volumes only
    for dataset, volume in leaked:
        assert f"{dataset} {volume} is in the cascade's test split" in message
    # the same from the command line: one error, exit 2, nothing written
    assert run_main(eval_cascade.main, ["--cfg-path", str(config)], prog="eval_cascade.py") == 2
    err = capsys.readouterr().err
    assert "eval_cascade.py: error: stage tumor_classification: checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cascade_leakage_passes_honest_stages_and_needs_provenance(tmp_path, prepared):
    from minigpt4.config import load_config
    from minigpt4.provenance import ProvenanceError

    s1 = _save(tmp_path / "s1", _provenance(tmp_path, "s1", {"msd": (prepared["MSD"], "pancreas_detection")}))
    s2 = _save(tmp_path / "s2", _provenance(tmp_path, "s2", {"tc": (prepared["TC"], "tumor_classification")}, init_from=s1))
    s3 = _save(tmp_path / "s3", _provenance(tmp_path, "s3", {}, init_from=s2))
    config = _cascade_config(tmp_path, prepared, dict(zip(STAGES, (s1, s2, s3))), tiny_model_config())
    reports = check_cascade_leakage(load_config(config))  # build_tc inherits the cascade's split
    assert len(reports) == 6 and all(not r.leaks for r in reports)  # 3 stages × val, test
    assert [len(r.runs) for r in reports[:3]] == [1, 2, 3]  # each stage's recorded chain
    bare = _save(tmp_path / "bare")  # an own checkpoint that records no provenance
    config = _cascade_config(tmp_path, prepared, dict(zip(STAGES, (s1, bare, s3))), tiny_model_config())
    with pytest.raises(ProvenanceError, match="without recorded provenance"):
        check_cascade_leakage(load_config(config))
    check_cascade_leakage(load_config(config), allow_unknown=True)  # --allow-unknown-provenance


# ----------------------------------------------------------------------------- 19.5 stage identity
def test_checkpoints_record_their_task_and_stages_refuse_the_wrong_one(tmp_path, monkeypatch, caplog):
    import minigpt4.models.stages as stages
    from minigpt4.config import Config, DatasetConfig
    from minigpt4.provenance import PROVENANCE_SCHEMA
    from minigpt4.models.checkpoints import TASKS_KEY, checkpoint_tasks, read_metadata
    from minigpt4.models.minigpt_v2 import build_model
    from minigpt4.training.state import write_checkpoint
    from tests.test_checkpoints import release_state, save_release_pth

    # the trainer writes the run's tasks into the checkpoint header
    cfg = Config(datasets={"abd": DatasetConfig(root="x", task="organ_detection")})
    folder = write_checkpoint(build_model(tiny_model_config()), cfg, tmp_path / "run", "checkpoint_epoch_0", {})
    assert json.loads(read_metadata(folder)[2][TASKS_KEY]) == ["organ_detection"]
    sabd = str(folder)
    s1, s2, s3 = (_save(tmp_path / s, tasks=[s]) for s in STAGES)
    assert checkpoint_tasks(s2) == ["tumor_classification"]
    # a checkpoint saved before the tasks key: the tasks of its recorded provenance's datasets
    old = _save(tmp_path / "old", {"schema": PROVENANCE_SCHEMA, "runs": [
        {"run": "r", "datasets": {"tc": {"root": "t", "task": "tumor_classification", "train": [], "val": []}}}]})
    assert checkpoint_tasks(old) == ["tumor_classification"]
    monkeypatch.setattr(stages, "build_model", _no_model)  # the check reads headers only
    for given, wrong in [({"pancreas_detection": s2, "tumor_classification": s2, "tumor_detection": s3},
                          ["cascade.stages.pancreas_detection: " + s2 + " was trained for tumor_classification, not pancreas_detection"]),
                         ({"pancreas_detection": sabd, "tumor_classification": s2, "tumor_detection": s3},
                          [f"cascade.stages.pancreas_detection: {sabd} was trained for organ_detection, not pancreas_detection"]),
                         ({s: s1 for s in STAGES},
                          [f"cascade.stages.tumor_classification: {s1} was trained for pancreas_detection, not tumor_classification",
                           f"cascade.stages.tumor_detection: {s1} was trained for pancreas_detection, not tumor_detection"])]:
        with pytest.raises(stages.StageTaskError) as caught:
            stages.load_stages(tiny_model_config(), given)
        for line in wrong:
            assert line in str(caught.value)
        assert str(caught.value).count(" was trained for ") == len(wrong)
    # a foreign checkpoint records no task: a warning, not a refusal
    save_release_pth(tmp_path / "release.pth", release_state(("q_proj", "v_proj")))
    with caplog.at_level(logging.WARNING, logger="minigpt4.models.stages"):
        warnings = stages.check_stage_tasks({"pancreas_detection": s1, "tumor_classification": str(tmp_path / "release.pth"),
                                             "tumor_detection": s3})
    assert warnings == [f"cascade.stages.tumor_classification: {tmp_path / 'release.pth'} records no task (a foreign or "
                        "older checkpoint): cannot check that it is a tumor_classification model"]
    assert warnings[0] in caplog.text
    with pytest.raises(stages.StageTaskError, match="trained for tumor_classification, not tumor_detection"):
        stages.check_stage_tasks({"tumor_detection": old})


def test_eval_cascade_refuses_a_wrong_stage_before_the_model(tmp_path, prepared, no_model, capsys):
    from minigpt4.cli import run_main

    paths = random_checkpoints(tmp_path / "ckpt", tiny_model_config(), STAGES)
    paths["tumor_detection"] = paths["pancreas_detection"]
    config = _cascade_config(tmp_path, prepared, paths, tiny_model_config())
    assert run_main(eval_cascade.main, ["--cfg-path", str(config)], prog="eval_cascade.py") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"eval_cascade.py: error: checkpoint of the wrong task for its cascade stage: cascade.stages.tumor_detection: "
                   f"{paths['pancreas_detection']} was trained for pancreas_detection, not tumor_detection")


# ----------------------------------------------------------------------------- 18.7 slice gate, TC slices
def _row(dataset, tumor, p, p_gt, ratio=0.5, pancreas=True):
    return {"dataset": dataset, "has_pancreas": pancreas, "has_tumor": tumor, "p_tumor": p, "p_tumor_gt_crop": p_gt,
            "tc_label": cascade.tc_label({"dataset": dataset, "pancreas_bbox_ratio": ratio, "pixels_tumor": int(tumor)}),
            "pancreas_box": None if p is None else (1, 1, 5, 5), "pancreas_iou": 0.5, "tumor_asked": False,
            "tumor_iou": 0.0 if tumor else None, "tumor_iou_alone": 0.0 if tumor else None}


def test_tc_slices_auc_on_all_and_boxed_slices_and_accuracy_at_the_slice_threshold():
    rows = [_row("MSD", True, None, 0.9),   # A: tumor, stage 1 gave no box (P = 0 for the cascade), GT crop 0.9
            _row("MSD", True, 0.8, 0.7),    # B
            _row("NIH", False, 0.3, 0.2),   # C
            _row("NIH", False, 0.6, 0.95),  # D
            _row("MSD", False, 0.99, 0.99),  # E: MSD without tumor: not a TC slice (another task)
            _row("NIH", False, 0.7, 0.7, ratio=0.0)]  # F: a box of zero area: `preprocessing tc` crops none
    assert [r["tc_label"] for r in rows] == [True, True, False, False, None, None]
    m = cascade.slice_metrics(rows, 0.5)
    # all TC slices: yes 0, 0.8 vs no 0.3, 0.6 → pairs 0, 0, 1, 1
    assert (m["tc_auc_predicted_crops"], m["n_tc_slices"], m["n_tc_tumor_slices"]) == (0.5, 4, 2)
    # boxed only: yes 0.8 vs no 0.3, 0.6
    assert (m["tc_auc_predicted_crops_boxed"], m["n_tc_slices_boxed"], m["n_tc_tumor_slices_boxed"]) == (1.0, 3, 1)
    # GT crops: yes 0.9, 0.7 vs no 0.2, 0.95 → pairs 1, 0, 1, 0
    assert (m["tc_auc_gt_crops"], m["n_tc_slices_gt_crop"]) == (0.5, 4)
    # at 0.5: predicted A no ✗, B yes ✓, C no ✓, D yes ✗; GT crops A ✓ B ✓ C ✓ D ✗
    assert (m["tc_accuracy_predicted_crops"], m["tc_accuracy_gt_crops"], m["slice_threshold"]) == (0.5, 0.75, 0.5)


def test_slice_threshold_is_chosen_on_val_slices_apart_from_the_patient_threshold():
    val = [{"p_tumor": p, "has_tumor": t} for p, t in [(0.9, True), (0.4, True), (0.35, False), (0.2, False), (None, True)]]
    # J: t=0.9 → 0.5; t=0.4 → 1 + 1 − 1 = 1; t=0.35 → 1 + 0.5 − 1 = 0.5
    assert operating_points.choose_slice_threshold(val, None) == {
        "n_val_slices_scored": 4, "n_val_tumor_slices_scored": 2, "slice_threshold": 0.4,
        "slice_threshold_rule": "Youden's J of slice P(tumor) on val"}
    assert operating_points.choose_slice_threshold(val, 0.7)["slice_threshold"] == 0.7
    val_patients = {("NIH", "v"): {"dataset": "NIH", "label": False, "scores": dict.fromkeys(AGGREGATIONS, 0.2), "n_boxed": 2,
                                   "inconclusive": False}}
    assert operating_points.select_operating_point(val_patients, "max", None)["threshold_rule"] == \
        "0.5: the conclusive val volumes hold one class only"  # not called Youden's J
    one_class = operating_points.choose_slice_threshold([{"p_tumor": 0.3, "has_tumor": False}], None)
    assert one_class["slice_threshold"] == 0.5 and "one class only" in one_class["slice_threshold_rule"]


class ScriptedModel:
    """A scripted double of one checkpoint: a pancreas box on the slices in ``boxed`` (their model
    images' bytes; None: every slice); P(yes)
    from the crop's brightness (``nan_from``: NaN from that stage-2 call on); a tumor box on asked slices."""

    def __init__(self, boxed: set | None = None, nan_from: int | None = None) -> None:
        from minigpt4.data.transforms import ImageTransform

        self.image_transform = ImageTransform(16)
        self.boxed, self.nan_from, self.classified = boxed, nan_from, 0

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        if "tumor" in instructions[0]:
            return ["{<40><40><60><60>}"] * len(instructions)
        return ["{<25><25><75><75>}" if self.boxed is None or image.numpy().tobytes() in self.boxed else "none"
                for image in images]

    def yes_probability(self, images, questions):
        p = torch.sigmoid(4 * images[:, 0].mean(dim=(1, 2)) + 2)
        for i in range(len(p)):
            if self.nan_from is not None and self.classified + i >= self.nan_from:
                p[i] = math.nan
        self.classified += len(p)
        return p


class ScriptedStages(pipeline.SingleModel):
    shares_tower = False

    def __init__(self, model) -> None:
        super().__init__(model)
        self.sources = {s: f"scripted {s}" for s in STAGES}


def test_evaluate_gates_stage_3_with_the_slice_threshold_and_reports_inconclusive_volumes(tmp_path, prepared, monkeypatch):
    from minigpt4.config import load_config
    from minigpt4.io import read_jsonl

    monkeypatch.setattr(cascade, "checkpoint_identity", lambda path: {"path": path})
    paths = random_checkpoints(tmp_path / "ckpt", tiny_model_config(), STAGES)
    config = _cascade_config(tmp_path, prepared, paths, tiny_model_config(), threshold=1.0)  # no volume called tumor
    cfg = load_config(config, ["cascade.min_boxed_slices=3", "cascade.aggregation=top_k_mean"])
    # stage 1 boxes every val slice, every slice of the first test volume and one slice of the others
    model = ScriptedModel(boxed=set())
    val, test = cascade.load_volumes(cfg, "val"), cascade.load_volumes(cfg, "test")
    chosen = [r for rs in val.values() for r in rs] + list(test.values())[0] + [rs[4] for rs in list(test.values())[1:]]
    for image in cascade._read_slices(chosen):
        model.boxed.add(model.image_transform(image).numpy().tobytes())
    metrics = cascade.evaluate(cfg, ScriptedStages(model), make_figures=False, volumes=(val, test))
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    t = metrics["selection"]["slice_threshold"]
    assert metrics["selection"]["slice_threshold_rule"] == "Youden's J of slice P(tumor) on val"
    assert metrics["selection"]["threshold"] == 1.0  # the patient threshold gates no slice
    assert all(r["tumor_asked"] == (r["p_tumor"] is not None and r["p_tumor"] >= t) for r in rows)
    assert any(r["tumor_asked"] for r in rows)
    # inconclusive: fewer than 3 boxed slices, counted per split, never scored "no tumor"
    boxed = {}
    for r in rows:
        boxed[f"{r['dataset']}/{r['volume_name']}"] = boxed.get(f"{r['dataset']}/{r['volume_name']}", 0) + (r["pancreas_box"] is not None)
    assert {v: m["inconclusive"] for v, m in metrics["volumes"].items()} == {v: n < 3 for v, n in boxed.items()}
    assert metrics["inconclusive"]["test"] == metrics["patient"]["n_inconclusive"] == sum(n < 3 for n in boxed.values())
    assert list(boxed.values()) == [8] + [1] * (len(test) - 1) and metrics["inconclusive"]["val"] == 0
    p = metrics["patient"]
    assert p["inconclusive_as_positive"]["n_volumes"] == p["n_volumes"]
    assert p["inconclusive_excluded"]["n_volumes"] == p["n_volumes"] - p["n_inconclusive"]
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert "never scored as \"no tumor\"" in tables and "| as positive |" in tables and "| excluded |" in tables
    assert "0.876" in tables and "tumor AUC on TC slices with a predicted box" in tables
    # issue 26 / 25.4: every rule considered has its val and test AUC; the chosen operating point is one file
    assert [(r["z_rule"], r["aggregation"]) for r in metrics["rules"]] == [
        (z, m) for z in ("none", "largest_run") for m in ("max", "top_k_mean", "top_k_logit_mean", "mean")]
    assert sum(r["selected"] for r in metrics["rules"]) == 1
    assert all({"val_auc", "test_auc_inconclusive_excluded", "test_auc_inconclusive_as_positive"} <= set(r)
               for r in metrics["rules"])
    # the isolated boxes of the other test volumes are dropped by largest_run, none dropped by none
    assert metrics["z_rule"]["boxes"]["none"]["test"] == {"kept": 8 + len(test) - 1, "dropped": 0,
                                                          "n_volumes": len(test), "n_inconclusive": len(test) - 1}
    assert metrics["z_rule"]["boxes"]["largest_run"]["test"]["dropped"] == len(test) - 1
    assert "## Patient rules considered" in tables and "kept /" in tables
    point = json.loads((tmp_path / "out" / "operating_point.json").read_text())
    assert set(point) == {"format", "chosen_on", "checkpoints", "aggregation", "top_k", "threshold", "slice_threshold",
                          "min_assessed", "z_rule", "calibration", "normalization"}
    assert (point["format"], point["chosen_on"]["split"], point["chosen_on"]["n_volumes"]) == (1, "val", len(val))
    assert (point["aggregation"], point["threshold"], point["slice_threshold"]) == ("top_k_mean", 1.0, t)
    assert point["min_assessed"]["min_slices"] == 3 and point["calibration"] is None
    assert point["z_rule"] == (None if metrics["selection"]["z_rule"] == "none" else
                               {"name": "largest_run", "min_run": 2, "rule": point["z_rule"]["rule"]})


def test_patient_result_is_inconclusive_below_the_configured_minimum():
    def slices(boxed):
        return [pipeline.SliceResult(k, "", pancreas_box=(1.0, 1.0, 4.0, 4.0) if b else None, p_tumor=0.9 if b else None)
                for k, b in enumerate(boxed)]

    two = slices([True, False, True])
    assert pipeline.patient_result(two, pipeline.CascadeSettings(threshold=0.5)).decision == "tumor"
    assert pipeline.patient_result(two, pipeline.CascadeSettings(threshold=0.5, min_boxed_slices=3)).decision == "inconclusive"
    assert pipeline.patient_result(slices([False]), pipeline.CascadeSettings(threshold=0.5)).decision == "inconclusive"


# ----------------------------------------------------------------------------- 18.9 inconclusive, both ways
def test_patient_metrics_count_inconclusive_volumes_both_ways():
    rows = []
    for name, (label, score, boxed) in {"t1": (True, 0.9, 3), "t2": (True, 0.0, 1), "n1": (False, 0.2, 4),
                                        "n2": (False, 0.0, 0)}.items():
        rows += [{"dataset": "MSD", "volume_name": name, "has_tumor": label and k == 0, "p_tumor": score if k < boxed else None,
                  "pancreas_box": (1, 1, 5, 5) if k < boxed else None} for k in range(4)]
    patients = operating_points.patient_scores(rows, top_k=2, min_boxed_slices=2)
    assert {k[1]: v["inconclusive"] for k, v in patients.items()} == {"t1": False, "t2": True, "n1": False, "n2": True}
    m = operating_points.patient_metrics(patients, dict.fromkeys(AGGREGATIONS, 0.5), n_boot=0, seed=0)
    assert (m["n_volumes"], m["n_tumor"], m["n_inconclusive"], m["n_inconclusive_tumor"]) == (4, 2, 2, 1)
    pos = m["inconclusive_as_positive"]["max"]
    # as positive: t1 0.9, t2 +inf vs n1 0.2, n2 +inf → pairs 1, 0, 1, ½ → AUC 0.625; n2 is a false positive
    assert (pos["auc"], pos["sensitivity"], pos["specificity"]) == (0.625, 1.0, 0.5)
    excluded = m["inconclusive_excluded"]["max"]
    assert (m["inconclusive_excluded"]["n_volumes"], excluded["auc"], excluded["sensitivity"], excluded["specificity"]) == \
        (2, 1.0, 1.0, 1.0)
    json.dumps(m, allow_nan=False)  # +inf never leaves as a number


# ----------------------------------------------------------------------------- 18.11 screening points
def test_screening_thresholds_by_hand():
    assert [operating_points.negatives_needed(s) for s in (0.95, 0.99, 0.999)] == [20, 100, 1000]
    negatives = [k / 100 for k in range(20)]  # 0.00 … 0.19
    positives = [0.185, 0.5, 0.05]
    labels = [False] * 20 + [True] * 3
    scores = negatives + positives
    # ≥ 95 % of 20: one negative may be called; the lowest such threshold is 0.185 (0.19 called, 0.18 not)
    assert operating_points.screening_threshold(labels, scores, 0.95) == 0.185
    assert operating_points.sensitivity_specificity(np.array(labels), np.array(scores), 0.185) == (pytest.approx(2 / 3), 0.95)
    # 100 %: above every negative
    assert operating_points.screening_threshold(labels, scores, 1.0) == 0.5
    assert operating_points.screening_threshold([False, False], [0.3, 0.3], 1.0) > 0.3  # nothing called positive


def test_operating_points_chosen_on_val_with_test_rates_and_the_99_percent_rule():
    def patients(scores: dict) -> dict:
        return {("MSD", n): {"dataset": "MSD", "label": lab, "scores": dict.fromkeys(AGGREGATIONS, s), "n_boxed": 1,
                             "inconclusive": s is None} for n, (lab, s) in scores.items()}

    val = patients({**{f"n{k}": (False, k / 100) for k in range(20)}, "p1": (True, 0.185), "p2": (True, 0.5),
                    "p3": (True, 0.05), "u": (True, None)})
    test = patients({"a": (True, 0.9), "b": (True, 0.1), "c": (False, 0.3), "d": (False, 0.01), "e": (True, None)})
    selection = {"aggregation": "max", "threshold": 0.5, "threshold_rule": "Youden's J on val"}
    points = operating_points.operating_points(val, test, selection, n_boot=0, seed=0)
    assert points["n_val_negative"] == 20
    p95 = points["specificity_95"]
    assert (p95["threshold"], p95["val_specificity"]) == (0.185, 0.95)
    # test at 0.185: a called, b missed, c false positive, d correct; e inconclusive
    assert (p95["test"]["inconclusive_excluded"]["sensitivity"], p95["test"]["inconclusive_excluded"]["specificity"]) == (0.5, 0.5)
    assert p95["test"]["inconclusive_as_positive"]["sensitivity"] == pytest.approx(2 / 3)
    p99 = points["specificity_99"]
    assert p99["threshold"] is None and "test" not in p99
    assert p99["reason"] == "val has 20 negative volume(s); verifying specificity >= 99% needs at least 100 (one false positive in 100)"
    assert points["youden"]["threshold"] == 0.5 and points["youden"]["test"]["inconclusive_excluded"]["sensitivity"] == 0.5
    with_ci = operating_points.operating_points(val, test, selection, n_boot=50, seed=0)["specificity_95"]["test"]["inconclusive_excluded"]
    assert set(with_ci["ci95"]) == {"sensitivity", "specificity"}
    table = cascade.cascade_tables({
        "slice": cascade.slice_metrics([], None), "selection": {**selection, "n_val_volumes": 24, "n_val_inconclusive": 1,
                                                                "n_val_tumor": 3, "notes": [], "slice_threshold_rule": "x"},
        "patient": {**operating_points.patient_metrics(test, dict.fromkeys(AGGREGATIONS, 0.5), 0, 0), "operating_points": points,
                    "pancreas_iou_3d": None, "n_pancreas_volumes": 0, "tumor_iou_3d": None, "n_tumor_volumes": 0},
        "top_k": 3, "min_boxed_slices": 1})
    assert "| specificity >= 99% | not chosen: val has 20 negative volume(s)" in table
    assert "| specificity >= 95% | 0.185 (0.667, 0.950) | excluded | 0.500 | 0.500 |" in table
    assert "PANDA" in table and "92.9 % at specificity 99.9 %" in table


# ----------------------------------------------------------------------------- 19.6 NaN
def test_a_nan_p_yes_stops_naming_the_volume_and_first_slice(tmp_path, prepared):
    from minigpt4.config import load_config

    cfg = load_config(_cascade_config(tmp_path, prepared, {}, tiny_model_config()))
    volumes = cascade.load_volumes(cfg, "val")
    (dataset, name), records = next(iter(volumes.items()))
    model = ScriptedModel(nan_from=2)  # every slice boxed; the third crop classified is NaN
    with pytest.raises(FloatingPointError) as caught:
        cascade.predict_split(ScriptedStages(model), volumes, "val", None, 0, 1, False)
    assert str(caught.value).startswith(f"val volume {dataset}/{name}, slice {records[2]['slice_index']}: stage 2 "
                                        "(tumor_classification, scripted tumor_classification) gave P(yes) = nan")


# ----------------------------------------------------------------------------- 19.3 / 19.1 output folder, empty test
def test_eval_cascade_refuses_a_foreign_output_folder_and_an_empty_test_split(tmp_path, prepared, no_model):
    from minigpt4.outputs import OutputFolderError

    paths = random_checkpoints(tmp_path / "ckpt", tiny_model_config(), STAGES)
    config = _cascade_config(tmp_path, prepared, paths, tiny_model_config())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="run.output_dir|not empty|--overwrite"):
        eval_cascade.main(["--cfg-path", str(config)])
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    # an empty test split stops before the model (and before the output folder is touched)
    folders = {}
    for ds in ("MSD", "NIH"):
        folders[ds] = tmp_path / "data" / ds
        shutil.copytree(prepared[ds], folders[ds])
        split = json.loads((folders[ds] / "annotations" / "split.json").read_text())
        split["train"] += split["test"]
        split["test"] = []
        (folders[ds] / "annotations" / "split.json").write_text(json.dumps(split))
    config = _cascade_config(tmp_path / "data", folders, paths, tiny_model_config())
    with pytest.raises(ValueError, match="the test split holds no volume"):
        eval_cascade.main(["--cfg-path", str(config)])
    assert not (tmp_path / "data" / "out").exists()
