"""Issue 26 / 25.4-5: stage 1's "no pancreas" answer, the 3-D consistency rule, patient scores
that do not saturate, the minimum assessed and the operating point carried from eval_cascade to
scan / demo. Hand-made inputs, hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt4.boxes import NO_BOX_ANSWER, box_problem, parse_box, says_absent, score_answer
from minigpt4.config import CascadeConfig, ConfigError
from minigpt4.inference import operating_point as op
from minigpt4.inference.patient import aggregate, assessed, box_runs, min_assessed_rule, verdict_line, z_consistent
from minigpt4.inference.pipeline import CascadeSettings, SliceResult, answer_box, apply_z_rule, patient_result
from preprocessing import slices as selection

A = (10.0, 10.0, 30.0, 30.0)
B = (12.0, 8.0, 28.0, 32.0)  # overlaps A
FAR = (60.0, 60.0, 80.0, 80.0)  # overlaps neither


# ----------------------------------------------------------------------------- the no-box answer
def test_the_no_box_answer_is_the_empty_box_read_as_no_pancreas_everywhere():
    from minigpt4.demo.service import Answer, describe_answer

    assert NO_BOX_ANSWER == "{<0><0><0><0>}"
    assert parse_box(NO_BOX_ANSWER) == (0, 0, 0, 0) and says_absent(NO_BOX_ANSWER)
    assert not says_absent("{<1><0><0><0>}") and not says_absent("no pancreas") and not says_absent(None)
    # evaluation: IoU 0 on a pancreas slice, like any miss; the cascade: no box, so no crop and no false box
    assert score_answer(NO_BOX_ANSWER, (10, 10, 20, 20), 100, 100) == ((0.0, 0.0, 0.0, 0.0), 0.0)
    assert answer_box(NO_BOX_ANSWER, 112, 112) is None
    assert box_problem(NO_BOX_ANSWER) == "it is the empty box: the model says the target is absent"
    # the demo says "absent", never draws a box
    answer = Answer(instruction="[refer] pancreas", text=NO_BOX_ANSWER, task="detection", grid_box=(0, 0, 0, 0), pixel_box=(0.0, 0.0, 0.0, 0.0))
    assert "target absent" in describe_answer(answer, 112, 112)


def test_eval_cascade_counts_a_no_box_answer_as_no_false_box():
    from minigpt4.evaluation.cascade import slice_metrics

    def row(answer: str, has_pancreas: bool) -> dict:
        found = answer_box(answer, 100, 100)
        return {"has_pancreas": has_pancreas, "has_tumor": False, "pancreas_box": None if found is None else found[1],
                "pancreas_iou": 0.0 if has_pancreas else None, "p_tumor": None, "p_tumor_gt_crop": None,
                "tumor_iou": None, "tumor_iou_alone": None, "tumor_asked": False}

    rows = [row(NO_BOX_ANSWER, False), row(NO_BOX_ANSWER, False), row("{<1><1><50><50>}", False),
            row("{<1><1><50><50>}", True)]
    m = slice_metrics(rows)
    assert (m["false_box_rate"], m["n_slices_without_pancreas"], m["pancreas_box_rate"]) == (pytest.approx(1 / 3), 3, 1.0)


def _info(volume: str, k: int, pixels: int, ratio: float, image: bool = True) -> dict:
    return {"volume_name": volume, "slice_index": k, "image": f"slices/{volume}_{k}.png" if image else None,
            "pixels_pancreas": pixels, "pancreas_bbox_ratio": ratio, "bbox_pancreas": [5, 6, 20, 30] if pixels else [0, 0, 0, 0],
            "width": 64, "height": 64}


def test_a_stage1_training_set_with_negatives_has_the_intended_share_and_answers():
    from minigpt4.data.datasets import TaskDataset

    # 4 selected pancreas slices (ratio > 0.5), 1 pancreas slice under the threshold (neither), 12 empty slices,
    # 1 empty slice without a PNG (never drawn)
    infos = [_info("a", k, 50, 0.9) for k in range(4)] + [_info("a", 4, 3, 0.1)]
    infos += [_info("b", k, 0, 0.0) for k in range(12)] + [_info("b", 12, 0, 0.0, image=False)]
    assert selection.empty_count(4, 0.5) == 4 and selection.empty_count(4, 0.2) == 1 and selection.empty_count(3, 0.0) == 0
    for share, n_empty in ((0.5, 4), (0.2, 1), (0.75, 12)):
        records = selection.select_with_empty(infos, ["a", "b"], "pancreas", 0.5, share, seed=3)
        empty = [r for r in records if r.get("no_target")]
        assert len(records) == 4 + n_empty and len(empty) == n_empty
        assert all(r["pixels_pancreas"] == 0 and r["image"] and r["bbox"] == [0, 0, 0, 0] for r in empty)
        assert [r["q_id"] for r in records] == list(range(len(records)))
        data = TaskDataset(records, "pancreas_detection", transform=lambda image: image, train=False, check=False)
        answers = [data.answer(i) for i in range(len(records))]
        assert answers.count(NO_BOX_ANSWER) == n_empty
        assert sorted(set(answers) - {NO_BOX_ANSWER}) == ["{<7><9><31><46>}"]  # [5, 6, 20, 30] on 64 px
    assert len(selection.select_balanced(infos, ["a", "b"], "pancreas", 0.5, seed=3)) == 8  # --balanced = share 0.5
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        selection.empty_count(4, 1.0)


def test_validation_multiplies_pancreas_iou_by_the_share_of_correct_no_pancreas_answers(monkeypatch):
    import minigpt4.evaluation as evaluation

    # two pancreas slices (exact box: IoU 1; a miss: IoU 0) and three empty ones (two said absent, one boxed)
    records = [{"image": f"{k}.png", "target": "pancreas", "bbox": [0, 0, 50, 50] if k < 2 else [0, 0, 0, 0],
                "width": 100, "height": 100, "dataset": "MSD", "volume_name": "v", "slice_index": k,
                **({"no_target": True} if k >= 2 else {})} for k in range(5)]
    answers = ["{<0><0><50><50>}", "{<60><60><90><90>}", NO_BOX_ANSWER, NO_BOX_ANSWER, "{<10><10><20><20>}"]
    monkeypatch.setattr(evaluation, "predict_detection", lambda model, selected, task, batch_size, feature_cache=None: [
        evaluation.detection_row(r, a) for r, a in zip(selected, answers)])
    score, metrics = evaluation.validation_score(None, records, "pancreas_detection", batch_size=8)
    assert score == pytest.approx(0.5 * 2 / 3)  # mean IoU x share said absent
    assert metrics["no_target"] == {"n": 3, "said_absent": 2}
    assert metrics["n"] == 2 and metrics["weighted"]["mean_iou"] == pytest.approx(0.5)
    # without slices lacking pancreas: the paper's score, the mean IoU
    score, metrics = evaluation.validation_score(None, records[:2], "pancreas_detection", batch_size=8)
    assert score == pytest.approx(0.5) and "no_target" not in metrics
    # a model that says "no pancreas" everywhere scores 0, not the share of empty slices
    monkeypatch.setattr(evaluation, "predict_detection", lambda model, selected, task, batch_size, feature_cache=None: [
        evaluation.detection_row(r, NO_BOX_ANSWER) for r in selected])
    assert evaluation.validation_score(None, records, "pancreas_detection", batch_size=8)[0] == 0.0
    # a subsample of empty slices only: no IoU to multiply, score 0, the counts kept
    score, metrics = evaluation.validation_score(None, records[2:], "pancreas_detection", batch_size=8)
    assert score == 0.0 and metrics["n"] == 0 and metrics["no_target"] == {"n": 3, "said_absent": 3}


def test_only_the_trainer_reads_the_slices_without_pancreas(tmp_path):
    """Training and validation (``without_target=True``) get the empty_share; the evaluation scripts
    score pancreas slices (Table 1's measure)."""
    from minigpt4.config import Config, DatasetConfig
    from minigpt4.data.datasets import load_split_records
    from tests.test_cascade import prepare_phantoms

    prepared = prepare_phantoms(tmp_path)
    cfg = Config()
    cfg.datasets = {"msd": DatasetConfig(root=str(prepared["MSD"]), task="pancreas_detection", empty_share=0.5)}
    for split in ("train", "val", "test"):
        plain = load_split_records(cfg, split)[0][3]
        mixed = load_split_records(cfg, split, without_target=True)[0][3]
        assert plain and not any(r.get("no_target") for r in plain), split
        empty = [r for r in mixed if r.get("no_target")]
        assert len(empty) == len(mixed) - len(plain) == selection.empty_count(len(plain), 0.5), split


def test_empty_share_is_a_checked_option_of_pancreas_detection_only():
    from minigpt4.config import DatasetConfig
    from preprocessing.layout import read_prepared

    assert DatasetConfig(root="x", task="pancreas_detection").empty_share == 0.0  # the paper: off by default
    with pytest.raises(ConfigError, match="empty_share"):
        DatasetConfig(root="x", task="pancreas_detection", empty_share=0.95)
    with pytest.raises(ValueError, match="empty_share= only applies to pancreas_detection"):
        read_prepared("x", "tumor_detection", "train", empty_share=0.5)


def test_answer_probability_is_the_teacher_forced_product_of_token_probabilities():
    from tests.tiny import tiny_model_config

    from minigpt4.models.minigpt_v2 import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config(), device="cpu").eval()
    images = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    question = ["[refer] give me the location of pancreas"] * 2
    answers = [NO_BOX_ANSWER, "{<1><2><30><40>}"]
    log_p = model.answer_log_probability(images, question, answers)  # one batch, two answers of other lengths
    for i, answer in enumerate(answers):
        with torch.no_grad():
            out = model(images[i:i + 1], question[:1], [answer])  # mean cross-entropy over its T tokens
        n_tokens = out.targets.shape[0]
        assert log_p[i].item() == pytest.approx(-out.loss.item() * n_tokens, rel=1e-4)
        assert log_p[i].item() < -n_tokens  # a random tiny model: below e^-1 per token
    assert torch.equal(model.answer_probability(images, question, answers), log_p.exp())


