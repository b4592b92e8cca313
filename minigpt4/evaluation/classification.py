"""Tumor classification evaluation (SPEC §6, paper Table 2).

Answers are parsed by :func:`minigpt4.boxes.parse_yes_no`. An answer that is neither ``yes`` nor
``no`` is **invalid**: it is counted as wrong (a false negative on a tumor slice, a false positive
on a healthy one), never silently as ``no`` as the release did. ``yes`` is the positive class.
The AUC uses the model's P(yes) / (P(yes) + P(no)) at the first answer token.

A *prediction row* (one line of ``predictions.jsonl``)::

    {"q_id", "dataset", "volume_name", "slice_index", "image", "question", "answer" (raw text),
     "pred_answer" (yes | no | null), "p_yes" (float | null), "gt_answer", "correct"}
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from minigpt4.boxes import parse_yes_no
from minigpt4.evaluation.common import eval_mode, iter_batches, record_identity
from minigpt4.evaluation.stats import auc_score, binary_metrics_from_counts, cluster_bootstrap

RESCORE_KEYS = ("answer", "gt_answer", "dataset")
LABELS = ("yes", "no")


def classification_row(record: dict, answer: str, p_yes: Optional[float] = None, question: Optional[str] = None) -> dict:
    """Parse one answer for a TC record and return its prediction row."""
    pred = parse_yes_no(answer)
    return {
        **record_identity(record),
        "question": question,
        "answer": answer,
        "pred_answer": pred,
        "p_yes": None if p_yes is None else float(p_yes),
        "gt_answer": record["answer"],
        "correct": pred == record["answer"],
    }


def rescore_rows(rows: Sequence[dict], source: str = "predictions") -> list[dict]:
    """Re-parse saved rows (``answer, gt_answer, dataset``; optional ``p_yes, volume_name``).

    Raises:
        ValueError: a row lacks a key or its ground truth is not yes/no (names the line).
    """
    out = []
    for number, row in enumerate(rows, 1):
        absent = [k for k in RESCORE_KEYS if k not in row]
        if absent:
            raise ValueError(f"{source}: line {number} lacks {absent} (re-scoring needs {list(RESCORE_KEYS)})")
        if row["gt_answer"] not in LABELS:
            raise ValueError(f"{source}: line {number}: gt_answer must be yes or no, got {row['gt_answer']!r}")
        p_yes = row.get("p_yes")
        if p_yes is not None and not (isinstance(p_yes, (int, float)) and 0.0 <= p_yes <= 1.0):
            raise ValueError(f"{source}: line {number}: p_yes must be a probability or null, got {p_yes!r}")
        rescored = classification_row({**row, "answer": row["gt_answer"]}, row["answer"], p_yes, row.get("question"))
        out.append({**row, "pred_answer": rescored["pred_answer"], "correct": rescored["correct"]})
    return out


def _nan_to_none(value: float) -> Optional[float]:
    value = float(value)
    return None if math.isnan(value) else value


def _scored_arrays(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y_true, y_pred, invalid)`` as 0/1 arrays; an invalid answer predicts the wrong class."""
    y_true = np.asarray([r["gt_answer"] == "yes" for r in rows], dtype=int)
    invalid = np.asarray([r["pred_answer"] not in LABELS for r in rows], dtype=bool)
    y_pred = np.asarray([r["pred_answer"] == "yes" for r in rows], dtype=int)
    y_pred[invalid] = 1 - y_true[invalid]
    return y_true, y_pred, invalid


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (scikit-learn, ``yes`` positive), AUC, invalid count and
    confusion matrix of rows. Undefined values (e.g. precision with no ``yes`` prediction, AUC with
    one class, AUC without P(yes)) are None."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    y_true, y_pred, invalid = _scored_arrays(rows)
    p_yes = [r.get("p_yes") for r in rows]
    auc = None
    if all(p is not None for p in p_yes) and 0 < y_true.sum() < n:
        auc = float(roc_auc_score(y_true, np.asarray(p_yes, dtype=float)))
    counts = [[0, 0, 0], [0, 0, 0]]  # rows: truth yes/no; columns: predicted yes/no/invalid
    for r in rows:
        column = LABELS.index(r["pred_answer"]) if r["pred_answer"] in LABELS else 2
        counts[LABELS.index(r["gt_answer"])][column] += 1
    return {
        "n": n,
        "n_yes": int(y_true.sum()),
        "n_no": int(n - y_true.sum()),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": _nan_to_none(precision_score(y_true, y_pred, zero_division=np.nan)),
        "recall": _nan_to_none(recall_score(y_true, y_pred, zero_division=np.nan)),
        "f1": _nan_to_none(f1_score(y_true, y_pred, zero_division=np.nan)),
        "auc": auc,
        "invalid": int(invalid.sum()),
        "invalid_rate": float(invalid.mean()),
        "confusion_matrix": {"rows": ["yes", "no"], "columns": ["yes", "no", "invalid"], "counts": counts},
    }


