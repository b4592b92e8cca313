"""Patient-level operating points of the cascade (``eval_cascade.py``): slice P(tumor) aggregated
per volume, thresholds chosen on val (Youden's J, screening specificities, stage 3's slice gate),
sensitivity / specificity with bootstrap CIs over volumes, inconclusive volumes never negative."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from minigpt4.evaluation.stats import auc_score, cluster_bootstrap, safe_ratio
from minigpt4.inference.patient import AGGREGATIONS, aggregate, z_consistent

FALLBACK_THRESHOLD = 0.5


SCREENING_SPECIFICITIES = (0.95, 0.99)
"""Screening operating points: thresholds chosen on val for specificity >= each target."""
INCONCLUSIVE_MODES = {
    "inconclusive_as_positive": "inconclusive volumes counted as positive (sent to follow-up)",
    "inconclusive_excluded": "inconclusive volumes left out",
}
"""The two ways patient metrics are reported; an inconclusive volume is never scored as negative."""


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[Optional[float], Optional[float]]:
    """Positive where ``score >= threshold``; None for a class that is absent."""
    labels = np.asarray(labels, dtype=bool)
    called = np.asarray(scores, dtype=float) >= threshold
    return safe_ratio(float((called & labels).sum()), float(labels.sum())), \
        safe_ratio(float((~called & ~labels).sum()), float((~labels).sum()))


def choose_threshold(labels: Sequence[bool], scores: Sequence[float]) -> Optional[float]:
    """The score value maximising Youden's J = sensitivity + specificity − 1 (positive where
    ``score >= threshold``); ties → the highest such threshold (fewer positives). None when a
    class is absent."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    if labels.all() or not labels.any():
        return None
    best, best_j = None, -math.inf
    for t in sorted(set(scores.tolist()), reverse=True):
        sens, spec = sensitivity_specificity(labels, scores, t)
        j = sens + spec - 1
        if j > best_j + 1e-12:
            best, best_j = t, j
    return float(best)


def negatives_needed(specificity: float) -> int:
    """Negatives val must hold to verify ``specificity``: enough that one false positive is allowed
    (20 for 95 %, 100 for 99 %). With fewer, "specificity >= target on val" only means no false
    positive at all, which says nothing about the target."""
    return int(math.ceil(round(1.0 / (1.0 - specificity), 9)))