# ----------------------------------------------------------------------------- 3-D consistency
def test_z_rule_drops_an_isolated_box():
    assert z_consistent([None, A, None, None], "largest_run") == [False, False, False, False]
    assert z_consistent([None, A, None, None], "none") == [False, True, False, False]


def test_z_rule_keeps_a_run_and_drops_the_isolated_box_beside_it():
    assert z_consistent([A, None, A, B, A, None, FAR], "largest_run") == [False, False, True, True, True, False, False]


def test_z_rule_of_two_runs_keeps_the_larger():
    # run 1: slices 0-1 (2 boxes); run 2: slices 3-5 (3 boxes)
    assert z_consistent([A, B, None, A, A, B], "largest_run") == [False, False, False, True, True, True]
    # adjacent slices whose boxes do not overlap are two runs: slice 2 (FAR) breaks 0-1 from 3
    assert box_runs([A, A, FAR, A]) == [[0, 1], [2], [3]]
    # equal lengths: the larger total box area (FAR 400 px² each... A 400 too: then the first)
    big = (0.0, 0.0, 50.0, 50.0)
    assert z_consistent([A, A, None, big, big], "largest_run") == [False, False, False, True, True]
    assert z_consistent([A, A, None, A, A], "largest_run") == [True, True, False, False, False]
    with pytest.raises(ValueError, match="unknown 3-D consistency rule"):
        z_consistent([A], "median")


