"""Scoring the PANORAMA way (issue 27, SPEC §9): patient AUROC + lesion AP with ``picai_eval``.

Per study (volume) the cascade gives a **patient PDAC likelihood** (the aggregated slice
P(tumor)) and a **detection map** (:mod:`minigpt4.scan_outputs.detection_map`: connected lesion
candidates, one likelihood each, in the CT's geometry). ``picai_eval.evaluate`` matches each
map's candidates to the reference lesions (label 1) with PANORAMA's overlap criterion, IoU >= 0.10
(``min_overlap=0.10, overlap_func="IoU"``, picai_eval's defaults), giving the lesion-level
TP / FP / FN list; the lesion-level **average precision** is computed on it. The patient level
is scored as PANORAMA scores it: the **AUROC** of the patient likelihood (not the map's maximum)
against the patient truth from the clinical sheet (``patient_label``: a PDAC patient whose label
has no lesion voxel is still PDAC, and a non-PDAC study with label-1 voxels is still non-PDAC;
both are listed in the result). Ranking score = (AUROC + AP) / 2. 95 % CIs by resampling studies
with replacement (picai_eval computes each resample's AUROC and AP; a resample without both
patient classes, or without a lesion, is skipped and counted).

Our numbers are on our own split of PANORAMA's public training set; the challenge's anchors
(:data:`ANCHORS`) are on its hidden test set.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

with contextlib.redirect_stdout(io.StringIO()):  # picai_eval prints a banner on import
    from picai_eval import Metrics, evaluate as picai_evaluate

MIN_OVERLAP = 0.10
"""PANORAMA's hit criterion: a candidate hits a reference lesion at IoU >= 0.10 (picai_eval's default)."""
OVERLAP = "IoU"
ANCHORS = (
    ("PANORAMA AI (Alves et al., Lancet Oncology 2025)", "AUROC 0.92 (95 % CI 0.90–0.93)", "1,130 patients of the hidden test set"),
    ("68 radiologists (same study)", "AUROC 0.88 (95 % CI 0.85–0.91)", "391-patient subset of the hidden test set"),
)
ANCHOR_NOTE = ("The anchors are PANORAMA's hidden test set (other patients, another reader study): they are not our "
               "test split of the public training set, so they give the scale, not a comparison on the same cases.")


@dataclass
class PanoramaCase:
    """One study: ``name``, ``detection_map`` (float32, stored voxel order), ``lesions`` (reference
    lesion mask, label == 1, same shape), ``likelihood`` (patient PDAC likelihood), ``pdac`` (the
    sheet's patient label)."""

    name: str
    detection_map: np.ndarray
    lesions: np.ndarray
    likelihood: float
    pdac: bool


def _both_classes(targets: Sequence[int]) -> bool:
    return 0 < sum(targets) < len(targets)


def bootstrap_ci(metrics: Metrics, n: int, seed: int) -> dict:
    """95 % percentile CIs of AUROC, AP and score over ``n`` resamples of the studies."""
    if n <= 0:
        return {"n_bootstrap": 0}
    rng = np.random.default_rng(seed)
    names = list(metrics.subject_list)
    auroc, ap, score = [], [], []
    skipped = {"auroc": 0, "ap": 0}
    for _ in range(n):
        sample = list(rng.choice(names, size=len(names), replace=True))
        a = p = None
        if _both_classes([metrics.case_target[s] for s in sample]):
            a = metrics.calc_auroc(subject_list=sample)
            auroc.append(a)
        else:
            skipped["auroc"] += 1
        if any(t for s in sample for t, *_ in metrics.lesion_results[s]):
            p = metrics.calc_AP(subject_list=sample)
            ap.append(p)
        else:
            skipped["ap"] += 1
        if a is not None and p is not None:
            score.append((a + p) / 2)

    def ci(values):
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None

    return {"auroc": ci(auroc), "ap": ci(ap), "score": ci(score), "n_bootstrap": n, "skipped": skipped, "seed": seed}


def score_cases(cases: Sequence[PanoramaCase], n_bootstrap: int = 1000, seed: int = 42) -> tuple[dict, Metrics]:
    """The ``panorama`` section of ``metrics.json`` and picai_eval's Metrics (for the figures).

    Returns ``auroc`` / ``ap`` / ``score`` (None where undefined: AUROC needs both patient
    classes, AP a reference lesion), ``ci95``, counts, the lesion list's TP/FP/FN counts at
    any likelihood, the criterion, and the studies whose sheet label and label voxels disagree.

    Raises:
        ValueError: no case, a name twice, a map and mask of different shapes, a negative or
            non-finite map value or likelihood (naming the study).
    """
    if not cases:
        raise ValueError("PANORAMA scoring: no study to score")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"PANORAMA scoring: study names given twice: {sorted({n for n in names if names.count(n) > 1})}")
    for c in cases:
        if c.detection_map.shape != c.lesions.shape:
            raise ValueError(f"{c.name}: detection map {c.detection_map.shape} and reference {c.lesions.shape} differ in shape")
        if not np.all(np.isfinite(c.detection_map)) or c.detection_map.min(initial=0) < 0:
            raise ValueError(f"{c.name}: the detection map holds negative or non-finite values")
        if not np.isfinite(c.likelihood) or c.likelihood < 0:
            raise ValueError(f"{c.name}: patient likelihood {c.likelihood!r} is not a finite value >= 0")
    start = time.perf_counter()
    lesion_level = picai_evaluate(
        y_det=[np.asarray(c.detection_map, dtype=np.float32) for c in cases],
        y_true=[(np.asarray(c.lesions) > 0).astype(np.int32) for c in cases],
        subject_list=names, min_overlap=MIN_OVERLAP, overlap_func=OVERLAP, num_parallel_calls=1)
    seconds = time.perf_counter() - start
    metrics = Metrics(lesion_results=lesion_level.lesion_results, lesion_weight=lesion_level.lesion_weight,
                      case_target={c.name: int(bool(c.pdac)) for c in cases},
                      case_pred={c.name: float(c.likelihood) for c in cases})
    flat = metrics.lesion_results_flat
    n_lesions = sum(int(t) for t, *_ in flat)
    auroc = float(metrics.auroc) if _both_classes(list(metrics.case_target.values())) else None
    ap = float(metrics.AP) if n_lesions else None
    result = {
        "auroc": auroc, "ap": ap,
        "score": None if auroc is None or ap is None else (auroc + ap) / 2,
        "ci95": bootstrap_ci(metrics, n_bootstrap, seed),
        "n_studies": len(cases), "n_pdac": sum(bool(c.pdac) for c in cases),
        "n_reference_lesions": n_lesions,
        "n_candidates": sum(1 for t, p, _ in flat if p > 0),
        "n_true_positive": sum(1 for t, p, _ in flat if t and p > 0),
        "n_false_positive": sum(1 for t, p, _ in flat if not t),
        "n_missed": sum(1 for t, p, _ in flat if t and p == 0),
        "criterion": {"overlap": OVERLAP, "min_overlap": MIN_OVERLAP, "scorer": "picai_eval", "version": _version()},
        "patient_truth": "patient_label of the clinical sheet (PDAC | non-PDAC), not the label voxels",
        "pdac_without_lesion_voxels": sorted(c.name for c in cases if c.pdac and not np.any(c.lesions)),
        "non_pdac_with_lesion_voxels": sorted(c.name for c in cases if not c.pdac and np.any(c.lesions)),
        "seconds_lesion_matching": round(seconds, 4),
    }
    return result, metrics