def screening_threshold(labels: Sequence[bool], scores: Sequence[float], specificity: float) -> Optional[float]:
    """The lowest threshold (most sensitive) whose specificity on ``labels``/``scores`` is >=
    ``specificity`` (positive where ``score >= threshold``); candidates are the scores and just
    above the largest (nothing called positive). None without negatives."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    if labels.all() or not labels.size:
        return None
    candidates = sorted(set(scores.tolist())) + [float(np.nextafter(scores.max(), np.inf))]
    for t in candidates:
        if sensitivity_specificity(labels, scores, t)[1] >= specificity - 1e-12:
            return float(t)
    return candidates[-1]  # unreachable: above the largest score every negative is called negative




def patient_scores(rows: Sequence[dict], top_k: int, min_boxed_slices: int = 1,
                   z_rule: str = "none") -> dict[tuple[str, str], dict]:
    """``{(dataset, volume): {dataset, label, scores: {aggregation: score}, n_boxed, n_dropped,
    inconclusive}}`` from slice rows, as :func:`minigpt4.inference.pipeline.patient_result` decides:
    the 3-D consistency rule ``z_rule`` keeps some pancreas boxes (:func:`z_consistent`; a dropped
    box's P(tumor) does not count), ``n_boxed`` counts the kept ones and ``inconclusive`` is fewer
    than ``min_boxed_slices`` kept. ``label``: the rows' ``patient_label`` where they carry one
    (PANORAMA: the clinical sheet's, so a PDAC study without lesion voxels is PDAC), else whether a
    slice holds tumor voxels. A volume's rows come in slice order (as eval_cascade writes them)."""
    by_volume: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_volume.setdefault((row["dataset"], row["volume_name"]), []).append(row)
    out = {}
    for key, vrows in by_volume.items():
        boxes = [r.get("pancreas_box") for r in vrows]
        keep = z_consistent(boxes, z_rule)
        ps = [None if box is not None and not kept else r["p_tumor"] for r, box, kept in zip(vrows, boxes, keep)]
        kept = sum(keep)
        # PANORAMA: the clinical sheet's patient label (a PDAC study without lesion voxels is PDAC)
        label = vrows[0]["patient_label"] == "PDAC" if vrows[0].get("patient_label") else any(r["has_tumor"] for r in vrows)
        out[key] = {"dataset": key[0], "label": label,
                    "scores": {m: aggregate(ps, m, top_k) for m in AGGREGATIONS},
                    "n_boxed": kept, "n_dropped": sum(b is not None for b in boxes) - kept,
                    "inconclusive": kept < max(1, min_boxed_slices)}
    return out


def _patient_arrays(patients: dict, method: str, mode: str) -> tuple[list, np.ndarray, np.ndarray]:
    """``(keys, labels, scores)`` of the volumes a mode scores: ``inconclusive_as_positive`` gives an
    inconclusive volume the score +inf (called positive at every threshold, ranked above all in
    the AUC); ``inconclusive_excluded`` leaves it out."""
    if mode not in INCONCLUSIVE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(INCONCLUSIVE_MODES)}")
    keys = [k for k, v in patients.items() if mode == "inconclusive_as_positive" or not v["inconclusive"]]
    labels = np.asarray([patients[k]["label"] for k in keys], dtype=bool)
    scores = np.asarray([math.inf if patients[k]["inconclusive"] else patients[k]["scores"][method] for k in keys],
                        dtype=float)
    return keys, labels, scores


def select_operating_point(val_patients: dict, aggregation: str, threshold: Optional[float]) -> dict:
    """Aggregation and patient threshold from the conclusive validation volumes.

    ``aggregation='auto'``: the one with the highest val AUC (the first of :data:`AGGREGATIONS` on
    ties, ``max`` when undefined).
    Per aggregation the threshold is ``threshold`` when given, else Youden's J on val (0.5 when
    val lacks a class, said in ``notes``). Inconclusive val volumes have no score to choose on.
    """
    n_inconclusive = sum(v["inconclusive"] for v in val_patients.values())
    selection: dict[str, Any] = {"n_val_volumes": len(val_patients), "n_val_inconclusive": n_inconclusive,
                                 "val_auc": {}, "thresholds": {}, "notes": []}
    fallback: set[str] = set()
    for method in AGGREGATIONS:
        _, labels, scores = _patient_arrays(val_patients, method, "inconclusive_excluded")
        selection["n_val_tumor"] = int(labels.sum())
        selection["val_auc"][method] = auc_score(labels, scores) if labels.size else None
        if threshold is not None:
            selection["thresholds"][method] = float(threshold)
            continue
        chosen = choose_threshold(labels, scores) if labels.size else None
        if chosen is None:
            chosen = FALLBACK_THRESHOLD
            fallback.add(method)
            selection["notes"].append(f"{method}: {_no_choice(labels.size)}: threshold {FALLBACK_THRESHOLD}")
        selection["thresholds"][method] = chosen
    if aggregation == "auto":
        aucs = selection["val_auc"]
        aggregation = max(AGGREGATIONS, key=lambda m: (-1.0 if aucs[m] is None else aucs[m], -AGGREGATIONS.index(m)))
        selection["aggregation_rule"] = f"highest patient AUC on val (ties: the first of {', '.join(AGGREGATIONS)})"
    else:
        selection["aggregation_rule"] = "configured"
    selection["aggregation"] = aggregation
    selection["threshold"] = selection["thresholds"][aggregation]
    selection["threshold_rule"] = "configured (cascade.threshold)" if threshold is not None else \
        f"{FALLBACK_THRESHOLD}: {_no_choice(selection['n_val_volumes'] - n_inconclusive)}" if aggregation in fallback \
        else "Youden's J on val"
    return selection


def _no_choice(n_conclusive: int) -> str:
    """Why no threshold could be chosen on the val volumes."""
    return "no val volume is conclusive" if n_conclusive == 0 else "the conclusive val volumes hold one class only"


def choose_slice_threshold(val_rows: Sequence[dict], configured: Optional[float]) -> dict:
    """Stage 3's slice gate: ``configured`` (``cascade.slice_threshold``) or Youden's J of slice
    P(tumor) against the slice's tumor label on the val slices that have a P(tumor) (those the
    gate decides on); 0.5 when they hold one class. Separate from the patient threshold."""
    scored = [r for r in val_rows if r["p_tumor"] is not None]
    labels = [r["has_tumor"] for r in scored]
    out: dict[str, Any] = {"n_val_slices_scored": len(scored), "n_val_tumor_slices_scored": int(sum(labels))}
    if configured is not None:
        return {**out, "slice_threshold": float(configured), "slice_threshold_rule": "configured (cascade.slice_threshold)"}
    chosen = choose_threshold(labels, [r["p_tumor"] for r in scored]) if scored else None
    if chosen is None:
        why = "val slices with a P(tumor) hold one class only" if scored else "no val slice has a P(tumor)"
        return {**out, "slice_threshold": FALLBACK_THRESHOLD, "slice_threshold_rule": f"{why}: {FALLBACK_THRESHOLD}"}
    return {**out, "slice_threshold": chosen, "slice_threshold_rule": "Youden's J of slice P(tumor) on val"}


def _rates_with_ci(patients: dict, method: str, mode: str, threshold: float, n_boot: int, seed: int,
                   with_auc: bool = False) -> dict:
    """Sensitivity and specificity (and AUC) at ``threshold`` in one mode, with volume bootstrap CIs."""
    keys, labels, scores = _patient_arrays(patients, method, mode)

    def stat(idx: np.ndarray) -> dict:
        sens, spec = sensitivity_specificity(labels[idx], scores[idx], threshold)
        return {**({"auc": auc_score(labels[idx], scores[idx])} if with_auc else {}), "sensitivity": sens, "specificity": spec}

    point = stat(np.arange(len(keys)))
    ci = cluster_bootstrap(keys, stat, n_boot=n_boot, seed=seed, strata=[patients[k]["dataset"] for k in keys])
    return {"threshold": threshold, **point, "ci95": ci}


def patient_metrics(patients: dict, thresholds: dict, n_boot: int, seed: int) -> dict:
    """Counts, then per mode (:data:`INCONCLUSIVE_MODES`) and aggregation: AUC, sensitivity and
    specificity at its threshold, with volume bootstrap CIs."""
    out: dict[str, Any] = {"n_volumes": len(patients), "n_tumor": sum(v["label"] for v in patients.values()),
                           "n_inconclusive": sum(v["inconclusive"] for v in patients.values()),
                           "n_inconclusive_tumor": sum(v["inconclusive"] and v["label"] for v in patients.values())}
    for mode in INCONCLUSIVE_MODES:
        _, labels, _ = _patient_arrays(patients, "max", mode)
        out[mode] = {"n_volumes": int(labels.size), "n_tumor": int(labels.sum())}
        for method in AGGREGATIONS:
            out[mode][method] = _rates_with_ci(patients, method, mode, thresholds[method], n_boot, seed, with_auc=True)
    return out


def operating_points(val_patients: dict, patients: dict, selection: dict, n_boot: int, seed: int) -> dict:
    """Youden's J and the screening points (specificity >= 95 %, >= 99 %), chosen on the conclusive
    val volumes for the selected aggregation; test sensitivity / specificity with CIs in both modes.

    A specificity target is chosen only when val holds :func:`negatives_needed` negatives
    (20 for 95 %, 100 for 99 %); otherwise the point says why instead of giving a number.
    """
    method = selection["aggregation"]
    _, labels, scores = _patient_arrays(val_patients, method, "inconclusive_excluded")
    n_neg = int((~labels).sum())
    points: dict[str, Any] = {"aggregation": method, "n_val_negative": n_neg}
    wanted = [("youden", None)] + [(f"specificity_{round(s * 100)}", s) for s in SCREENING_SPECIFICITIES]
    for name, target in wanted:
        point: dict[str, Any] = {"target_specificity": target}
        if target is None:
            point.update(rule=selection["threshold_rule"], threshold=selection["threshold"])
        elif n_neg < negatives_needed(target):
            point.update(rule=f"lowest val threshold with specificity >= {target:.0%}", threshold=None,
                         reason=f"val has {n_neg} negative volume(s); verifying specificity >= {target:.0%} needs at "
                                f"least {negatives_needed(target)} (one false positive in {negatives_needed(target)})")
            points[name] = point
            continue
        else:
            point.update(rule=f"lowest val threshold with specificity >= {target:.0%}",
                         threshold=screening_threshold(labels, scores, target))
        point["val_sensitivity"], point["val_specificity"] = sensitivity_specificity(labels, scores, point["threshold"]) \
            if labels.size else (None, None)
        point["test"] = {mode: _rates_with_ci(patients, method, mode, point["threshold"], n_boot, seed)
                         for mode in INCONCLUSIVE_MODES}
        points[name] = point
    return points


def choose_z_rule(selections: dict) -> str:
    """The 3-D consistency rule whose selected aggregation has the highest val AUC; ties (or no AUC):
    the first in ``selections``' order (:data:`minigpt4.inference.patient.Z_RULES`: ``none`` first)."""
    def auc(z: str) -> float:
        value = selections[z]["val_auc"][selections[z]["aggregation"]]
        return -1.0 if value is None else value

    names = list(selections)
    return max(names, key=lambda z: (auc(z), -names.index(z)))


def box_counts(patients: dict) -> dict:
    """Pancreas boxes kept and dropped by the 3-D rule over a split's volumes."""
    return {"kept": int(sum(p["n_boxed"] for p in patients.values())),
            "dropped": int(sum(p["n_dropped"] for p in patients.values())),
            "n_volumes": len(patients), "n_inconclusive": int(sum(p["inconclusive"] for p in patients.values()))}


def rules_considered(val_by_z: dict, test_by_z: dict, selections: dict, chosen_z: str, n_boot: int, seed: int) -> list[dict]:
    """Every (3-D rule, aggregation) considered: its val AUC (conclusive val volumes, what chose it)
    and test AUC with volume bootstrap CIs in both inconclusive modes, so the choice on val can be
    read against test without anyone choosing on test."""
    out = []
    for z, val_patients in val_by_z.items():
        metrics = patient_metrics(test_by_z[z], selections[z]["thresholds"], n_boot, seed)
        for method in AGGREGATIONS:
            row = {"z_rule": z, "aggregation": method, "val_auc": selections[z]["val_auc"][method],
                   "n_val_volumes": len(val_patients),
                   "n_val_inconclusive": int(sum(p["inconclusive"] for p in val_patients.values())),
                   "selected": z == chosen_z and method == selections[z]["aggregation"]}
            for mode in INCONCLUSIVE_MODES:
                m = metrics[mode][method]
                row[f"test_auc_{mode}"] = m["auc"]
                row[f"test_auc_{mode}_ci95"] = (m.get("ci95") or {}).get("auc")
            row["n_test_volumes"] = metrics["n_volumes"]
            row["n_test_inconclusive"] = metrics["n_inconclusive"]
            out.append(row)
    return out
