"""Evaluation shared by the training loop, ``eval_detection.py``, ``eval_classification.py`` and the demo.

Public API::

    score, metrics = validation_score(model, records, task, batch_size, max_samples=None)
    rows = predict_detection(model, records, task, batch_size)          # scored prediction rows
    rows = predict_classification(model, records, batch_size)
    metrics = detection_metrics(rows, task)  /  classification_metrics(rows)
    rows = rescore_detection(rows)  /  rescore_classification(rows)   # saved answers, no model

Scoring goes through :mod:`minigpt4.boxes` only (``score_answer``, ``parse_yes_no``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from minigpt4.boxes import says_absent
from minigpt4.config import DETECTION_TASKS, TASKS
from minigpt4.evaluation.classification import (
    classification_metrics,
    classification_row,
    predict_classification,
)
from minigpt4.evaluation.classification import rescore_rows as rescore_classification
from minigpt4.evaluation.common import check_records, subsample
from minigpt4.evaluation.detection import (
    detection_metrics,
    detection_row,
    predict_detection,
    primary_score,
)
from minigpt4.evaluation.detection import rescore_rows as rescore_detection

__all__ = [
    "validation_score",
    "predict_detection",
    "predict_classification",
    "detection_metrics",
    "classification_metrics",
    "detection_row",
    "classification_row",
    "rescore_detection",
    "rescore_classification",
    "check_records",
]


def validation_score(
    model: Any,
    records: Sequence[dict],
    task: str,
    batch_size: int,
    max_samples: Optional[int] = None,
    feature_cache: Any = None,
) -> tuple[float, dict]:
    """Score a model on validation records (used by the trainer to pick ``checkpoint_best``).

    Args:
        model: a MiniGPTPancreas; it is put in eval mode for the call and its mode restored.
        records: selected records of the ``val`` split (several datasets may be mixed).
        task: one of ``pancreas_detection``, ``tumor_detection``, ``organ_detection``,
            ``tumor_classification``.
        batch_size: generation batch size (the same result in fp32; in bf16 a rounding effect may move an answer).
        max_samples: evaluate a deterministic, evenly spaced subset of this many records.
        feature_cache: a :class:`~minigpt4.data.feature_cache.VisualFeatureCache` without
            autocast: each image goes through the frozen tower at the first validation only.

    Returns:
        ``(score, metrics)``: detection → weighted mean IoU over datasets (unparseable = 0) and
        :func:`detection_metrics` without bootstrap (records of slices without the target,
        ``no_target``: see :func:`_score_with_absent`); classification → accuracy (invalid answers
        wrong) and :func:`classification_metrics` without bootstrap or AUC.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    selected = subsample(records, max_samples)
    if not selected:
        raise ValueError(f"validation_score: no records for task {task!r}")
    if task in DETECTION_TASKS:
        rows = predict_detection(model, selected, task, batch_size, feature_cache=feature_cache)
        if not any(record.get("no_target") for record in selected):
            metrics = detection_metrics(rows, task, n_boot=0)
            return primary_score(metrics), metrics
        return _score_with_absent(rows, [bool(record.get("no_target")) for record in selected], task)
    rows = predict_classification(model, selected, batch_size, with_probability=False, feature_cache=feature_cache)
    metrics = classification_metrics(rows, n_boot=0)
    return float(metrics["accuracy"]), metrics


def _score_with_absent(rows: list[dict], no_target: list[bool], task: str) -> tuple[float, dict]:
    """Validation of a stage 1 trained with slices without pancreas (``datasets.*.empty_share``):
    the score is the mean IoU on the pancreas slices (no box: 0) times the share of the slices
    without pancreas answered :data:`~minigpt4.boxes.NO_BOX_ANSWER`. A product, so that a model
    that boxes every slice and one that boxes none both score 0 (a mean would give the second 0.5,
    more than most useful models). ``metrics`` keeps the IoU metrics of the pancreas slices alone."""
    present = [row for row, empty in zip(rows, no_target) if not empty]
    absent = [row for row, empty in zip(rows, no_target) if empty]
    said_absent = sum(says_absent(row["answer"]) for row in absent)
    metrics = detection_metrics(present, task, n_boot=0) if present else {"task": task, "n": 0}
    metrics["no_target"] = {"n": len(absent), "said_absent": int(said_absent)}
    metrics["score_rule"] = "mean IoU on pancreas slices x share of slices without pancreas answered 'no pancreas'"
    return (primary_score(metrics) if present else 0.0) * (said_absent / len(absent)), metrics
