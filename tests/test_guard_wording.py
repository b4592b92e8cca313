"""Tables say what they measured (issue 25, items 6 and 8)."""

from __future__ import annotations

import json

import eval_detection
from minigpt4.evaluation import cascade, operating_points
from tests.test_eval_entrypoints import QUICKSTART_EVAL


def _table(rows: list[dict]) -> str:
    selection = {"aggregation": "max", "threshold": 0.5, "threshold_rule": "r", "n_val_volumes": 2,
                 "n_val_inconclusive": 0, "n_val_tumor": 1, "notes": [], "slice_threshold_rule": "x"}
    test = {("MSD", "a"): {"dataset": "MSD", "label": True, "scores": {"max": 0.9, "top_k_mean": 0.9}, "n_boxed": 3,
                           "inconclusive": False},
            ("NIH", "b"): {"dataset": "NIH", "label": False, "scores": {"max": 0.1, "top_k_mean": 0.1}, "n_boxed": 3,
                           "inconclusive": False}}
    points = operating_points.operating_points(test, test, selection, n_boot=0, seed=0)
    return cascade.cascade_tables({
        "slice": cascade.slice_metrics(rows, 0.5), "selection": selection,
        "patient": {**operating_points.patient_metrics(test, {"max": 0.5, "top_k_mean": 0.5}, 0, 0),
                    "operating_points": points, "pancreas_iou_3d": None, "n_pancreas_volumes": 0, "tumor_iou_3d": None,
                    "n_tumor_volumes": 0},
        "top_k": 3, "min_boxed_slices": 1})


def test_the_ground_truth_crop_row_says_how_it_differs_from_table_2():
    row = next(line for line in _table([]).splitlines() if "crops from the ground-truth box |" in line)
    assert "same task and inputs as Table 2" not in row
    assert row.endswith("| 0.876 (Table 2; not the same measure: the paper balanced the classes by down-sampling and "
                        "scored the model's own yes/no, here every TC slice counts, unbalanced, and yes = P(yes) >= a "
                        "slice threshold chosen on val slices) |")


def test_no_conclusive_val_volume_is_not_called_one_class():
    inconclusive = {("NIH", "v"): {"dataset": "NIH", "label": False, "scores": {"max": 0.0, "top_k_mean": 0.0},
                                   "n_boxed": 0, "inconclusive": True}}
    selection = operating_points.select_operating_point(inconclusive, "max", None)
    assert selection["threshold_rule"] == "0.5: no val volume is conclusive"
    assert selection["notes"] == ["max: no val volume is conclusive: threshold 0.5",
                                  "top_k_mean: no val volume is conclusive: threshold 0.5"]
    assert operating_points.choose_slice_threshold([{"p_tumor": None, "has_tumor": True}], None)[
        "slice_threshold_rule"] == "no val slice has a P(tumor): 0.5"


def test_mixed_rescored_thresholds_are_called_mixed_not_unrecorded(tmp_path):
    base = {"dataset": "NIH", "volume_name": "n1", "target": "pancreas", "answer": "{<10><10><30><50>}",
            "gt_box": [20, 10, 59, 49], "width": 200, "height": 100}
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({**base, "selection_threshold": t}) + "\n" for t in (0.6, 0.1)))
    m = eval_detection.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"run.output_dir={tmp_path / 'out'}",
                             "--predictions", str(path), "--bootstrap", "0", "--no-figures"])
    assert m["threshold"] is None and m["threshold_unknown"] == "mixed: rows selected at 10 %, 60 %"
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "### Table 1 — pancreas detection (IoU), selection threshold unknown (mixed: rows selected at 10 %, 60 %)" in text
    assert "not recorded" not in text
    assert "The evaluated selection threshold is unknown (mixed: rows selected at 10 %, 60 %)" in text
