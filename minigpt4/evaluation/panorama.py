"""Scoring the PANORAMA way (issue 27, SPEC §9): patient AUROC + lesion AP with ``picai_eval``.

Per study (volume) the cascade gives a **patient PDAC likelihood** (the aggregated slice
P(tumor)) and a **detection map** (:mod:`minigpt4.scan_outputs.detection_map`: connected lesion
candidates, one likelihood each, in the CT's geometry). ``picai_eval`` (``evaluate_case``, what
``picai_eval.evaluate`` runs per case) matches each map's candidates to the reference lesions (label 1) with PANORAMA's overlap criterion, IoU >= 0.10
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
import functools
import io
import time
from importlib.metadata import version
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from matplotlib.figure import Figure

from minigpt4.evaluation.figures import _save
from minigpt4.evaluation.tables import fmt
from minigpt4.inference.geometry import geometry_from_volume
from minigpt4.inference.pipeline import SliceResult
from minigpt4.scan_outputs.detection_map import volume_detection_map, write_detection_map
from preprocessing.pipeline import read_pair, target_masks
from preprocessing.slices import DATASET_TARGETS

with contextlib.redirect_stdout(io.StringIO()):  # picai_eval prints a banner on import
    from picai_eval import Metrics
    from picai_eval.eval import evaluate_case

MIN_OVERLAP = 0.10
"""PANORAMA's hit criterion: a candidate hits a reference lesion at IoU >= 0.10 (picai_eval's default)."""
OVERLAP = "IoU"
ANCHORS = (
    ("PANORAMA AI (Alves et al., Lancet Oncology 2025)", "AUROC 0.92 (95 % CI 0.90–0.93)", "1,130 patients of the hidden test set"),
    ("68 radiologists (same study)", "AUROC 0.88 (95 % CI 0.85–0.91)", "391-patient subset of the hidden test set"),
)
SHEET_TRUTH = "patient_label of the clinical sheet (PDAC | non-PDAC), not the label voxels"
VOXEL_TRUTH = "tumor voxels in the label (MSD / NIH have no patient sheet)"
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


def foreground_box(detection_map: np.ndarray, lesions: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every candidate and lesion voxel (one voxel when there is none).

    Matching inside it gives picai_eval's result on the whole volume exactly: connected components,
    overlaps and likelihoods only involve non-zero voxels; a CT-sized study with a few small
    candidates costs a fraction of the whole volume's time (``benchmarks/bench_panorama_eval.py``)."""
    mask = (np.asarray(detection_map) > 0) | lesions
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, 1))
    return tuple(box)


def score_cases(cases: Iterable[PanoramaCase], n_bootstrap: int = 1000, seed: int = 42,
                truth: str = SHEET_TRUTH) -> tuple[dict, Metrics]:
    """The ``panorama`` section of ``metrics.json`` and picai_eval's Metrics (for the figures).

    ``cases`` may be a generator: each study is matched (``picai_eval.eval.evaluate_case``, as
    ``picai_eval.evaluate`` does per case) as it comes, so only one study's volumes are held.
    Returns ``auroc`` / ``ap`` / ``score`` (None where undefined: AUROC needs both patient
    classes, AP a reference lesion), ``ci95``, counts, the lesion list's hits / false positives /
    missed lesions, the criterion, the studies whose sheet label and label voxels disagree, and
    the matching time per study.

    Raises:
        ValueError: no case, a name twice, a map and mask of different shapes, a negative or
            non-finite map value or likelihood (naming the study).
    """
    lesion_results: dict[str, list] = {}
    target: dict[str, int] = {}
    pred: dict[str, float] = {}
    without, with_voxels = [], []
    seconds = []
    for c in cases:
        if c.name in lesion_results:
            raise ValueError(f"PANORAMA scoring: study {c.name} given twice")
        if c.detection_map.shape != c.lesions.shape:
            raise ValueError(f"{c.name}: detection map {c.detection_map.shape} and reference {c.lesions.shape} differ in shape")
        if not np.all(np.isfinite(c.detection_map)) or c.detection_map.min(initial=0) < 0:
            raise ValueError(f"{c.name}: the detection map holds negative or non-finite values")
        if not np.isfinite(c.likelihood) or c.likelihood < 0:
            raise ValueError(f"{c.name}: patient likelihood {c.likelihood!r} is not a finite value >= 0")
        start = time.perf_counter()
        lesions = np.asarray(c.lesions) > 0
        box = foreground_box(c.detection_map, lesions)
        results, *_ = evaluate_case(np.asarray(c.detection_map[box], dtype=np.float32), lesions[box].astype(np.int32),
                                    min_overlap=MIN_OVERLAP, overlap_func=OVERLAP)
        seconds.append(time.perf_counter() - start)
        lesion_results[c.name] = results
        target[c.name], pred[c.name] = int(bool(c.pdac)), float(c.likelihood)
        if c.pdac and not lesions.any():
            without.append(c.name)
        if not c.pdac and lesions.any():
            with_voxels.append(c.name)
    if not lesion_results:
        raise ValueError("PANORAMA scoring: no study to score")
    metrics = Metrics(lesion_results=lesion_results, case_target=target, case_pred=pred)
    flat = metrics.lesion_results_flat
    n_lesions = sum(int(t) for t, *_ in flat)
    auroc = float(metrics.auroc) if _both_classes(list(target.values())) else None
    ap = float(metrics.AP) + 0.0 if n_lesions else None  # + 0.0: picai's -sum(...) gives -0.0 for no hit
    result = {
        "auroc": auroc, "ap": ap,
        "score": None if auroc is None or ap is None else (auroc + ap) / 2,
        "ci95": bootstrap_ci(metrics, n_bootstrap, seed),
        "n_studies": len(target), "n_pdac": sum(target.values()),
        "n_reference_lesions": n_lesions,
        "n_candidates": sum(1 for t, p, _ in flat if p > 0),
        "n_true_positive": sum(1 for t, p, _ in flat if t and p > 0),
        "n_false_positive": sum(1 for t, p, _ in flat if not t),
        "n_missed": sum(1 for t, p, _ in flat if t and p == 0),
        "criterion": {"overlap": OVERLAP, "min_overlap": MIN_OVERLAP, "scorer": "picai_eval", "version": _version()},
        "patient_truth": truth,
        "pdac_without_lesion_voxels": sorted(without),
        "non_pdac_with_lesion_voxels": sorted(with_voxels),
        "seconds_matching_per_study": round(float(np.mean(seconds)), 6),
    }
    return result, metrics