def summarize_source(rows: Sequence[dict]) -> dict[str, Any]:
    """:func:`summarize` for the rows of one source dataset, without what a single-class source
    cannot define: with one class, accuracy *is* specificity (all ``no``, NIH in the paper's set) or
    sensitivity (all ``yes``, MSD); precision, recall, F1 and AUC are dropped. ``measures`` names it."""
    summary = summarize(rows)
    if summary["n"] == 0:
        return summary
    if summary["n_yes"] and summary["n_no"]:
        return {**summary, "measures": "accuracy"}
    keep = ("n", "n_yes", "n_no", "accuracy", "invalid", "invalid_rate", "confusion_matrix")
    return {**{k: summary[k] for k in keep}, "measures": "sensitivity" if summary["n_yes"] else "specificity"}


def _intervals(rows: Sequence[dict], n_boot: int, seed: int) -> dict:
    if not rows or any(r.get("volume_name") is None for r in rows):
        return {}
    y_true, y_pred, _ = _scored_arrays(rows)
    p_yes = [r.get("p_yes") for r in rows]
    scores = np.asarray(p_yes, dtype=float) if all(p is not None for p in p_yes) else None

    def statistic(idx: np.ndarray) -> dict:
        t, p = y_true[idx], y_pred[idx]
        tp = int((t & p).sum())
        fp = int(((1 - t) & p).sum())
        fn = int((t & (1 - p)).sum())
        tn = int(idx.size - tp - fp - fn)
        result = binary_metrics_from_counts(tp, fp, fn, tn)
        if scores is not None:
            result["auc"] = auc_score(t, scores[idx])
        return result

    clusters = [(r["dataset"], r["volume_name"]) for r in rows]
    return cluster_bootstrap(clusters, statistic, n_boot=n_boot, seed=seed, strata=[r["dataset"] for r in rows])


def classification_metrics(rows: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Overall metrics, 95 % bootstrap intervals by volume, and the same per source dataset.

    The per-dataset numbers expose the TC confound: NIH slices are all ``no`` and MSD slices all
    ``yes``, so per dataset only accuracy (= specificity on NIH, sensitivity on MSD) is defined
    (:func:`summarize_source`), with its interval.
    """
    datasets = sorted({r["dataset"] for r in rows})
    metrics: dict[str, Any] = {"task": "tumor_classification", **summarize(rows)}
    metrics["per_dataset"] = {ds: summarize_source([r for r in rows if r["dataset"] == ds]) for ds in datasets}
    if n_boot > 0:
        per_source = {}
        for ds in datasets:
            intervals = _intervals([r for r in rows if r["dataset"] == ds], n_boot, seed)
            both_classes = metrics["per_dataset"][ds].get("measures") == "accuracy"
            defined = {"accuracy", "precision", "recall", "f1", "auc"} if both_classes else {"accuracy"}
            per_source[ds] = {k: v for k, v in intervals.items() if k in defined}
        metrics["ci95"] = {
            "overall": _intervals(rows, n_boot, seed),
            "per_dataset": per_source,
            "method": f"percentile bootstrap, {n_boot} replicates, volumes resampled within each dataset, seed {seed}",
        }
    return metrics


def predict_classification(
    model: Any,
    records: Sequence[dict],
    batch_size: int = 16,
    with_probability: bool = True,
    max_new_tokens: Optional[int] = None,
    num_workers: int = 0,
    progress: Any = None,
    feature_cache: Any = None,
    question: Optional[str] = None,
) -> list[dict]:
    """Greedy answers (and P(yes) when ``with_probability``) for TC records, one row each, in order.

    Args:
        model: a MiniGPTPancreas (``encode_tower``, ``generate``, ``yes_probability``, ``image_transform``).
        records: TC selected records (``answer`` = ground truth).
        with_probability: also run ``model.yes_probability`` (one extra LLaMA forward pass, the
            same ViT tokens) for the AUC.
        feature_cache: see :func:`minigpt4.evaluation.detection.predict_detection`.
        question: the yes/no question asked (None = the paper's first question).
    """
    rows: list[dict] = []
    with eval_mode(model):
        batches = iter_batches(model, records, "tumor_classification", batch_size, num_workers, feature_cache=feature_cache,
                               question=question)
        for batch_records, tower_tokens, questions in batches:
            answers = model.generate(None, questions, max_new_tokens=max_new_tokens, tower_tokens=tower_tokens)
            if len(answers) != len(batch_records):
                raise RuntimeError(f"model.generate returned {len(answers)} answers for {len(batch_records)} images")
            if with_probability:
                p_yes = model.yes_probability(None, questions, tower_tokens=tower_tokens).float().cpu().tolist()
            else:
                p_yes = [None] * len(answers)
            rows.extend(classification_row(r, a, p, q) for r, a, p, q in zip(batch_records, answers, p_yes, questions))
            if progress is not None:
                progress(len(rows), len(records))
    return rows