def _version() -> str:
    from importlib.metadata import version

    return version("picai_eval")


def panorama_figure(metrics: Metrics, path: Path) -> Path:
    """FROC (lesion sensitivity vs false positives per study), patient ROC and lesion PR in one PNG."""
    from matplotlib.figure import Figure

    from minigpt4.evaluation.figures import _save

    fig = Figure(figsize=(10.5, 3.4))
    ax = fig.add_subplot(1, 3, 1)
    if any(t for t, *_ in metrics.lesion_results_flat):
        fp, tpr = np.asarray(metrics.lesion_FPR), np.asarray(metrics.lesion_TPR)
        finite = np.isfinite(fp)
        ax.plot(fp[finite], tpr[finite], ".-", color="black", lw=1, ms=3)
    ax.set_xlabel("false positives per study")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title("FROC", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax = fig.add_subplot(1, 3, 2)
    if _both_classes(list(metrics.case_target.values())):
        roc = metrics.calculate_ROC()
        ax.plot(roc["FPR"], roc["TPR"], "-", color="black", lw=1)
        ax.set_title(f"patient ROC (AUROC {roc['AUROC']:.3f})", fontsize=9)
    else:
        ax.set_title("patient ROC (one class only)", fontsize=9)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax = fig.add_subplot(1, 3, 3)
    if any(t for t, *_ in metrics.lesion_results_flat):
        pr = metrics.calculate_precision_recall()
        ax.step(pr["recall"], pr["precision"], where="post", color="black", lw=1)
        ax.set_title(f"lesion PR (AP {pr['AP']:.3f})", fontsize=9)
    else:
        ax.set_title("lesion PR (no reference lesion)", fontsize=9)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    for ax in fig.axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def panorama_table(section: dict) -> str:
    """``tables.md``'s PANORAMA part: ours (with CIs) beside the challenge's anchors."""
    from minigpt4.evaluation.tables import fmt

    ci = section.get("ci95") or {}

    def cell(name: str) -> str:
        value, bounds = section.get(name), ci.get(name)
        return fmt(value) + (f" [{fmt(bounds[0])}, {fmt(bounds[1])}]" if value is not None and bounds else "")

    crit = section["criterion"]
    lines = [
        "## PANORAMA scoring (picai_eval)", "",
        f"{section['n_studies']} test studies ({section['n_pdac']} PDAC by the clinical sheet), "
        f"{section['n_reference_lesions']} reference lesions; a candidate hits a lesion at {crit['overlap']} >= "
        f"{crit['min_overlap']:g} ({crit['scorer']} {crit['version']}); 95 % CIs from "
        f"{ci.get('n_bootstrap', 0)} bootstrap resamples of the studies.", "",
        "| | patient AUROC | lesion AP | score (AUROC + AP) / 2 | cases |", "|---|---|---|---|---|",
        f"| this run | {cell('auroc')} | {cell('ap')} | {cell('score')} | {section['n_studies']} studies of our test split |",
    ]
    for who, value, cases in ANCHORS:
        lines.append(f"| {who} | {value.removeprefix('AUROC ')} | not reported here | — | {cases} |")
    lines += ["", ANCHOR_NOTE, "",
              f"Lesion candidates: {section['n_candidates']} ({section['n_true_positive']} hits, "
              f"{section['n_false_positive']} false positives); {section['n_missed']} reference lesions missed."]
    if section["pdac_without_lesion_voxels"]:
        lines.append(f"PDAC by the sheet but no lesion voxel in the label (scored PDAC at patient level, no lesion to find): "
                     f"{', '.join(section['pdac_without_lesion_voxels'])}.")
    if section["non_pdac_with_lesion_voxels"]:
        lines.append(f"Non-PDAC by the sheet but label-1 voxels in the label (scored non-PDAC at patient level; their "
                     f"label-1 voxels count as lesions): {', '.join(section['non_pdac_with_lesion_voxels'])}.")
    return "\n".join(lines) + "\n"
