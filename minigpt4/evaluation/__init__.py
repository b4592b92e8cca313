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
        :func:`detection_metrics` without bootstrap; classification → accuracy (invalid answers
        wrong) and :func:`classification_metrics` without bootstrap or AUC.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    selected = subsample(records, max_samples)
    if not selected:
        raise ValueError(f"validation_score: no records for task {task!r}")
    if task in DETECTION_TASKS:
        rows = predict_detection(model, selected, task, batch_size, feature_cache=feature_cache)
        metrics = detection_metrics(rows, task, n_boot=0)
        return primary_score(metrics), metrics
    rows = predict_classification(model, selected, batch_size, with_probability=False, feature_cache=feature_cache)
    metrics = classification_metrics(rows, n_boot=0)
    return float(metrics["accuracy"]), metrics