def test_the_rule_changes_the_patient_answer_and_says_how_much_was_assessed():
    def sl(k, box, p):
        return SliceResult(k, "", pancreas_box=box, p_tumor=p, tumor_box=(1.0, 1.0, 2.0, 2.0) if p else None)

    # an isolated false box on slice 0 with a saturated P(tumor); the pancreas run on slices 3-5
    rows = [sl(0, FAR, 0.99), sl(1, None, None), sl(2, None, None), sl(3, A, 0.2), sl(4, B, 0.1), sl(5, A, 0.3)]
    settings = CascadeSettings(threshold=0.5, z_rule="largest_run", min_boxed_slices=2)
    apply_z_rule(rows, settings.z_rule)
    assert [r.pancreas_kept for r in rows] == [False, None, None, True, True, True]
    assert rows[0].tumor_box is None  # a dropped slice's tumor box does not count either
    patient = patient_result(rows, settings)
    assert (patient.decision, patient.score, patient.n_slices_boxed) == ("no tumor", 0.3, 3)
    assert patient.assessed == {"slices_with_pancreas": 3, "slices_total": 6, "slices_boxed_by_stage1": 4,
                                "boxes_dropped_by_z_rule": 1, "min_slices_required": 2, "enough": True}
    assert patient.verdict == "no tumor found on the 3 slice(s) where a pancreas was found (3 of 6 slice(s))"
    # without the rule the isolated box decides: tumor at 0.99
    plain = [sl(0, FAR, 0.99), sl(1, None, None), sl(2, None, None), sl(3, A, 0.2), sl(4, B, 0.1), sl(5, A, 0.3)]
    apply_z_rule(plain, "none")
    assert patient_result(plain, CascadeSettings(threshold=0.5, min_boxed_slices=2)).decision == "tumor"
    # too little pancreas: inconclusive, and the line says how much was seen
    few = CascadeSettings(threshold=0.5, z_rule="largest_run", min_boxed_slices=4)
    result = patient_result(rows, few)
    assert result.decision == "inconclusive"
    assert result.verdict == ("inconclusive: a pancreas was found on 3 of 6 slice(s), fewer than the 4 needed to "
                              "assess it; no verdict")


