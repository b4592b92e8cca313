"""Detection evaluation: batched greedy prediction, scoring, metrics (SPEC §6).

Scoring rules (all in :mod:`minigpt4.boxes`, the release's rule): an answer with exactly four runs
of digits is the box as written, anything else a bad answer; the 0–100 grid box goes back to
pixels as ``x * width / 100``, ``y * height / 100``; IoU is continuous, without ``+1``. A bad
answer scores IoU 0 in ``mean_iou`` and counts against ``parse_rate``; ``mean_iou_parsed`` is the
mean over parsed answers only. The paper prints one number per cell, and which of the two it is
is not known (the release's latest ``evaluate_predictions.py`` divides by the parsed count, its
August-2025 versions by all rows), so the tables show both. ``grid_ceiling`` is the mean over rows
of the best IoU any 0–100 grid answer can score against the row's ground truth
(:func:`minigpt4.boxes.best_grid_answer`, an exact search): no model answering on the grid can do
better on average.

A *prediction row* (one line of ``predictions.jsonl``)::

    {"q_id", "dataset", "volume_name", "slice_index", "image", "target", "question", "answer",
     "parsed", "pred_box", "gt_box", "width", "height", "iou", "selection_threshold"}

``selection_threshold`` is the box-ratio threshold the row's slice was selected with (None when not
known, e.g. in training validation); ``--predictions`` re-scoring reads it from the file itself.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from minigpt4.boxes import best_grid_answer, score_answer
from minigpt4.config import DETECTION_TASKS, ORGANS
from minigpt4.evaluation.common import eval_mode, iter_batches, record_identity
from minigpt4.evaluation.stats import cluster_bootstrap

# What a predictions file must hold for re-scoring without a model.
RESCORE_KEYS = ("answer", "gt_box", "width", "height", "dataset")


def detection_row(record: dict, answer: str, question: Optional[str] = None) -> dict:
    """Score one answer against a selected record and return its prediction row."""
    pred_box, iou = score_answer(answer, record["bbox"], record["width"], record["height"])
    return {
        **record_identity(record),
        "target": record.get("target"),
        "question": question,
        "answer": answer,
        "parsed": pred_box is not None,
        "pred_box": list(pred_box) if pred_box is not None else None,
        "gt_box": [float(v) for v in record["bbox"]],
        "width": int(record["width"]),
        "height": int(record["height"]),
        "iou": iou,
        "selection_threshold": record.get("selection_threshold"),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scoring_input(gt_box: Any, width: Any, height: Any, where: str) -> None:
    """Refuse a ground truth that cannot be scored: the box must be 4 finite, non-negative numbers
    with x1 <= x2 and y1 <= y2 (a NaN box would score any IoU); width and height positive integers.

    Raises:
        ValueError: naming ``where`` (file and line) and the problem.
    """
    if not isinstance(gt_box, (list, tuple)) or len(gt_box) != 4 or not all(_is_number(v) for v in gt_box):
        raise ValueError(f"{where}: gt_box must be 4 numbers, got {gt_box!r}")
    if not all(math.isfinite(v) for v in gt_box):
        raise ValueError(f"{where}: gt_box has a NaN or infinite value: {gt_box!r}")
    if any(v < 0 for v in gt_box):
        raise ValueError(f"{where}: gt_box has a negative value: {gt_box!r}")
    if gt_box[2] < gt_box[0] or gt_box[3] < gt_box[1]:
        raise ValueError(f"{where}: gt_box corners are reversed (x2 < x1 or y2 < y1): {gt_box!r}")
    for name, value in (("width", width), ("height", height)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")


def grid_ceiling_iou(gt_box: Sequence[float], width: int, height: int) -> float:
    """The best IoU any 0–100 grid answer scores against ``gt_box`` (a perfect model's score)."""
    return best_grid_answer(gt_box, width, height)[1]


def rescore_rows(rows: Sequence[dict], source: str = "predictions") -> list[dict]:
    """Re-score saved prediction rows from their raw ``answer`` (no model needed).

    Each row needs ``answer, gt_box, width, height, dataset``; other keys are kept. ``parsed``,
    ``pred_box`` and ``iou`` are recomputed, so a file scored by an older parser is brought up
    to date.

    Raises:
        ValueError: a row lacks a required key or has a malformed box/size (names the line).
    """
    out = []
    for number, row in enumerate(rows, 1):
        absent = [k for k in RESCORE_KEYS if k not in row]
        if absent:
            raise ValueError(f"{source}: line {number} lacks {absent} (re-scoring needs {list(RESCORE_KEYS)})")
        check_scoring_input(row["gt_box"], row["width"], row["height"], f"{source}: line {number}")
        record = {**row, "bbox": row["gt_box"]}
        rescored = detection_row(record, row["answer"], row.get("question"))
        out.append({**row, **{k: rescored[k] for k in ("parsed", "pred_box", "gt_box", "iou")}})
    return out


def recorded_threshold(rows: Sequence[dict]) -> Optional[float]:
    """The selection threshold a predictions file records: the ``selection_threshold`` its rows
    share; None (unknown) when a row lacks it (files written before it was recorded) or rows differ."""
    values = {row.get("selection_threshold") for row in rows}
    value = values.pop() if len(values) == 1 else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def threshold_unknown_reason(rows: Sequence[dict]) -> Optional[str]:
    """Why :func:`recorded_threshold` is None, in words for the tables: ``"not recorded"`` (a row
    lacks it) or ``"mixed: rows selected at 10 %, 60 %"``; None when the rows share one."""
    values = [row.get("selection_threshold") for row in rows]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return "not recorded"
    distinct = sorted(set(values))
    if len(distinct) > 1:
        return "mixed: rows selected at " + ", ".join(f"{round(v * 100):g} %" for v in distinct)
    return None


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """``{n, n_parsed, mean_iou, mean_iou_parsed, parse_rate, acc_at_0.5, grid_ceiling}`` over rows.

    ``mean_iou`` counts bad answers as 0 (divides by all rows, as the release's August-2025
    ``evaluate_predictions.py``); ``mean_iou_parsed`` averages parsed answers only (divides by the
    parsed count, as its latest version); ``acc_at_0.5`` is the fraction of all rows with IoU >= 0.5;
    ``grid_ceiling`` the mean of the best IoU a grid answer can score per row. Means over nothing are None.
    """
    ious = np.asarray([float(r["iou"]) for r in rows], dtype=float)
    parsed = np.asarray([bool(r["parsed"]) for r in rows], dtype=bool)
    scorable = all(r.get("gt_box") is not None and r.get("width") and r.get("height") for r in rows)
    ceiling = [grid_ceiling_iou(r["gt_box"], int(r["width"]), int(r["height"])) for r in rows] if scorable else []
    n, n_parsed = int(ious.size), int(parsed.sum())
    return {
        "n": n,
        "n_parsed": n_parsed,
        "mean_iou": float(ious.mean()) if n else None,
        "mean_iou_parsed": float(ious[parsed].mean()) if n_parsed else None,
        "parse_rate": n_parsed / n if n else None,
        "acc_at_0.5": float((ious >= 0.5).mean()) if n else None,
        "grid_ceiling": float(np.mean(ceiling)) if ceiling else None,
    }


def _iou_intervals(rows: Sequence[dict], n_boot: int, seed: int) -> dict:
    """95 % CIs of mean_iou / mean_iou_parsed / acc_at_0.5, volumes resampled within datasets."""
    if not rows or any(r.get("volume_name") is None for r in rows):
        return {}
    ious = np.asarray([float(r["iou"]) for r in rows])
    parsed = np.asarray([bool(r["parsed"]) for r in rows])

    def statistic(idx: np.ndarray) -> dict:
        sel_parsed = parsed[idx]
        return {
            "mean_iou": float(ious[idx].mean()),
            "mean_iou_parsed": float(ious[idx][sel_parsed].mean()) if sel_parsed.any() else None,
            "acc_at_0.5": float((ious[idx] >= 0.5).mean()),
        }

    clusters = [(r["dataset"], r["volume_name"]) for r in rows]
    return cluster_bootstrap(clusters, statistic, n_boot=n_boot, seed=seed, strata=[r["dataset"] for r in rows])


def detection_metrics(rows: Sequence[dict], task: Optional[str] = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of scored prediction rows.

    Returns:
        ``{"task", "n", "per_dataset": {DS: summary}, "weighted": summary, "per_organ": {organ:
        summary} (organ detection only), "ci95": {"weighted": {...}, "per_dataset": {...}}}``.
        ``weighted`` pools every sample, i.e. per-dataset means weighted by sample counts — the
        paper's "Average" (Table 1: 0.574·378 + 0.533·526 over 904 = 0.550 at epoch 1).
    """
    if task is not None and task not in DETECTION_TASKS:
        raise ValueError(f"not a detection task: {task!r}; expected one of {', '.join(DETECTION_TASKS)}")
    datasets = sorted({r["dataset"] for r in rows})
    metrics: dict[str, Any] = {
        "task": task,
        "n": len(rows),
        "per_dataset": {ds: summarize([r for r in rows if r["dataset"] == ds]) for ds in datasets},
        "weighted": summarize(rows),
    }
    if task == "organ_detection":
        absent = [i for i, r in enumerate(rows, 1) if r.get("target") not in ORGANS]
        if absent:
            raise ValueError(f"organ detection rows need a target in {list(ORGANS)}; line(s) {absent[:10]} do not")
        organs = [o for o in ORGANS if any(r["target"] == o for r in rows)]
        per_organ = {o: summarize([r for r in rows if r["target"] == o]) for o in organs}
        metrics["per_organ"] = per_organ
        # Table 4's "Average" is the unweighted mean over organs (the set is organ-balanced)
        for key, mean_key in (("organ_average_iou", "mean_iou"), ("organ_average_iou_parsed", "mean_iou_parsed")):
            means = [s[mean_key] for s in per_organ.values() if s[mean_key] is not None]
            metrics[key] = float(np.mean(means)) if means else None
    if n_boot > 0:
        metrics["ci95"] = {
            "weighted": _iou_intervals(rows, n_boot, seed),
            "per_dataset": {
                ds: _iou_intervals([r for r in rows if r["dataset"] == ds], n_boot, seed) for ds in datasets
            },
            "method": f"percentile bootstrap, {n_boot} replicates, volumes resampled within each dataset, seed {seed}",
        }
    return metrics


def primary_score(metrics: dict) -> float:
    """The validation score of a detection run: weighted mean IoU (unparseable = 0)."""
    value = metrics["weighted"]["mean_iou"]
    return float(value) if value is not None and not math.isnan(value) else 0.0


def predict_detection(
    model: Any,
    records: Sequence[dict],
    task: str,
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    num_workers: int = 0,
    progress: Any = None,
    instruction: Optional[str] = None,
    feature_cache: Any = None,
) -> list[dict]:
    """Greedy batched generation over ``records`` and one scored row per record (same order).

    The model generates with left padding and the rows are scored one by one: in fp32 the batch
    size does not change the rows; in bf16/fp16 a batch runs other kernels and may, rarely, move
    an answer (a rounding effect, measured by ``benchmarks/bench_eval.py``; see BENCHMARKS.md).

    Args:
        model: a MiniGPTPancreas (``encode_tower``, ``generate(None, instructions,
            max_new_tokens, tower_tokens=...)``, ``image_transform``).
        records: selected records (see :func:`minigpt4.evaluation.common.check_records`).
        task: a detection task.
        progress: optional callable ``progress(done, total)``.
        instruction: instruction template with ``{}`` for the target (``run.eval_instruction``);
            None = the paper's first instruction.
        feature_cache: a :class:`~minigpt4.data.feature_cache.VisualFeatureCache` (no autocast)
            to read and keep the tower tokens of the images (``run.cache_visual_features``).
    """
    if task not in DETECTION_TASKS:
        raise ValueError(f"not a detection task: {task!r}")
    rows: list[dict] = []
    with eval_mode(model):
        batches = iter_batches(model, records, task, batch_size, num_workers, instruction, feature_cache)
        for batch_records, tower_tokens, instructions in batches:
            answers = model.generate(None, instructions, max_new_tokens=max_new_tokens, tower_tokens=tower_tokens)
            if len(answers) != len(batch_records):
                raise RuntimeError(f"model.generate returned {len(answers)} answers for {len(batch_records)} images")
            rows.extend(detection_row(r, a, q) for r, a, q in zip(batch_records, answers, instructions))
            if progress is not None:
                progress(len(rows), len(records))
    return rows
