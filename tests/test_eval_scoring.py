"""Evaluation scoring without a model: hand-made prediction files whose metrics are computed by
hand here (SPEC §6), the volume bootstrap, and the statistics helpers against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from minigpt4.evaluation import (
    classification_metrics,
    detection_metrics,
    rescore_classification,
    rescore_detection,
)
from minigpt4.evaluation.common import select_ids, subsample
from minigpt4.evaluation.stats import auc_score, binary_metrics_from_counts, cluster_bootstrap
from minigpt4.io import read_jsonl, write_jsonl_atomic
from tests._markdown import markdown_tables

# ---------------------------------------------------------------------------------------------
# Detection: four answers with IoUs computed by hand
#   A NIH 200x100, gt [20,10,59,49], "{<10><10><30><50>}" -> (20,10,60,50): 39*39/(40*40)
#   C NIH, unparseable -> 0, not parsed
#   B MSD 100x100, gt [0,0,50,50], "{<25><25><75><75>}" -> 625/4375 = 1/7
#   D MSD 100x100, gt [0,0,50,50], corners reversed "{<50><50><0><0>}" -> parsed as written
#     (the release's rule), area max(0, 0-50)*... = 0 -> IoU 0
IOU_A, IOU_B, IOU_D = 1521 / 1600, 1 / 7, 0.0
# Grid ceilings (the best grid answer; tests/test_boxes.py checks them against every grid box):
# A gt [20,10,59,49] on 200x100 -> {<10><10><30><49>} = pixels (20,10,60,49): 39*39 / 40*39 (the
# ground truth's own answer (10,10,29,49) scores only 38*39 / 39*39); C gt [5,5,40,40] -> (2,5,20,40)
# = pixels (4,5,40,40): 35*35 / 36*35; B, D gt [0,0,50,50] on 100x100 -> exact, 1.
CEIL_A, CEIL_C = 1521 / 1560, 1225 / 1260

DETECTION_LINES = [
    {"q_id": 0, "dataset": "NIH", "volume_name": "n1", "target": "pancreas", "answer": "{<10><10><30><50>}",
     "gt_box": [20, 10, 59, 49], "width": 200, "height": 100},
    {"q_id": 1, "dataset": "NIH", "volume_name": "n1", "target": "pancreas", "answer": "the pancreas is central",
     "gt_box": [5, 5, 40, 40], "width": 200, "height": 100},
    {"q_id": 0, "dataset": "MSD", "volume_name": "m1", "target": "pancreas", "answer": "{<25><25><75><75>}",
     "gt_box": [0, 0, 50, 50], "width": 100, "height": 100},
    {"q_id": 1, "dataset": "MSD", "volume_name": "m2", "target": "pancreas", "answer": "{<50><50><0><0>}",
     "gt_box": [0, 0, 50, 50], "width": 100, "height": 100},
]


def test_detection_rescoring_of_a_hand_made_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_jsonl_atomic(path, DETECTION_LINES)
    rows = rescore_detection(read_jsonl(path), source=str(path))
    assert [r["iou"] for r in rows] == pytest.approx([IOU_A, 0.0, IOU_B, IOU_D])
    assert [r["parsed"] for r in rows] == [True, False, True, True]
    assert rows[0]["pred_box"] == [20.0, 10.0, 60.0, 50.0]
    assert rows[1]["pred_box"] is None
    assert rows[3]["pred_box"] == [50.0, 50.0, 0.0, 0.0]  # as written: never reordered

    m = detection_metrics(rows, "pancreas_detection", n_boot=0)
    assert set(m) == {"task", "n", "per_dataset", "weighted"}
    nih, msd, avg = m["per_dataset"]["NIH"], m["per_dataset"]["MSD"], m["weighted"]
    assert set(nih) == {"n", "n_parsed", "mean_iou", "mean_iou_parsed", "parse_rate", "acc_at_0.5", "grid_ceiling"}
    assert nih["n"] == 2 and nih["n_parsed"] == 1
    assert nih["mean_iou"] == pytest.approx(IOU_A / 2)
    assert nih["mean_iou_parsed"] == pytest.approx(IOU_A)
    assert nih["parse_rate"] == 0.5 and nih["acc_at_0.5"] == 0.5
    assert nih["grid_ceiling"] == pytest.approx((CEIL_A + CEIL_C) / 2)
    assert msd["mean_iou"] == pytest.approx((IOU_B + IOU_D) / 2)
    assert msd["mean_iou_parsed"] == pytest.approx((IOU_B + IOU_D) / 2)
    assert msd["parse_rate"] == 1.0 and msd["acc_at_0.5"] == 0.0 and msd["grid_ceiling"] == 1.0
    # weighted by sample counts = pooled over all samples (the paper's "Average")
    assert avg["n"] == 4
    assert avg["mean_iou"] == pytest.approx((IOU_A + IOU_B + IOU_D) / 4)
    assert avg["mean_iou_parsed"] == pytest.approx((IOU_A + IOU_B + IOU_D) / 3)
    assert avg["parse_rate"] == 0.75 and avg["acc_at_0.5"] == 0.25
    assert avg["grid_ceiling"] == pytest.approx((CEIL_A + CEIL_C + 2) / 4)


def test_weighted_average_reproduces_the_papers_table1_average():
    # epoch 1 of paper Table 1: NIH 0.574 on 378 slices, MSD 0.533 on 526 -> Average 0.550
    rows = [{"dataset": "NIH", "iou": 0.574, "parsed": True}] * 378 + [{"dataset": "MSD", "iou": 0.533, "parsed": True}] * 526
    m = detection_metrics(rows, "pancreas_detection", n_boot=0)
    assert round(m["weighted"]["mean_iou"], 3) == 0.550


def test_organ_metrics_per_organ_and_unweighted_organ_average():
    lines = []
    for organ, answer in (("liver", "{<0><0><50><50>}"), ("kidney", "{<25><25><75><75>}"), ("spleen", "garbage")):
        lines.append({"dataset": "ABD", "volume_name": "a1", "target": organ, "answer": answer,
                      "gt_box": [0, 0, 50, 50], "width": 100, "height": 100})
    lines.append(dict(lines[0], volume_name="a2"))  # a second liver, IoU 1
    rows = rescore_detection(lines)
    m = detection_metrics(rows, "organ_detection", n_boot=0)
    assert list(m["per_organ"]) == ["liver", "kidney", "spleen"]
    assert m["per_organ"]["liver"]["mean_iou"] == 1.0 and m["per_organ"]["liver"]["n"] == 2
    assert m["per_organ"]["kidney"]["mean_iou"] == pytest.approx(1 / 7)
    assert m["per_organ"]["spleen"]["parse_rate"] == 0.0 and m["per_organ"]["spleen"]["mean_iou_parsed"] is None
    assert m["organ_average_iou"] == pytest.approx((1 + 1 / 7 + 0) / 3)
    assert m["organ_average_iou_parsed"] == pytest.approx((1 + 1 / 7) / 2)  # spleen has no parsed answer
    assert m["weighted"]["mean_iou"] == pytest.approx((2 + 1 / 7) / 4)


def test_organ_metrics_need_targets():
    rows = rescore_detection([dict(DETECTION_LINES[0], target=None)])
    with pytest.raises(ValueError, match="target"):
        detection_metrics(rows, "organ_detection", n_boot=0)


@pytest.mark.parametrize(
    "change, message",
    [({"answer": None}, "lacks \\['answer'\\]"), ({"gt_box": [1, 2, 3]}, "gt_box must be 4 numbers"),
     ({"width": 0}, "width must be a positive integer, got 0"),
     # a NaN box used to score IoU 6.72 and land in tables.md
     ({"gt_box": [float("nan"), 10, 59, 49]}, "gt_box has a NaN or infinite value"),
     ({"gt_box": [20, 10, float("inf"), 49]}, "gt_box has a NaN or infinite value"),
     ({"gt_box": [-1, 10, 59, 49]}, "gt_box has a negative value"),
     ({"gt_box": [59, 10, 20, 49]}, "gt_box corners are reversed"),
     ({"gt_box": [20, "10", 59, 49]}, "gt_box must be 4 numbers"),
     ({"height": 100.5}, "height must be a positive integer, got 100.5"),
     ({"width": True}, "width must be a positive integer, got True")],
)
def test_rescoring_rejects_bad_lines_naming_the_line(change, message):
    line = dict(DETECTION_LINES[0], **change)
    if change.get("answer", "") is None:
        del line["answer"]
    with pytest.raises(ValueError, match=message) as info:
        rescore_detection([DETECTION_LINES[1], line], source="preds.jsonl")
    assert "preds.jsonl: line 2" in str(info.value)


def test_detection_bootstrap_resamples_volumes_not_slices():
    # volume v1: 10 slices IoU 1; volume v2: 1 slice IoU 0. Resampling the 2 volumes gives only
    # the means 1, 10/11 or 0 (both picks v2, probability 1/4) -> the interval reaches 0.
    rows = [{"dataset": "D", "volume_name": "v1", "iou": 1.0, "parsed": True}] * 10
    rows += [{"dataset": "D", "volume_name": "v2", "iou": 0.0, "parsed": True}]
    m = detection_metrics(rows, "tumor_detection", n_boot=400, seed=1)
    low, high = m["ci95"]["weighted"]["mean_iou"]
    assert low == 0.0 and high == 1.0
    assert m["ci95"]["per_dataset"]["D"]["mean_iou"] == [low, high]
    again = detection_metrics(rows, "tumor_detection", n_boot=400, seed=1)
    assert again["ci95"] == m["ci95"]  # seeded: reproducible


# ---------------------------------------------------------------------------------------------
# Classification: seven answers, computed by hand
#   MSD (truth yes): "Yes." (p .9) TP; "no" (p .4) FN; "maybe" (p .6) invalid -> FN
#   NIH (truth no):  "no" (p .2) TN; "I cannot tell" (p .7) invalid -> FP; "No" (p .5) TN; "no." (p .1) TN
#   TP 1, FN 2, FP 1, TN 3: accuracy 4/7, precision 1/2, recall 1/3, F1 2/(2+1+2) = 2/5
#   AUC: positive scores .9 .4 .6 vs negatives .2 .7 .5 .1 -> (4 + 2 + 3) / 12 = 0.75
CLASSIFICATION_LINES = [
    {"dataset": "MSD", "volume_name": "m1", "answer": "Yes.", "p_yes": 0.9, "gt_answer": "yes"},
    {"dataset": "MSD", "volume_name": "m1", "answer": "no", "p_yes": 0.4, "gt_answer": "yes"},
    {"dataset": "MSD", "volume_name": "m2", "answer": "maybe", "p_yes": 0.6, "gt_answer": "yes"},
    {"dataset": "NIH", "volume_name": "n1", "answer": "no", "p_yes": 0.2, "gt_answer": "no"},
    {"dataset": "NIH", "volume_name": "n1", "answer": "I cannot tell", "p_yes": 0.7, "gt_answer": "no"},
    {"dataset": "NIH", "volume_name": "n2", "answer": "No", "p_yes": 0.5, "gt_answer": "no"},
    {"dataset": "NIH", "volume_name": "n3", "answer": "no.", "p_yes": 0.1, "gt_answer": "no"},
]


def test_classification_rescoring_of_a_hand_made_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_jsonl_atomic(path, CLASSIFICATION_LINES)
    rows = rescore_classification(read_jsonl(path))
    assert [r["pred_answer"] for r in rows] == ["yes", "no", None, "no", None, "no", "no"]
    assert [r["correct"] for r in rows] == [True, False, False, True, False, True, True]
    m = classification_metrics(rows, n_boot=0)
    assert m["n"] == 7 and m["n_yes"] == 3 and m["n_no"] == 4
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 / 5)
    assert m["auc"] == pytest.approx(0.75)
    assert m["invalid"] == 2 and m["invalid_rate"] == pytest.approx(2 / 7)
    assert m["confusion_matrix"] == {"rows": ["yes", "no"], "columns": ["yes", "no", "invalid"], "counts": [[1, 1, 1], [0, 3, 1]]}
    # the confound made visible: per dataset only one class exists
    msd, nih = m["per_dataset"]["MSD"], m["per_dataset"]["NIH"]
    # MSD (all yes): accuracy 1/3 is the sensitivity; NIH (all no): 3/4 is the specificity.
    # Precision, recall, F1, AUC of a one-class source are meaningless and left out.
    assert msd["accuracy"] == pytest.approx(1 / 3) and msd["measures"] == "sensitivity"
    assert nih["accuracy"] == pytest.approx(3 / 4) and nih["measures"] == "specificity"
    assert set(msd) == set(nih) == {"n", "n_yes", "n_no", "accuracy", "invalid", "invalid_rate", "confusion_matrix", "measures"}
    # a source holding both classes (the msd-only variant) keeps every metric
    mixed = classification_metrics(rescore_classification([dict(line, dataset="MSD") for line in CLASSIFICATION_LINES]), n_boot=0)
    assert mixed["per_dataset"]["MSD"]["measures"] == "accuracy" and mixed["per_dataset"]["MSD"]["auc"] == pytest.approx(0.75)


def test_invalid_answers_are_never_counted_as_no():
    rows = rescore_classification([{"dataset": "NIH", "answer": "unsure", "gt_answer": "no"}])
    m = classification_metrics(rows, n_boot=0)
    assert m["accuracy"] == 0.0 and m["invalid"] == 1 and m["auc"] is None


def test_classification_rescoring_errors_name_the_line():
    with pytest.raises(ValueError, match="line 2 lacks \\['gt_answer'\\]"):
        rescore_classification([CLASSIFICATION_LINES[0], {"dataset": "NIH", "answer": "no"}])
    with pytest.raises(ValueError, match="gt_answer must be yes or no"):
        rescore_classification([dict(CLASSIFICATION_LINES[0], gt_answer="Yes")])
    with pytest.raises(ValueError, match="p_yes"):
        rescore_classification([dict(CLASSIFICATION_LINES[0], p_yes=1.5)])


def test_classification_bootstrap_intervals_bracket_the_estimate():
    rows = rescore_classification(CLASSIFICATION_LINES * 3)
    m = classification_metrics(rows, n_boot=300, seed=0)
    ci = m["ci95"]["overall"]
    for name in ("accuracy", "recall", "auc"):
        assert ci[name][0] <= m[name] <= ci[name][1], name
    # NIH has no positives: only its accuracy (= specificity) gets an interval
    nih = m["ci95"]["per_dataset"]["NIH"]
    assert set(nih) == {"accuracy"} and nih["accuracy"][0] <= m["per_dataset"]["NIH"]["accuracy"] <= nih["accuracy"][1]


# ---------------------------------------------------------------------------------------------
# statistics helpers against scikit-learn


def test_count_metrics_and_rank_auc_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 200)
    y_pred = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    tp = int(((y_true == 1) & (y_pred == 1)).sum())
    fp = int(((y_true == 0) & (y_pred == 1)).sum())
    fn = int(((y_true == 1) & (y_pred == 0)).sum())
    tn = 200 - tp - fp - fn
    mine = binary_metrics_from_counts(tp, fp, fn, tn)
    assert mine["precision"] == pytest.approx(precision_score(y_true, y_pred))
    assert mine["recall"] == pytest.approx(recall_score(y_true, y_pred))
    assert mine["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert auc_score(y_true, scores) == pytest.approx(roc_auc_score(y_true, scores))
    assert auc_score(np.ones(3), np.arange(3)) is None
    assert binary_metrics_from_counts(0, 0, 0, 5)["precision"] is None


def test_cluster_bootstrap_rejects_a_volume_in_two_strata():
    with pytest.raises(ValueError, match="spans several strata"):
        cluster_bootstrap(["v", "v"], lambda idx: {"x": 0.0}, n_boot=2, strata=["NIH", "MSD"])


def test_subsample_and_select_ids():
    records = [{"q_id": i} for i in range(10)]
    assert [r["q_id"] for r in subsample(records, 4)] == [0, 2, 5, 7]
    assert subsample(records, None) == records
    assert [r["q_id"] for r in select_ids(records, [7, 3])] == [3, 7]
    with pytest.raises(ValueError, match="unknown q_id\\(s\\) \\[42\\]"):
        select_ids(records, [3, 42], source="NIH test")


def test_box_heatmap_counts_normalised_cells():
    from minigpt4.evaluation.figures import box_heatmap

    rows = [
        {"gt_box": [0, 0, 50, 50], "pred_box": None, "width": 100, "height": 100},
        # 200x400 image: x 100..200 -> cells 50..99, y 0..200 -> cells 0..49
        {"gt_box": [100, 0, 200, 200], "pred_box": [0, 0, 0, 0], "width": 200, "height": 400},
    ]
    gt = box_heatmap(rows, "gt_box")
    assert gt.sum() == 50 * 50 + 50 * 50
    assert gt[0, 0] == 1 and gt[49, 49] == 1 and gt[0, 99] == 1 and gt[50, 50] == 0
    pred = box_heatmap(rows, "pred_box")
    assert pred.sum() == 1 and pred[0, 0] == 1  # a degenerate box still marks one cell


def test_tables_show_the_papers_numbers_beside_ours():
    from minigpt4.evaluation.tables import classification_table, detection_table

    rows = rescore_detection([dict(line, target="tumor") for line in DETECTION_LINES])
    text = detection_table(detection_metrics(rows, "tumor_detection", n_boot=0), "ours")
    assert "Table 3" in text and "0.168" in text and "< 0.001" in text
    assert f"| **ours** | {(IOU_A + IOU_B + IOU_D) / 4:.3f} | {(IOU_A + IOU_B + IOU_D) / 3:.3f} | 0.750 |" in text
    m = classification_metrics(rescore_classification(CLASSIFICATION_LINES), n_boot=0)
    text = classification_table(m, "ours")
    assert "| **ours** | 0.571 | 0.500 | 0.333 | 0.400 | 0.750 | 2 |" in text
    assert "0.876 | 0.874 | 0.878 | 0.876" in text
    assert "| yes | 1 | 1 | 1 |" in text and "| no | 0 | 3 | 1 |" in text


def test_box_heatmap_cells_are_exact_for_grid_values_29_57_58():
    from minigpt4.evaluation.figures import box_heatmap

    # float arithmetic put these one cell low: 29 / 100 * 100 = 28.999..., 57 * 5.12 / 512 * 100 = 56.99...
    gt_rows = [{"gt_box": [29, 57, 58, 58], "width": 100, "height": 100}]
    pred_rows = [{"pred_box": [29 * 5.12, 57 * 5.12, 58 * 5.12, 58 * 5.12], "width": 512, "height": 512}]
    answered = [dict(pred_rows[0], answer="{<29><57><58><58>}")]
    for rows, key in ((gt_rows, "gt_box"), (pred_rows, "pred_box"), (answered, "pred_box")):
        heat = box_heatmap(rows, key)
        covered = np.argwhere(heat)  # (row = y, column = x)
        assert covered[:, 0].tolist() == [57] * 29 and covered[:, 1].tolist() == list(range(29, 58)), (key, rows)


def test_box_heatmaps_share_one_colour_scale(tmp_path, monkeypatch):
    from minigpt4.evaluation import figures

    limits = []
    original = figures.Figure.add_subplot

    def spy(fig, *args, **kwargs):
        ax = original(fig, *args, **kwargs)
        imshow = ax.imshow
        ax.imshow = lambda *a, **k: limits.append((k.get("vmin"), k.get("vmax"))) or imshow(*a, **k)
        return ax

    monkeypatch.setattr(figures.Figure, "add_subplot", spy)
    rows = [{"gt_box": [0, 0, 50, 50], "pred_box": [0, 0, 10, 10], "width": 100, "height": 100}] * 3
    rows += [{"gt_box": [0, 0, 50, 50], "pred_box": None, "width": 100, "height": 100}]
    figures.box_heatmaps(rows, tmp_path / "h.png")
    assert limits == [(0, 4.0), (0, 4.0)]  # gt peaks at 4 boxes, predictions at 3: one scale


def test_grid_ceiling_and_threshold_rows_in_table1():
    from minigpt4.evaluation.tables import detection_table

    rows = rescore_detection(DETECTION_LINES)
    m = detection_metrics(rows, "pancreas_detection", n_boot=0)
    m["threshold"] = 0.3
    text = detection_table(m, "ours")
    assert "### Table 1 — pancreas detection (IoU), slices with pancreas box ratio > 30 %" in text
    # appendix Table 2 at 30 %, not Table 1's 60 % rows
    assert "| Threshold 30 %, paper (appendix Table 2, 10 epochs) | 0.503 | 0.503 | 0.474 | 0.474 | 0.486 | 0.486 |" in text
    assert "0.574" not in text and "Epoch 21" not in text
    ceiling = f"{(CEIL_A + CEIL_C) / 2:.3f} | — | 1.000 | — | {(CEIL_A + CEIL_C + 2) / 4:.3f}"
    assert f"| Grid ceiling (best IoU any 0–100 grid answer can score) | {ceiling} |" in text
    m["threshold"] = 0.6
    text = detection_table(m, "ours")
    assert "| Epoch 21, paper (Table 1, 60 %) | 0.595 | 0.595 | 0.550 | 0.550 | 0.574 | 0.574 |" in text
    assert "| Threshold 60 %, paper (appendix Table 2, 10 epochs) | 0.587 | 0.587 | 0.541 | 0.541 | 0.560 | 0.560 |" in text
    m["threshold"] = 0.25
    assert "The paper has no row for threshold 25 %" in detection_table(m, "ours")
    m["threshold"] = None
    assert "### Table 1 — pancreas detection (IoU), selection threshold unknown" in detection_table(m, "ours")


def test_an_abd_file_of_pancreas_rows_is_table4():
    from minigpt4.commands.evaluate import infer_detection_task

    rows = [{"dataset": "ABD", "target": "pancreas"}]
    assert infer_detection_task(rows, []) == "organ_detection"
    assert infer_detection_task([{"dataset": "NIH", "target": "pancreas"}], []) == "pancreas_detection"


def test_epochs_table_shows_table1_rows_only_at_60_percent():
    from minigpt4.evaluation.tables import epochs_table

    m = detection_metrics(rescore_detection(DETECTION_LINES), "pancreas_detection", n_boot=0)
    epochs = [{"epoch": 0, "val": m, "test": m}]
    assert "| 21, paper (best) |" in epochs_table(epochs, 0, 0.6)
    text = epochs_table(epochs, 0, 0.3)
    assert "paper" not in text.split("\n\n")[1] and "slices with pancreas box ratio > 30 %" in text


def _organ_metrics():
    lines = [{"dataset": "ABD", "volume_name": "a1", "target": organ, "answer": answer, "gt_box": [0, 0, 50, 50],
              "width": 100, "height": 100}
             for organ, answer in (("liver", "{<0><0><50><50>}"), ("kidney", "{<25><25><75><75>}"), ("spleen", "?"))]
    return detection_metrics(rescore_detection(lines), "organ_detection", n_boot=0)


def test_every_iou_table_has_all_rows_and_parsed_only_columns_with_the_paper_under_both():
    from minigpt4.evaluation.tables import detection_table, epochs_table

    def f(x):
        return f"{x:.3f}"

    def check(table, label, columns, ours, paper_label, paper):
        for column, value in zip(columns, ours):  # ours: all rows, then parsed only
            assert table.cell(label, column) == value, (column, table.row(label))
        for column in columns[:2]:  # the paper's one number under both definitions
            assert table.cell(paper_label, column) == paper

    def divisor_note(text):  # says what each release version divides by, and that it is not known
        assert "latest `eval_scripts/evaluate_predictions.py` divides by the parsed count" in text
        assert "August-2025 versions by all rows" in text and "is not known" in text

    pancreas = detection_metrics(rescore_detection(DETECTION_LINES), "pancreas_detection", n_boot=0)
    pancreas["threshold"] = 0.6
    text = detection_table(pancreas, "ours")
    table1 = markdown_tables(text)[0]
    check(table1, "**ours**", ["NIH", "NIH (parsed only)"], [f(IOU_A / 2), f(IOU_A)], "Epoch 21, paper (Table 1, 60 %)", "0.595")
    check(table1, "**ours**", ["MSD", "MSD (parsed only)"], [f((IOU_B + IOU_D) / 2)] * 2, "Epoch 21, paper (Table 1, 60 %)", "0.550")
    check(table1, "**ours**", ["Average", "Average (parsed only)"], [f((IOU_A + IOU_B + IOU_D) / 4), f((IOU_A + IOU_B + IOU_D) / 3)],
          "Epoch 21, paper (Table 1, 60 %)", "0.574")
    divisor_note(text)

    tumor = detection_metrics(rescore_detection([dict(line, target="tumor") for line in DETECTION_LINES]), "tumor_detection", n_boot=0)
    text = detection_table(tumor, "ours")
    check(markdown_tables(text)[0], "**ours**", ["IoU", "IoU (parsed only)"],
          [f((IOU_A + IOU_B + IOU_D) / 4), f((IOU_A + IOU_B + IOU_D) / 3)], "+ tumor detection, paper", "0.168")
    divisor_note(text)

    text = detection_table(_organ_metrics(), "ours")
    table4, detail = markdown_tables(text)
    check(table4, "**ours**", ["Liver", "Liver (parsed only)"], ["1.000", "1.000"], "MiniGPT-Pancreas, paper", "0.839")
    check(table4, "**ours**", ["Spleen", "Spleen (parsed only)"], ["0.000", "—"], "MiniGPT-Pancreas, paper", "0.705")
    check(table4, "**ours**", ["Average", "Average (parsed only)"], [f((1 + 1 / 7) / 3), f((1 + 1 / 7) / 2)],
          "MiniGPT-Pancreas, paper", "0.691")
    assert detail.cell("spleen (organ)", "parse rate") == "0.000"  # the parse rates per organ
    divisor_note(text)

    text = epochs_table([{"epoch": 0, "val": pancreas, "test": pancreas}], 0, 0.6)
    check(markdown_tables(text)[0], "**0** (best on val)", ["test NIH", "test NIH (parsed only)"], [f(IOU_A / 2), f(IOU_A)],
          "21, paper (best)", "0.595")
    check(markdown_tables(text)[0], "**0** (best on val)", ["test Average", "test Average (parsed only)"],
          [f((IOU_A + IOU_B + IOU_D) / 4), f((IOU_A + IOU_B + IOU_D) / 3)], "21, paper (best)", "0.574")
    divisor_note(text)


def test_every_table_the_evaluation_writes_has_a_header_row():
    from minigpt4.evaluation.tables import classification_table, detection_table, epochs_table

    pancreas = detection_metrics(rescore_detection(DETECTION_LINES), "pancreas_detection", n_boot=50, seed=0)
    tumor = detection_metrics(rescore_detection([dict(line, target="tumor") for line in DETECTION_LINES]), "tumor_detection", n_boot=0)
    classification = classification_metrics(rescore_classification(CLASSIFICATION_LINES), n_boot=0)
    texts = {
        "Table 1": detection_table(pancreas, "ours"),
        "Table 3": detection_table(tumor, "ours"),
        "Table 4": detection_table(_organ_metrics(), "ours"),
        "Table 2": classification_table(classification, "ours"),
        "by epoch": epochs_table([{"epoch": 0, "val": None, "test": pancreas}], 0, None),
    }
    counts = {name: len(markdown_tables(text)) for name, text in texts.items()}  # each table checked
    assert counts == {"Table 1": 2, "Table 3": 2, "Table 4": 2, "Table 2": 3, "by epoch": 1}