def test_eval_patient_scores_apply_the_same_rule():
    from minigpt4.evaluation.operating_points import box_counts, patient_scores

    def rows(volume, boxes, ps, tumor):
        return [{"dataset": "MSD", "volume_name": volume, "slice_index": k, "pancreas_box": b, "p_tumor": p,
                 "has_tumor": tumor and k == 3} for k, (b, p) in enumerate(zip(boxes, ps))]

    data = rows("t", [FAR, None, A, A, B], [0.2, None, 0.6, 0.9, 0.8], True) + \
        rows("h", [FAR, None, A, A, None], [0.99, None, 0.1, 0.2, None], False)
    plain = patient_scores(data, top_k=2, min_boxed_slices=2, z_rule="none")
    ruled = patient_scores(data, top_k=2, min_boxed_slices=2, z_rule="largest_run")
    assert plain[("MSD", "h")]["scores"]["max"] == 0.99 and ruled[("MSD", "h")]["scores"]["max"] == 0.2
    assert ruled[("MSD", "t")]["scores"]["top_k_mean"] == pytest.approx(0.85)
    assert (ruled[("MSD", "h")]["n_boxed"], ruled[("MSD", "h")]["n_dropped"]) == (2, 1)
    assert box_counts(ruled) == {"kept": 5, "dropped": 2, "n_volumes": 2, "n_inconclusive": 0}


# ----------------------------------------------------------------------------- patient scores
def test_patient_scores_by_hand_and_the_logit_mean_does_not_saturate():
    ps = [0.2, None, 0.9, 0.5]
    assert aggregate(ps, "max", 2) == 0.9
    assert aggregate(ps, "top_k_mean", 2) == pytest.approx(0.7)
    assert aggregate(ps, "mean", 2) == pytest.approx(1.6 / 3)
    # logit 0.9 = 2.1972, logit 0.5 = 0 → sigmoid(1.0986) = 0.75
    assert aggregate(ps, "top_k_logit_mean", 2) == pytest.approx(0.75)
    assert aggregate([None], "top_k_logit_mean", 3) == 0.0
    # saturated slices: the plain mean of the top 3 barely moves, the logit mean keeps them apart
    low, high = [0.98, 0.98, 0.98], [0.9999, 0.9999, 0.9999]
    assert aggregate(high, "top_k_mean", 3) - aggregate(low, "top_k_mean", 3) == pytest.approx(0.0199)
    assert aggregate(low, "top_k_logit_mean", 3) == pytest.approx(0.98)
    assert aggregate(high, "top_k_logit_mean", 3) == pytest.approx(0.9999)
    assert aggregate([1.0, 1.0], "top_k_logit_mean", 2) == pytest.approx(1 - 1e-7)  # clipped, finite
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate([0.5], "median", 3)