@functools.lru_cache(maxsize=None)
def _version() -> str:
    return version("picai_eval")


def panorama_figure(metrics: Metrics, path: Path) -> Path:
    """FROC (lesion sensitivity vs false positives per study), patient ROC and lesion PR in one PNG."""
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


# ----------------------------------------------------------------------------- eval_cascade.py
DETECTION_MAPS = "detection_maps"
"""``eval_cascade.py``'s folder of ``<volume>.nii.gz`` detection maps in the run folder."""


def check_sources(volumes: dict, jobs: dict) -> None:
    """Every test volume has its raw image and label (before the model is loaded).

    Args:
        volumes: ``{(dataset, volume): records}`` (:func:`minigpt4.evaluation.cascade.load_volumes`).
        jobs: ``{dataset: {volume: Job}}`` (:func:`preprocessing.sources.prepared_jobs` per folder).
    Raises:
        FileNotFoundError: naming the volumes whose files are gone.
    """
    missing = [f"{d}/{v}" for d, v in volumes if v not in jobs.get(d, {})]
    if missing:
        raise FileNotFoundError(f"the CT/label files of {len(missing)} test volume(s) were not found where their folder "
                                f"was prepared from ({', '.join(missing[:5])}): the detection maps are written in each "
                                "CT's geometry and scored against its label file")


def cascade_cases(volumes: dict, rows: Sequence[dict], likelihoods: dict, jobs: dict,
                  out: Path) -> Iterator[PanoramaCase]:
    """One :class:`PanoramaCase` per test volume, writing ``out/detection_maps/<volume>.nii.gz``.

    Args:
        volumes: ``{(dataset, volume): records}``; rows: ``predictions.jsonl`` rows (stage-3 boxes).
        likelihoods: ``{(dataset, volume): patient likelihood}`` (the selected aggregation's score).
        jobs: ``{dataset: {volume: Job}}``.
    Raises:
        ValueError: a CT whose slices are not those of the prepared folder (re-prepared since?).
    """
    keys = [f.name for f in fields(SliceResult)]
    by_volume: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_volume.setdefault((row["dataset"], row["volume_name"]), []).append(row)
    for (dataset, name), records in volumes.items():
        job = jobs[dataset][name]
        image, label, _ = read_pair(job)
        geometry = geometry_from_volume(image)
        expected = (records[0]["height"], records[0]["width"], len(records))
        if tuple(geometry.display_shape) != expected:
            raise ValueError(f"{job.image}: {geometry.display_shape} display voxels, but the prepared folder has "
                             f"{len(records)} slices of {records[0]['width']}x{records[0]['height']}: prepare it again")
        results = [SliceResult(**{k: row[k] for k in keys if k in row}) for row in by_volume.get((dataset, name), [])]
        dmap, _ = volume_detection_map(geometry, results)
        write_detection_map(out / DETECTION_MAPS / f"{name}.nii.gz", dmap, geometry.affine)
        if "tumor" in DATASET_TARGETS[dataset]:
            lesions = target_masks(dataset, label, job.label_map)["tumor"]
        else:
            lesions = np.zeros(label.shape, dtype=bool)
        pdac = records[0]["patient_label"] == "PDAC" if dataset == "PANORAMA" else bool(lesions.any())
        yield PanoramaCase(name, dmap, lesions, float(likelihoods[(dataset, name)]), pdac)
