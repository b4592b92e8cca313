"""Calibration chosen on the validation volumes, judged on test (issue 28.1): fitting and metrics only.

* :func:`choose_calibration`: Platt scaling or isotonic regression of a raw score (the patient
  score, or slice P(tumor)), the one with the lower cross-validated log loss on the val volumes
  (folds by volume, stratified by label), refitted on all of them. Too few val volumes of a class
  to cross-validate → no map, with the reason.
* :func:`brier_score`, :func:`expected_calibration_error`, :func:`reliability_bins`: how well
  probabilities match frequencies, before (the raw score read as a probability) and after.
* :func:`calibration_report`: what ``eval_cascade.py`` writes in ``metrics.json`` → ``calibration``.
* :func:`reliability_figure`: the reliability diagram (``reliability.png``).

Applying a map belongs to the inference layer (:mod:`minigpt4.inference.calibration`); the map is
plain JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedGroupKFold

from minigpt4.evaluation.figures import _save
from minigpt4.evaluation.tables import fmt
from minigpt4.inference.calibration import CalibrationMap

N_BINS = 10
"""Equal-width probability bins of the ECE and the reliability diagram (the common choice, Guo et
al. 2017); with tens of test volumes more bins would hold one or two volumes each."""
MAX_FOLDS = 5
MIN_PER_CLASS = 2
"""Cross-validation needs each class in a training and a held-out fold."""
LOG_LOSS_CLIP = 1e-12


# ----------------------------------------------------------------------------- metrics


def _arrays(labels: Sequence[Any], probs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=float)
    p = np.asarray(probs, dtype=float)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and probabilities must be 1-D of one length, got {y.shape} and {p.shape}")
    if p.size and (np.any(~np.isfinite(p)) or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must be finite and in [0, 1]")
    return y, p


def brier_score(labels: Sequence[Any], probs: Sequence[float]) -> Optional[float]:
    """Mean squared difference between probability and outcome (0 = perfect); None when empty."""
    y, p = _arrays(labels, probs)
    return float(np.mean((p - y) ** 2)) if y.size else None


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((p * n_bins).astype(int), n_bins - 1)  # 1.0 falls in the last bin


def reliability_bins(labels: Sequence[Any], probs: Sequence[float], n_bins: int = N_BINS) -> list[dict]:
    """Per equal-width bin ``[lo, hi)`` (the last one closed): ``{lo, hi, n, mean_probability,
    fraction_positive}`` (the two None for an empty bin)."""
    y, p = _arrays(labels, probs)
    index = _bin_index(p, n_bins)
    out = []
    for b in range(n_bins):
        inside = index == b
        n = int(inside.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                    "mean_probability": float(p[inside].mean()) if n else None,
                    "fraction_positive": float(y[inside].mean()) if n else None})
    return out


def expected_calibration_error(labels: Sequence[Any], probs: Sequence[float], n_bins: int = N_BINS) -> Optional[float]:
    """ECE: ``sum_b n_b / N * |fraction positive_b - mean probability_b|`` over equal-width bins."""
    y, _ = _arrays(labels, probs)
    if not y.size:
        return None
    return float(sum(b["n"] / y.size * abs(b["fraction_positive"] - b["mean_probability"])
                     for b in reliability_bins(labels, probs, n_bins) if b["n"]))


def log_loss(labels: Sequence[Any], probs: Sequence[float]) -> float:
    y, p = _arrays(labels, probs)
    p = np.clip(p, LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# ----------------------------------------------------------------------------- fitting


def fit_platt(scores: Sequence[float], labels: Sequence[Any]) -> dict:
    """Platt's sigmoid ``1 / (1 + exp(-(a s + b)))`` by maximum likelihood on Platt's smoothed
    targets (``(N+ + 1) / (N+ + 2)`` for positives, ``1 / (N- + 2)`` for negatives, Platt 1999, as
    scikit-learn's ``CalibratedClassifierCV(method="sigmoid")`` does): finite even on separable
    data. Returns ``{"a", "b"}``."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    target = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        z = ab[0] * s + ab[1]
        # log(1 + e^z) - t z, written stably
        value = np.logaddexp(0.0, z) - target * z
        grad_z = 1.0 / (1.0 + np.exp(-z)) - target
        return float(value.sum()), np.array([float((grad_z * s).sum()), float(grad_z.sum())])

    start = np.array([0.0, math.log((n_pos + 1.0) / (n_neg + 1.0))])  # Platt's start: the prior odds
    result = minimize(loss, start, jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in result.x)
    return {"a": round(a, 8), "b": round(b, 8)}


def fit_isotonic(scores: Sequence[float], labels: Sequence[Any]) -> dict:
    """Isotonic (non-decreasing) regression of the label on the score, its values bounded to
    ``[1 / (n + 2), (n + 1) / (n + 2)]`` (n fitted volumes): no finite validation set supports a
    likelihood of exactly 0 or 1 (Laplace's rule). Returns ``{"x", "y"}``, the fitted points."""
    s = np.asarray(scores, dtype=float)
    n = s.size
    model = IsotonicRegression(y_min=1.0 / (n + 2), y_max=(n + 1.0) / (n + 2), increasing=True, out_of_bounds="clip")
    model.fit(s, np.asarray(labels, dtype=float))
    return {"x": [round(float(v), 8) for v in model.X_thresholds_], "y": [round(float(v), 8) for v in model.y_thresholds_]}


FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


def _class_counts(labels: np.ndarray, groups: np.ndarray) -> tuple[int, int]:
    """Positive and negative groups (a group is positive when any of its items is)."""
    positive = {g for g, y in zip(groups, labels) if y}
    return len(positive), len(set(groups.tolist()) - positive)


def cross_validated_log_loss(scores: Sequence[float], labels: Sequence[Any], groups: Sequence[Any],
                             method: str, n_splits: int, seed: int = 0) -> float:
    """Mean held-out log loss of ``method`` over folds of whole groups (volumes), stratified by label."""
    s, y, g = np.asarray(scores, float), np.asarray(labels, bool), np.asarray(groups)
    held_out = np.empty(s.size)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(s, y, g):
        params = FITTERS[method](s[train], y[train])
        held_out[test] = CalibrationMap(method, params).apply(s[test])
    return log_loss(y, held_out)


def choose_calibration(scores: Sequence[float], labels: Sequence[Any], groups: Optional[Sequence[Any]] = None,
                       fitted_on: Optional[dict] = None, target: str = "patient score",
                       seed: int = 0) -> tuple[Optional[CalibrationMap], dict]:
    """Platt or isotonic, whichever has the lower cross-validated log loss (Platt on ties: fewer
    parameters), refitted on every item.

    Args:
        scores: raw scores in [0, 1].
        labels: outcome per score.
        groups: the volume of each score (folds never split a volume); default one group per score.
        fitted_on: recorded in the map (``{"split": "val", "n_volumes", "dataset"}``).

    Returns:
        ``(map or None, {"chosen", "cv_log_loss": {method: value}, "n_folds", "n", "n_positive",
        "rule" | "reason"})``.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    g = np.asarray(groups if groups is not None else np.arange(s.size))
    n_pos, n_neg = _class_counts(y, g)
    info: dict[str, Any] = {"n": int(s.size), "n_groups": len(set(g.tolist())), "n_positive_groups": n_pos,
                            "n_negative_groups": n_neg}
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        info.update(chosen=None, reason=f"{n_pos} positive and {n_neg} negative val volumes: at least "
                                        f"{MIN_PER_CLASS} of each are needed to choose and fit a map; scores stay uncalibrated")
        return None, info
    n_splits = min(MAX_FOLDS, n_pos, n_neg)
    losses = {m: round(cross_validated_log_loss(s, y, g, m, n_splits, seed), 6) for m in FITTERS}
    chosen = "isotonic" if losses["isotonic"] < losses["platt"] else "platt"
    info.update(chosen=chosen, cv_log_loss=losses, n_folds=n_splits,
                rule=f"lower {n_splits}-fold cross-validated log loss on the val volumes (folds by volume; platt on ties)")
    fitted = {"n_items": int(s.size), "n_positive": int(y.sum()), **(fitted_on or {})}
    return CalibrationMap(chosen, FITTERS[chosen](s, y), fitted, target), info


def calibration_metrics(calibration: Optional[CalibrationMap], scores: Sequence[float], labels: Sequence[Any],
                        n_bins: int = N_BINS) -> dict:
    """``{"n", "n_positive", "brier": {"before", "after"}, "ece": {"before", "after"}, "bins": {"before",
    "after"}}`` on (test) scores; ``after`` None without a map. ``before`` reads the raw score as a probability."""
    s = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    y = np.asarray(labels, dtype=bool)
    after = calibration.apply(s) if calibration is not None else None
    return {"n": int(s.size), "n_positive": int(y.sum()),
            "brier": {"before": brier_score(y, s), "after": None if after is None else brier_score(y, after)},
            "ece": {"before": expected_calibration_error(y, s, n_bins),
                    "after": None if after is None else expected_calibration_error(y, after, n_bins)},
            "bins": {"before": reliability_bins(y, s, n_bins),
                     "after": None if after is None else reliability_bins(y, after, n_bins)}}


# ----------------------------------------------------------------------------- figure


def reliability_figure(panels: dict[str, dict], path: str | os.PathLike) -> Path:
    """The reliability diagram: per panel (``{"patient score": calibration_metrics(...), ...}``),
    fraction positive against mean probability per bin, before and after calibration, with the
    diagonal of perfect calibration and the Brier / ECE in the legend."""
    fig = Figure(figsize=(4.2 * len(panels), 4.4), layout="constrained")
    for i, (title, metrics) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
        for when, style in (("before", dict(color="tab:red", marker="o")), ("after", dict(color="tab:blue", marker="s"))):
            bins = metrics["bins"][when]
            if bins is None or not metrics["n"]:
                continue
            used = [b for b in bins if b["n"]]
            brier, ece = metrics["brier"][when], metrics["ece"][when]
            ax.plot([b["mean_probability"] for b in used], [b["fraction_positive"] for b in used], **style,
                    label=f"{'raw score' if when == 'before' else 'calibrated'} (Brier {brier:.3f}, ECE {ece:.3f})")
        if not metrics["n"]:
            ax.text(0.5, 0.5, "no scored test items", ha="center", va="center")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability (bin)")
        ax.set_ylabel("fraction with tumor (bin)")
        ax.set_title(f"{title}: n = {metrics['n']} ({metrics['n_positive']} with tumor)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def calibration_report(val: tuple[Sequence[float], Sequence[Any], Sequence[Any]],
                       test: tuple[Sequence[float], Sequence[Any]], fitted_on: dict, target: str,
                       seed: int = 0) -> tuple[Optional[CalibrationMap], dict]:
    """Choose a map on ``val`` ``(scores, labels, groups)`` and judge it on ``test`` ``(scores, labels)``.

    Returns:
        ``(map or None, {"target", "selection": choose_calibration's info, **calibration_metrics})``.
    """
    calibration, info = choose_calibration(*val, fitted_on=fitted_on, target=target, seed=seed)
    return calibration, {"target": target, "selection": info, **calibration_metrics(calibration, *test)}


# ----------------------------------------------------------------------------- the cascade's calibration


def _patient_items(patients: dict, aggregation: str) -> tuple[list[float], list[bool], list[str]]:
    """Scores, labels and keys of the conclusive volumes (an inconclusive one has no score)."""
    keys = [k for k, v in sorted(patients.items()) if not v["inconclusive"]]
    return ([float(patients[k]["scores"][aggregation]) for k in keys], [bool(patients[k]["label"]) for k in keys],
            ["/".join(k) for k in keys])


def _slice_items(rows: Sequence[dict]) -> tuple[list[float], list[bool], list[str]]:
    """Slice P(tumor), the slice's tumor label and its volume, where stage 2 gave a P(tumor)."""
    scored = [r for r in rows if r.get("p_tumor") is not None]
    return ([float(r["p_tumor"]) for r in scored], [bool(r["has_tumor"]) for r in scored],
            [f"{r['dataset']}/{r['volume_name']}" for r in scored])


def cascade_calibration(val_patients: dict, val_rows: Sequence[dict], patients: dict, rows: Sequence[dict],
                        aggregation: str, datasets: Sequence[str], seed: int = 0) -> tuple[Optional[dict], dict]:
    """``eval_cascade.py``'s calibration: the patient score (of the selected ``aggregation``) and slice
    P(tumor), each mapped by the method chosen on the val volumes, judged on test.

    Returns:
        ``(map, metrics)``: ``map`` is the patient map's JSON with the slice map under ``slice``
        (operating_point.json → ``calibration``; None when val cannot support a patient map);
        ``metrics`` is metrics.json → ``calibration``: ``{"brier": {before, after}, "ece": {before,
        after}}`` of the patient score on the conclusive test volumes, ``"patient"`` and ``"slice"``
        in full (selection, bins), and ``"map"``.
    """
    where = ", ".join(sorted(set(datasets)))
    val_s, val_y, val_g = _patient_items(val_patients, aggregation)
    patient_map, patient = calibration_report(
        (val_s, val_y, val_g), _patient_items(patients, aggregation)[:2],
        {"split": "val", "n_volumes": len(set(val_g)), "dataset": where}, f"patient score ({aggregation})", seed)
    val_s, val_y, val_g = _slice_items(val_rows)
    slice_map, per_slice = calibration_report(
        (val_s, val_y, val_g), _slice_items(rows)[:2],
        {"split": "val", "n_volumes": len(set(val_g)), "dataset": where}, "slice P(tumor)", seed)
    doc = None
    if patient_map is not None:
        doc = {**patient_map.as_dict(), "slice": slice_map.as_dict() if slice_map is not None else None}
    metrics = {"brier": patient["brier"], "ece": patient["ece"], "n_test_volumes": patient["n"],
               "test_volumes": "conclusive test volumes (an inconclusive one has no score)",
               "patient": patient, "slice": per_slice, "map": doc}
    return doc, metrics


def calibration_lines(calibration: dict) -> list[str]:
    """The ``tables.md`` section: per target the map chosen on val (or why none) and Brier / ECE on test."""
    lines = ["## Calibration (chosen on val, judged on test)", "",
             "| score | map (chosen on val) | val cross-validated log loss (platt / isotonic) | test n (tumor) "
             "| Brier before → after | ECE before → after |", "|---|---|---|---|---|---|"]
    for key in ("patient", "slice"):
        m = calibration[key]
        sel = m["selection"]
        chosen = sel["chosen"] or f"none: {sel['reason']}"
        cv = sel.get("cv_log_loss") or {}
        lines.append(f"| {m['target']} | {chosen} | {fmt(cv.get('platt'))} / {fmt(cv.get('isotonic'))} "
                     f"| {m['n']} ({m['n_positive']}) | {fmt(m['brier']['before'])} → {fmt(m['brier']['after'])} "
                     f"| {fmt(m['ece']['before'])} → {fmt(m['ece']['after'])} |")
    lines += ["", f"Before: the raw score read as a probability. ECE over {N_BINS} equal-width bins. Patient scores of "
              "the conclusive volumes only (an inconclusive volume has none). The reliability diagram is `reliability.png`.", ""]
    return lines