def test_minimum_assessed_from_the_val_extents():
    rule = min_assessed_rule([3, 4, 4, 5, 6, 0])  # the 0: a val volume without pancreas, not an extent
    assert (rule["min_slices"], rule["median_extent_slices"], rule["n_volumes"]) == (2, 4.0, 5)
    assert min_assessed_rule([3, 4, 6, 7])["min_slices"] == 3  # median 5 → ceil(2.5)
    assert min_assessed_rule([30, 40, 20])["min_slices"] == 15
    assert min_assessed_rule([])["min_slices"] == 1
    assert assessed([True, False, True], [True, True, True], 3) == {
        "slices_with_pancreas": 2, "slices_total": 3, "slices_boxed_by_stage1": 3, "boxes_dropped_by_z_rule": 1,
        "min_slices_required": 3, "enough": False}
    assert verdict_line("tumor", 14, 200, 2) == "tumor suspected on the 14 slice(s) where a pancreas was found (14 of 200 slice(s))"


# ----------------------------------------------------------------------------- operating_point.json
def _point(tmp_path, **change) -> tuple:
    selection = {"aggregation": "top_k_logit_mean", "threshold": 0.7, "slice_threshold": 0.4}
    record = op.operating_point_record(selection, 3, min_assessed_rule([4, 4, 5]), "largest_run",
                                       {"pancreas_detection": {"sha256": "a" * 64}, "tumor_classification": {"sha256": "b" * 64},
                                        "tumor_detection": None}, 12, "MSD+NIH")
    record.update(change)
    path = tmp_path / "operating_point.json"
    path.write_text(json.dumps(record))
    return path, record


def test_operating_point_round_trip_into_the_scan_settings(tmp_path):
    path, record = _point(tmp_path)
    assert record["checkpoints"] == {"stage1": "a" * 64, "stage2": "b" * 64, "stage3": None}
    assert record["z_rule"] == {"name": "largest_run", "min_run": 2, "rule": record["z_rule"]["rule"]}
    assert op.read_operating_point(path) == record
    settings, point = op.scan_settings(CascadeConfig(operating_point=str(path), crop_margin=2), "scan.yaml", batch_size=4)
    assert point == record
    assert (settings.threshold, settings.slice_threshold, settings.aggregation, settings.top_k, settings.z_rule,
            settings.min_boxed_slices, settings.crop_margin, settings.batch_size) == \
        (0.7, 0.4, "top_k_logit_mean", 3, "largest_run", 2, 2, 4)
    assert op.z_rule_record("none") is None
    path_none, _ = _point(tmp_path, z_rule=None)
    assert op.scan_settings(CascadeConfig(operating_point=str(path_none)), "x")[0].z_rule == "none"


def test_a_scan_config_without_the_whole_operating_point_is_refused(tmp_path):
    explicit = dict(threshold=0.5, slice_threshold=0.3, aggregation="max", z_rule="none", min_boxed_slices=2)
    settings, point = op.scan_settings(CascadeConfig(**explicit), "scan.yaml")
    assert point is None and (settings.threshold, settings.stage3_gate, settings.min_boxed_slices) == (0.5, 0.3, 2)
    for key, unset, said in (("slice_threshold", None, "not set"), ("threshold", None, "not set"),
                             ("aggregation", "auto", "'auto'"), ("z_rule", "auto", "'auto'"),
                             ("min_boxed_slices", None, "not set")):
        with pytest.raises(ConfigError, match=f"scan.yaml: cascade.{key} is {said}; set cascade.operating_point"):
            op.scan_settings(CascadeConfig(**{**explicit, key: unset}), "scan.yaml")
    path, _ = _point(tmp_path)
    with pytest.raises(ConfigError, match="cascade.operating_point is set, so cascade.threshold must not be"):
        op.scan_settings(CascadeConfig(operating_point=str(path), threshold=0.2), "scan.yaml")


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "not an operating point of format 1"),
    ({"slice_threshold": None}, "slice_threshold must be a number in \\[0, 1\\]"),
    ({"threshold": 1.5}, "threshold must be a number"),
    ({"aggregation": "auto"}, "aggregation 'auto' is not one of"),
    ({"min_assessed": {"min_slices": 0}}, "min_assessed.min_slices must be a positive integer"),
    ({"z_rule": {"name": "median"}}, "z_rule must be null or have a name"),
    ({"normalization": {"method": "clahe", "window": [-150, 250]}}, "normalization must be null or"),
    ({"normalization": "window"}, "normalization must be null or"),
])
def test_a_broken_operating_point_file_is_named(tmp_path, change, message):
    path, _ = _point(tmp_path, **change)
    with pytest.raises(ConfigError, match=f"operating_point.json: {message}"):
        op.read_operating_point(path)


def test_the_scan_normalises_as_the_operating_points_folders_were_prepared(tmp_path):
    windowed = {"method": "window", "window": [-150.0, 250.0]}
    path, record = _point(tmp_path, normalization=windowed)
    point = op.read_operating_point(path)
    assert op.scan_normalization(point, None, "scan.yaml") == "window"  # recorded: used without being asked
    assert op.scan_normalization(point, "window", "scan.yaml") == "window"
    with pytest.raises(ConfigError, match="scan.yaml: --normalization paper, but the operating point was chosen on "
                                          "slices prepared with --normalization window"):
        op.scan_normalization(point, "paper", "scan.yaml")
    with pytest.raises(ConfigError, match="windowed to \\[-100.0, 200.0\\] HU; scan.py windows to \\[-150.0, 250.0\\]"):
        op.scan_normalization({**point, "normalization": {"method": "window", "window": [-100.0, 200.0]}}, None, "scan.yaml")
    # not recorded (an older file, or no operating point): what was asked, else the paper's
    assert op.scan_normalization({**point, "normalization": None}, "window", "x") == "window"
    assert op.scan_normalization(None, None, "x") == "paper"
    assert op.operating_point_record({"aggregation": "max", "threshold": 0.5, "slice_threshold": 0.5}, 3,
                                     min_assessed_rule([4]), "none", {}, 1, "MSD")["normalization"] is None


def test_the_cascade_folders_must_share_one_normalization(tmp_path):
    from minigpt4.config import Config, DatasetConfig
    from minigpt4.evaluation.cascade import folders_normalization

    roots = {}
    for name, method in (("a", "window"), ("b", "window"), ("c", "paper")):
        roots[name] = tmp_path / name
        roots[name].mkdir()
        (roots[name] / "manifest.json").write_text(json.dumps({"dataset": "MSD", "status": "complete", "parameters": {
            "normalization": method, "window": [-150, 250]}}))
    cfg = Config()
    cfg.datasets = {n: DatasetConfig(root=str(roots[n]), task="pancreas_detection") for n in ("a", "b")}
    assert folders_normalization(cfg) == {"method": "window", "window": [-150.0, 250.0]}
    cfg.datasets["c"] = DatasetConfig(root=str(roots["c"]), task="pancreas_detection")
    with pytest.raises(ConfigError, match="different slice normalisations \\(datasets.a: window .* datasets.c: paper"):
        folders_normalization(cfg)


def test_an_operating_point_of_other_weights_is_refused(tmp_path):
    from minigpt4.io import file_sha256

    weights = tmp_path / "stage1"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights")
    path, _ = _point(tmp_path, checkpoints={"stage1": file_sha256(weights / "model.safetensors")})
    op.check_checkpoints(op.read_operating_point(path), {"pancreas_detection": str(weights)}, "scan.yaml")
    (weights / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ConfigError, match="cascade.stages.pancreas_detection .* but the operating point was chosen"):
        op.check_checkpoints(op.read_operating_point(path), {"pancreas_detection": str(weights)}, "scan.yaml")
