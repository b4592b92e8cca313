"""Scoring the clinical cascade end to end, as a user meets it (``eval_cascade.py``, issue 13).

The paper scores each stage on ground-truth inputs (crops cut with the ground-truth pancreas box,
slices known to hold a tumor). Here every slice of every volume goes through the three stages of
the inference pipeline (:func:`minigpt4.inference.pipeline.run_stages`: stage 1 pancreas box →
crop from the predicted box → stage 2 P(tumor) → stage 3 tumor box where the slice's P(tumor) >= the
slice threshold), and this module scores what it returns.

Per volume, the slices' P(tumor) are aggregated (``max`` and mean of the ``top_k`` largest) into
a patient score; a volume where fewer than ``cascade.min_boxed_slices`` slices got a pancreas box
is **inconclusive** (never scored as negative: patient metrics are given with inconclusive volumes
counted as positive-for-follow-up and with them excluded). Chosen on the ``val`` volumes (stages
1–2 only), never on ``test``: the aggregation, the patient threshold (Youden's J), the screening
thresholds (specificity >= 95 % / 99 %, only where val has enough negatives: :func:`minigpt4.evaluation.operating_points.negatives_needed`)
and, separately, stage 3's slice gate (Youden's J of slice P(tumor)). Outputs in
``run.output_dir`` (:class:`minigpt4.outputs.OutputFolder`): ``predictions.jsonl`` (one row per
test slice), ``metrics.json`` (``slice``, ``patient``, ``selection``, ``inconclusive``,
``volumes``, ``run``), ``tables.md``, ``p_tumor_along_z.png``, ``config.yaml``, ``manifest.json``.
Before the model is loaded: each stage's recorded task, the data, a non-empty test split and
the leakage guard for every stage and its recorded ancestors (:func:`minigpt4.provenance.check_cascade_leakage`).
3-D boxes: x, y continuous as in 2-D scoring (no +1), z covers whole slices (slice k spans [k, k + 1)).

Limits: volumes come from prepared folders written with ``--all-slices`` (the default
preprocessing writes PNGs of target slices only); the patient-level labels of the paper's data
are confounded with the source dataset (MSD volumes nearly all hold a tumor, NIH volumes none).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from minigpt4.boxes import box_iou
from minigpt4.distributed import all_gather_objects, rank_and_world_size, shard
from minigpt4.evaluation.calibration import calibration_lines, cascade_calibration, reliability_figure
from minigpt4.evaluation.panorama import (
    DETECTION_MAPS,
    SHEET_TRUTH,
    VOXEL_TRUTH,
    cascade_cases,
    check_sources,
    panorama_figure,
    panorama_table,
    score_cases,
)
from minigpt4.evaluation.stats import auc_score, safe_ratio
from minigpt4.evaluation.operating_points import (
    box_counts,
    choose_slice_threshold,
    choose_z_rule,
    operating_points,
    patient_metrics,
    patient_scores,
    rules_considered,
    select_operating_point,
)
from minigpt4.inference.operating_point import FILENAME as OPERATING_POINT
from minigpt4.inference.operating_point import operating_point_record
from minigpt4.inference.patient import AGGREGATIONS, Z_RULES, min_assessed_rule
from minigpt4.inference.pipeline import CascadeSettings, scan_slices
from minigpt4.config import ConfigError
from minigpt4.evaluation.common import subsample
from preprocessing.layout import dataset_name, read_normalization, read_volumes
from preprocessing.raw_files import prepared_jobs
from minigpt4.evaluation.tables import fmt
from minigpt4.evaluation.figures import _save
from minigpt4.progress import progress_callback
from minigpt4.provenance import provenance_table_lines
from minigpt4.config import save_config
from minigpt4.identity import checkpoint_identity, environment_identity
from minigpt4.io import write_json_atomic, write_jsonl_atomic, write_text_atomic

# ----------------------------------------------------------------------------- 3-D boxes
def box_3d(slice_boxes: Sequence[tuple[int, Sequence[float]]]) -> Optional[tuple[float, ...]]:
    """Union of ``(slice_index, (x1, y1, x2, y2))`` → ``(x1, y1, z1, x2, y2, z2)``, slice k = [k, k+1)."""
    if not slice_boxes:
        return None
    boxes = np.asarray([b for _, b in slice_boxes], dtype=float)
    zs = [k for k, _ in slice_boxes]
    return (boxes[:, 0].min(), boxes[:, 1].min(), float(min(zs)), boxes[:, 2].max(), boxes[:, 3].max(), float(max(zs) + 1))


def iou_3d(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """Continuous 3-D IoU of ``(x1, y1, z1, x2, y2, z2)`` boxes; 0 when either is missing."""
    if a is None or b is None:
        return 0.0

    def volume(box):
        return max(0.0, box[3] - box[0]) * max(0.0, box[4] - box[1]) * max(0.0, box[5] - box[2])

    inter = [max(a[i], b[i]) for i in range(3)] + [min(a[i + 3], b[i + 3]) for i in range(3)]
    common = volume(inter)
    union = volume(a) + volume(b) - common
    return float(common / union) if union > 0 else 0.0


def volume_truth(records: Sequence[dict]) -> dict:
    """Ground truth of one volume from its slice records: tumor yes/no and 3-D boxes."""
    pancreas = [(r["slice_index"], r["bbox_pancreas"]) for r in records if r.get("pixels_pancreas", 0) > 0]
    tumor = [(r["slice_index"], r["bbox_tumor"]) for r in records if r.get("pixels_tumor", 0) > 0]
    return {"tumor": bool(tumor), "pancreas_3d": box_3d(pancreas), "tumor_3d": box_3d(tumor)}


# ----------------------------------------------------------------------------- metrics
def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def tc_label(record: dict) -> Optional[bool]:
    """The slice's answer in the paper's tumor-classification task, None where that task has no crop.

    As ``python -m preprocessing tc`` (``--variant paper``, threshold 0) selects: an MSD slice with
    tumor pixels and a pancreas box of positive area → yes; an NIH slice with such a box → no. MSD
    slices without tumor are not TC slices (the paper's negatives are all NIH). Unlike the TC folder,
    classes are not down-sampled to balance: every test slice of the task counts.
    """
    if record.get("pancreas_bbox_ratio", 0) <= 0:
        return None
    if record.get("dataset") == "MSD":
        return True if record.get("pixels_tumor", 0) > 0 else None
    return False if record.get("dataset") == "NIH" else None


def slice_metrics(rows: Sequence[dict], slice_threshold: Optional[float] = None) -> dict:
    """Slice-level numbers over the test slices, with their counts.

    ``pancreas_iou``, ``false_box_rate``; on the TC slices (:func:`tc_label`):
    ``tc_auc_predicted_crops`` (all TC slices, P = 0 where stage 1 gave no box: the cascade's
    answer), ``tc_auc_predicted_crops_boxed`` (only those with a box), ``tc_auc_gt_crops``, and the
    accuracies at ``slice_threshold`` (predicted crops, no box = "no"; ground-truth crops);
    ``tumor_iou`` (+ ``tumor_iou_stage3_alone``) on tumor slices.
    """
    pancreas = [r for r in rows if r["has_pancreas"]]
    empty = [r for r in rows if not r["has_pancreas"]]
    tumor = [r for r in rows if r["has_tumor"]]
    tc = [r for r in rows if r.get("tc_label") is not None]
    boxed = [r for r in tc if r["p_tumor"] is not None]
    gt = [r for r in tc if r["p_tumor_gt_crop"] is not None]

    def labels(subset):
        return np.asarray([r["tc_label"] for r in subset], dtype=bool)

    def auc(subset, key):
        return auc_score(labels(subset), [r[key] or 0.0 for r in subset]) if subset else None

    def accuracy(subset, key):
        if not subset or slice_threshold is None:
            return None
        called = np.asarray([(r[key] or 0.0) >= slice_threshold for r in subset])
        return float((called == labels(subset)).mean())

    return {
        "n_slices": len(rows),
        "pancreas_iou": _mean([r["pancreas_iou"] for r in pancreas]),
        "n_pancreas_slices": len(pancreas),
        "pancreas_box_rate": safe_ratio(sum(r["pancreas_box"] is not None for r in pancreas), len(pancreas)),
        "false_box_rate": safe_ratio(sum(r["pancreas_box"] is not None for r in empty), len(empty)),
        "n_slices_without_pancreas": len(empty),
        "p_no_box_auc": _no_box_auc(rows),
        "slice_threshold": slice_threshold,
        "tc_accuracy_predicted_crops": accuracy(tc, "p_tumor"),
        "tc_accuracy_gt_crops": accuracy(gt, "p_tumor_gt_crop"),
        "tc_auc_predicted_crops": auc(tc, "p_tumor"),
        "n_tc_slices": len(tc),
        "n_tc_tumor_slices": int(labels(tc).sum()),
        "tc_auc_predicted_crops_boxed": auc(boxed, "p_tumor"),
        "n_tc_slices_boxed": len(boxed),
        "n_tc_tumor_slices_boxed": int(labels(boxed).sum()),
        "tc_auc_gt_crops": auc(gt, "p_tumor_gt_crop"),
        "n_tc_slices_gt_crop": len(gt),
        "tumor_iou": _mean([r["tumor_iou"] for r in tumor]),
        "tumor_iou_stage3_alone": _mean([r["tumor_iou_alone"] for r in tumor]),
        "n_tumor_slices": len(tumor),
        "tumor_asked_rate": safe_ratio(sum(r["tumor_asked"] for r in rows), len(rows)),
    }


def folders_normalization(cfg: Any) -> Optional[dict]:
    """The slice normalisation every configured folder was prepared with (operating_point.json
    ``normalization``: scan.py and the demo prepare a volume the same way); None when a folder does
    not record it.

    Raises:
        ConfigError: the folders were prepared differently (the cascade would see two kinds of slices).
    """
    found = {name: read_normalization(ds.root) for name, ds in cfg.datasets.items()}
    if any(v is None for v in found.values()):
        return None
    # the window matters only to windowed slices
    if len({(v["method"], tuple(v["window"]) if v["method"] == "window" else None) for v in found.values()}) > 1:
        listed = ", ".join(f"datasets.{n}: {v['method']} {v['window']}" for n, v in found.items())
        raise ConfigError(f"the cascade's folders were prepared with different slice normalisations ({listed}); "
                          "prepare them alike")
    return next(iter(found.values()))


def _no_box_auc(rows: Sequence[dict]) -> Optional[float]:
    """AUC of stage 1's P(no box) for "this slice shows no pancreas" (its use as a confidence);
    None when it was not computed or one class is missing."""
    scored = [r for r in rows if r.get("p_no_box") is not None]
    labels = np.asarray([not r["has_pancreas"] for r in scored], dtype=bool)
    if not scored or labels.all() or not labels.any():
        return None
    return auc_score(labels, [r["p_no_box"] for r in scored])


def score_volume(records: Sequence[dict], results: Sequence[dict], split: str) -> list[dict]:
    """Prediction rows of one volume: identity, ground truth, the cascade's answers and IoUs."""
    rows = []
    for rec, res in zip(records, results):
        has_pancreas = rec.get("pixels_pancreas", 0) > 0
        has_tumor = rec.get("pixels_tumor", 0) > 0
        row = {"dataset": rec["dataset"], "volume_name": rec["volume_name"], "slice_index": rec["slice_index"],
               "split": split, "image": rec["image"], "width": rec["width"], "height": rec["height"],
               "has_pancreas": has_pancreas, "has_tumor": has_tumor, "tc_label": tc_label(rec),
               "gt_pancreas_box": list(rec["bbox_pancreas"]) if has_pancreas else None,
               "gt_tumor_box": list(rec["bbox_tumor"]) if has_tumor else None, **res}
        if rec.get("patient_label"):  # PANORAMA: the sheet's patient truth
            row["patient_label"] = rec["patient_label"]
        row["pancreas_iou"] = (box_iou(res["pancreas_box"], rec["bbox_pancreas"]) if res["pancreas_box"] else 0.0) \
            if has_pancreas else None
        row["tumor_iou"] = (box_iou(res["tumor_box"], rec["bbox_tumor"]) if res["tumor_box"] else 0.0) if has_tumor else None
        row["tumor_iou_alone"] = (box_iou(res["tumor_box_alone"], rec["bbox_tumor"]) if res["tumor_box_alone"] else 0.0) \
            if has_tumor else None
        rows.append(row)
    return rows


def volume_3d_metrics(volumes: dict[tuple[str, str], list[dict]], rows: Sequence[dict]) -> dict:
    """Mean 3-D IoU of the slice-box unions vs the ground-truth 3-D boxes (pancreas, tumor)."""
    by_volume: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_volume.setdefault((row["dataset"], row["volume_name"]), []).append(row)
    pancreas, tumor = [], []
    for key, records in volumes.items():
        truth = volume_truth(records)
        vrows = by_volume.get(key, [])
        if truth["pancreas_3d"] is not None:
            pred = box_3d([(r["slice_index"], r["pancreas_box"]) for r in vrows if r["pancreas_box"]])
            pancreas.append(iou_3d(pred, truth["pancreas_3d"]))
        if truth["tumor_3d"] is not None:
            pred = box_3d([(r["slice_index"], r["tumor_box"]) for r in vrows if r["tumor_box"]])
            tumor.append(iou_3d(pred, truth["tumor_3d"]))
    return {"pancreas_iou_3d": _mean(pancreas), "n_pancreas_volumes": len(pancreas),
            "tumor_iou_3d": _mean(tumor), "n_tumor_volumes": len(tumor)}


# ----------------------------------------------------------------------------- data
def load_volumes(cfg: Any, split: str) -> dict[tuple[str, str], list[dict]]:
    """Every slice of every ``split`` volume of the config's MSD/NIH folders, images checked
    (at most ``cascade.max_volumes`` volumes per folder, evenly spaced by name).

    Raises:
        ConfigError: no dataset configured.
        FileNotFoundError: a slice has no PNG (the folder was prepared without ``--all-slices``).
    """
    roots = list(dict.fromkeys(str(ds.root) for ds in cfg.datasets.values()))
    if not roots:
        raise ConfigError("eval_cascade needs datasets: the prepared MSD and NIH folders (task pancreas_detection)")
    volumes: dict[tuple[str, str], list[dict]] = {}
    for root in roots:
        found = read_volumes(root, split)
        for name in subsample(sorted(found), cfg.cascade.max_volumes):
            records = found[name]
            missing = [r["slice_index"] for r in records if r["image"] is None or not Path(r["image"]).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{root}: volume {name} has no PNG for slices {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                    "the cascade scans every slice: prepare the folder again with --all-slices")
            volumes[(records[0]["dataset"], name)] = records
    return volumes


def _read_slices(records: Sequence[dict]) -> list[np.ndarray]:
    out = []
    for r in records:
        with Image.open(r["image"]) as im:
            out.append(np.asarray(im.convert("L")))
    return out


def predict_split(stages: Any, volumes: dict, split: str, threshold: Optional[float], margin: int, batch_size: int,
                  with_truth_runs: bool, progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Scored prediction rows of every slice of ``volumes``; ``threshold`` gates stage 3 per slice.
    Under torchrun each rank scans its share of the volumes (:func:`minigpt4.distributed.shard` by
    ``dataset/volume``) and every rank gets all rows, in the order of one process.

    Raises:
        FloatingPointError: stage 2 gave a non-finite P(yes), naming the volume and its first such slice.
    """

    settings = CascadeSettings(threshold=threshold, crop_margin=margin, batch_size=batch_size)
    rank, world = rank_and_world_size()
    mine = set(shard([f"{d}/{v}" for d, v in volumes], rank, world))
    rows: list[dict] = []
    done = 0
    for (dataset, name), records in volumes.items():
        if f"{dataset}/{name}" not in mine:
            continue
        done += 1
        gt_boxes = [r["bbox_pancreas"] if with_truth_runs and r.get("pixels_pancreas", 0) > 0 else None for r in records]
        gt_tumor = [with_truth_runs and r.get("pixels_tumor", 0) > 0 for r in records]
        results = scan_slices(stages, _read_slices(records), settings, gt_pancreas_boxes=gt_boxes, gt_tumor_slices=gt_tumor)
        check_finite(results.slices, records, f"{split} volume {dataset}/{name}",
                     getattr(stages, "sources", {}).get("tumor_classification"))
        rows += score_volume(records, [r.record() for r in results.slices], split)
        if progress is not None:
            progress(done, len(mine))
    if world > 1:
        order = {key: number for number, key in enumerate(volumes)}
        rows = sorted((row for part in all_gather_objects(rows) for row in part),
                      key=lambda row: order[(row["dataset"], row["volume_name"])])  # stable: slices keep their order
    return rows


def check_finite(results: Sequence[Any], records: Sequence[dict], where: str, checkpoint: Optional[str] = None) -> None:
    """Stop at the first slice whose stage-2 P(yes) is not a finite number (NaN/inf would become a
    threshold of NaN, an AUC of nan and invalid JSON further on).

    Raises:
        FloatingPointError: naming ``where``, the slice index and the crop.
    """
    for result, record in zip(results, records):
        for key, crop in (("p_tumor", "the predicted crop"), ("p_tumor_gt_crop", "the ground-truth crop")):
            value = getattr(result, key)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(
                    f"{where}, slice {record['slice_index']}: stage 2 (tumor_classification"
                    f"{', ' + str(checkpoint) if checkpoint else ''}) gave P(yes) = {value} on {crop}, the first "
                    "non-finite answer of this volume; nothing was written. Check the stage-2 checkpoint (a diverged "
                    "run?) and model.dtype")


# ----------------------------------------------------------------------------- outputs
PAPER_TC_ACCURACY = 0.876
TC_GT_CROP_DIFFERENCES = ("Table 2; not the same measure: the paper balanced the classes by down-sampling and "
                          "scored the model's own yes/no, here every TC slice counts, unbalanced, and yes = P(yes) >= "
                          "a slice threshold chosen on val slices")
"""What differs between the ground-truth-crop accuracy row and the paper's Table 2 accuracy."""
"""Table 2 of the paper: tumor classification accuracy on ground-truth crops (MSD tumor vs NIH)."""
PANDA_NOTE = ("For context only (other data, other model): PANDA (Cao et al., Nature Medicine 2023) reported "
              "sensitivity 92.9 % at specificity 99.9 % on 20,530 consecutive patients.")


def _cell(m: dict, name: str) -> str:
    ci = (m.get("ci95") or {}).get(name)
    return fmt(m[name]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _too_few(min_boxed_slices: int) -> str:
    if min_boxed_slices <= 1:
        return "no slice with a kept pancreas box"
    return f"a kept pancreas box on fewer than {min_boxed_slices} slices"


def rules_table(metrics: dict) -> list[str]:
    """Every patient rule considered (3-D rule × aggregation): val AUC, which chose, and test AUC."""
    from minigpt4.evaluation.tables import fmt

    rules, z = metrics.get("rules"), metrics.get("z_rule")
    if not rules:
        return []

    def auc(row: dict, mode: str) -> str:
        ci = row.get(f"test_auc_{mode}_ci95")
        return fmt(row[f"test_auc_{mode}"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")

    lines = ["", "## Patient rules considered (chosen on val by patient AUC; test AUC shown, never used to choose)", "",
             "| 3-D rule | aggregation | val AUC (conclusive val volumes) | test AUC, inconclusive excluded [95% CI] "
             "| test AUC, inconclusive as positive [95% CI] |", "|---|---|---|---|---|"]
    for row in rules:
        mark = " **(selected)**" if row["selected"] else ""
        lines.append(f"| {row['z_rule']} | {row['aggregation']}{mark} | {fmt(row['val_auc'])} "
                     f"({row['n_val_volumes'] - row['n_val_inconclusive']}) | {auc(row, 'inconclusive_excluded')} "
                     f"| {auc(row, 'inconclusive_as_positive')} |")
    if z:
        counts = "; ".join(f"`{name}`: val {c['val']['kept']} kept / {c['val']['dropped']} dropped, test "
                           f"{c['test']['kept']} kept / {c['test']['dropped']} dropped" for name, c in z["boxes"].items())
        lines += ["", f"3-D consistency rule selected: `{z['selected']}` (`largest_run`: only the largest run of >= 2 "
                  f"adjacent slices whose pancreas boxes overlap is kept). Pancreas boxes {counts}."]
    m = metrics.get("min_assessed") or {}
    if m:
        lines += ["", f"Minimum assessed: a conclusive answer needs >= {m['min_slices']} kept pancreas slices ({m['rule']}"
                  + (f"; median extent {fmt(m.get('median_extent_slices'))} slices over {m.get('n_volumes')} val volumes"
                     if m.get("median_extent_slices") is not None else "") + ")."]
    return lines


def _stage1_summary(metrics: dict) -> dict:
    s, sel = metrics["slice"], metrics["selection"]
    patient = metrics["patient"]
    chosen = {mode: patient[mode][sel["aggregation"]] for mode in ("inconclusive_as_positive", "inconclusive_excluded")}
    return {"checkpoint": metrics["run"]["stages"]["pancreas_detection"],
            "false_box_rate": s["false_box_rate"], "n_slices_without_pancreas": s["n_slices_without_pancreas"],
            "pancreas_box_rate": s["pancreas_box_rate"], "pancreas_iou": s["pancreas_iou"],
            "n_pancreas_slices": s["n_pancreas_slices"], "p_no_box_auc": s.get("p_no_box_auc"),
            "tc_auc_predicted_crops": s["tc_auc_predicted_crops"], "n_tc_slices": s["n_tc_slices"],
            "z_rule": sel["z_rule"], "aggregation": sel["aggregation"],
            "n_inconclusive": patient["n_inconclusive"], "n_volumes": patient["n_volumes"],
            "patient": {mode: {"n_volumes": patient[mode]["n_volumes"], "auc": m.get("auc"),
                               "ci95": {"auc": (m.get("ci95") or {}).get("auc")}}
                        for mode, m in chosen.items()}}


def stage1_comparison(baseline: dict, this: dict) -> dict:
    """Two evaluations that differ only in stage 1 (same stages 2-3, same volumes, rules chosen on
    val for each alike), side by side: ``{"baseline": summary, "this": summary}``."""
    return {"baseline": _stage1_summary(baseline), "this": _stage1_summary(this),
            "note": "the same stages 2-3, val and test volumes; each cascade's 3-D rule, aggregation and thresholds "
                    "chosen on val alike"}


def stage1_comparison_lines(comparison: dict) -> list[str]:
    """tables.md: the compared stage 1 (``cascade.compare_pancreas_detection``) beside this one."""
    base, this = comparison["baseline"], comparison["this"]

    def patient(summary: dict, mode: str) -> str:
        m = summary["patient"][mode]
        return _cell(m, "auc") + f" ({m['n_volumes']} volumes)"

    def name(summary: dict) -> str:
        source = summary["checkpoint"]
        return Path(str(source.get("path") if isinstance(source, dict) else source)).parent.name or "?"

    rows = [
        ("false box rate (slices without pancreas given a box)",
         lambda m: f"{fmt(m['false_box_rate'])} ({m['n_slices_without_pancreas']})"),
        ("pancreas box rate / IoU (slices with pancreas)",
         lambda m: f"{fmt(m['pancreas_box_rate'])} / {fmt(m['pancreas_iou'])} ({m['n_pancreas_slices']})"),
        ("AUC of P(no box) for \"no pancreas on this slice\"", lambda m: fmt(m["p_no_box_auc"])),
        ("tumor AUC on TC slices, crops from the predicted box", lambda m: f"{fmt(m['tc_auc_predicted_crops'])} ({m['n_tc_slices']})"),
        ("3-D rule + aggregation chosen on val", lambda m: f"{m['z_rule']} + {m['aggregation']}"),
        ("inconclusive test volumes", lambda m: f"{m['n_inconclusive']} of {m['n_volumes']}"),
        ("patient AUC [95% CI], inconclusive as positive", lambda m: patient(m, "inconclusive_as_positive")),
        ("patient AUC [95% CI], inconclusive excluded", lambda m: patient(m, "inconclusive_excluded")),
    ]
    lines = ["## Stage 1 compared (the same stages 2-3 and volumes)", "",
             f"| test volumes | compared: `{name(base)}` | this cascade: `{name(this)}` |", "|---|---|---|"]
    lines += [f"| {label} | {cell(base)} | {cell(this)} |" for label, cell in rows]
    note = comparison["note"]
    return lines + ["", f"{note[0].upper()}{note[1:]}.", ""]


def cascade_tables(metrics: dict) -> str:
    s, p, sel = metrics["slice"], metrics["patient"], metrics["selection"]
    t = fmt(s["slice_threshold"])
    lines = [
        "## Cascade on every slice of the test volumes (predicted inputs)", "",
        "| metric | value | n | the paper's per-stage number (ground-truth inputs) |", "|---|---|---|---|",
        f"| pancreas IoU (slices with pancreas) | {fmt(s['pancreas_iou'])} | {s['n_pancreas_slices']} | 0.574 (Table 1, slices with ratio > 0.6 only) |",
        f"| false box rate (slices without pancreas given a box) | {fmt(s['false_box_rate'])} | {s['n_slices_without_pancreas']} | not measured |",
        f"| tumor classification accuracy on TC slices at slice threshold {t}, crops from the predicted box (no box = no) "
        f"| {fmt(s['tc_accuracy_predicted_crops'])} | {s['n_tc_slices']} ({s['n_tc_tumor_slices']} tumor) | {PAPER_TC_ACCURACY} (Table 2, accuracy, GT crops, MSD tumor vs NIH) |",
        f"| tumor classification accuracy on TC slices at slice threshold {t}, crops from the ground-truth box "
        f"| {fmt(s['tc_accuracy_gt_crops'])} | {s['n_tc_slices_gt_crop']} | {PAPER_TC_ACCURACY} ({TC_GT_CROP_DIFFERENCES}) |",
        f"| tumor AUC on TC slices, crops from the predicted box (no box: P = 0) | {fmt(s['tc_auc_predicted_crops'])} | {s['n_tc_slices']} ({s['n_tc_tumor_slices']} tumor) | not reported |",
        f"| tumor AUC on TC slices with a predicted box | {fmt(s['tc_auc_predicted_crops_boxed'])} | {s['n_tc_slices_boxed']} ({s['n_tc_tumor_slices_boxed']} tumor) | not reported |",
        f"| tumor AUC on TC slices, crops from the ground-truth box | {fmt(s['tc_auc_gt_crops'])} | {s['n_tc_slices_gt_crop']} | not reported |",
        f"| tumor IoU through the cascade (slices with tumor) | {fmt(s['tumor_iou'])} | {s['n_tumor_slices']} | 0.168 (Table 3, tumor slices only) |",
        f"| tumor IoU, stage 3 alone on the same slices | {fmt(s['tumor_iou_stage3_alone'])} | {s['n_tumor_slices']} | |",
        "",
        f"TC slices: the test slices the paper's tumor-classification task crops (`preprocessing tc --variant paper`, "
        f"threshold 0): MSD slices with tumor (yes) and NIH slices (no), each with a pancreas box of positive area; not "
        f"down-sampled to balance. Stage 3 is asked where the slice P(tumor) >= {t} ({sel['slice_threshold_rule']}), "
        f"a slice-level threshold separate from the patient threshold.",
        "", "## Patient level (test volumes)", "",
        f"Threshold and aggregation chosen on {sel['n_val_volumes'] - sel['n_val_inconclusive']} conclusive val volumes "
        f"({sel['n_val_tumor']} with tumor; {sel['n_val_inconclusive']} inconclusive): "
        f"**{sel['aggregation']}** (top_k = {metrics['top_k']}), threshold {fmt(sel['threshold'])} ({sel['threshold_rule']}).", "",
        f"Inconclusive: {p['n_inconclusive']} of {p['n_volumes']} test volumes ({p['n_inconclusive_tumor']} with tumor) had "
        f"{_too_few(metrics['min_boxed_slices'])}: the model did not look at a pancreas. They are "
        "never scored as \"no tumor\": *as positive* counts them as positive-for-follow-up, *excluded* leaves them out.", "",
        "| aggregation | inconclusive volumes | volumes (tumor) | threshold | AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, label in (("inconclusive_as_positive", "as positive"), ("inconclusive_excluded", "excluded")):
        for method in AGGREGATIONS:
            m = p[mode][method]
            mark = " (selected)" if method == sel["aggregation"] else ""
            lines.append(f"| {method}{mark} | {label} | {p[mode]['n_volumes']} ({p[mode]['n_tumor']}) | {fmt(m['threshold'])} "
                         f"| {_cell(m, 'auc')} | {_cell(m, 'sensitivity')} | {_cell(m, 'specificity')} |")
    lines += rules_table(metrics)
    ops = p["operating_points"]
    lines += ["", f"{p['n_volumes']} test volumes, {p['n_tumor']} with tumor. "
              f"3-D IoU of the slice-box unions: pancreas {fmt(p['pancreas_iou_3d'])} ({p['n_pancreas_volumes']} volumes), "
              f"tumor {fmt(p['tumor_iou_3d'])} ({p['n_tumor_volumes']} volumes).", "",
              f"## Screening operating points (patient level, {ops['aggregation']}, chosen on {ops['n_val_negative']} "
              "negative conclusive val volumes)", "",
              "| operating point | val threshold (val sensitivity, specificity) | inconclusive volumes | test sensitivity [95% CI] "
              "| test specificity [95% CI] |", "|---|---|---|---|---|"]
    for name, point in ops.items():
        if not isinstance(point, dict):
            continue
        title = f"specificity >= {point['target_specificity']:.0%}" if point["target_specificity"] is not None else \
            "Youden's J" if point["rule"] == "Youden's J on val" else f"patient threshold, {point['rule']}"
        if point["threshold"] is None:
            lines.append(f"| {title} | not chosen: {point['reason']} | — | — | — |")
            continue
        chosen = f"{fmt(point['threshold'])} ({fmt(point['val_sensitivity'])}, {fmt(point['val_specificity'])})"
        for mode, label in (("inconclusive_as_positive", "as positive"), ("inconclusive_excluded", "excluded")):
            m = point["test"][mode]
            lines.append(f"| {title} | {chosen} | {label} | {_cell(m, 'sensitivity')} | {_cell(m, 'specificity')} |")
    lines += ["", f"Specificity targets need enough negative val volumes to be verified: one false positive must be "
              f"allowed (>= 20 negatives for 95 %, >= 100 for 99 %); otherwise no threshold is given. {PANDA_NOTE}", ""]
    for note in sel["notes"]:
        lines.append(f"Note: {note}.")
    if "calibration" in metrics:
        lines += [""] + calibration_lines(metrics["calibration"])
    if "stage1_compared" in metrics:
        lines += [""] + stage1_comparison_lines(metrics["stage1_compared"])
    provenance = provenance_table_lines((metrics.get("run") or {}).get("provenance") or {})
    return "\n".join((provenance + [""] if provenance else []) + lines) + "\n"


def p_tumor_figure(rows: Sequence[dict], threshold: float, path: Path, columns: int = 4) -> Path:
    """P(tumor) along z per test volume: GT tumor slices shaded red, pancreas slices marked below."""
    from matplotlib.figure import Figure


    by_volume: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_volume.setdefault((row["dataset"], row["volume_name"]), []).append(row)
    n = max(1, len(by_volume))
    cols = min(columns, n)
    lines = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 2.2 * lines))
    for i, ((dataset, name), vrows) in enumerate(by_volume.items()):
        ax = fig.add_subplot(lines, cols, i + 1)
        z = [r["slice_index"] for r in vrows]
        for r in vrows:
            if r["has_tumor"]:
                ax.axvspan(r["slice_index"] - 0.5, r["slice_index"] + 0.5, color="red", alpha=0.2, lw=0)
        pz = [(r["slice_index"], r["p_tumor"]) for r in vrows if r["p_tumor"] is not None]
        if pz:
            ax.plot([a for a, _ in pz], [b for _, b in pz], ".-", color="black", lw=1, ms=3)
        ax.plot([r["slice_index"] for r in vrows if r["has_pancreas"]], [-0.05] * sum(r["has_pancreas"] for r in vrows),
                "|", color="tab:blue", ms=6)
        ax.axhline(threshold, color="tab:orange", lw=0.8, ls="--")
        ax.set_ylim(-0.1, 1.05)
        ax.set_xlim(min(z) - 0.5, max(z) + 0.5)
        ax.set_title(f"{dataset} {name}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("P(tumor) along z (red: GT tumor slices, blue ticks: GT pancreas slices, dashed: threshold)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _progress(label: str):
    return progress_callback(label, unit="volume")


def source_jobs(cfg: Any) -> dict:
    """``{dataset: {volume: Job}}``: the raw CT and label files of the configured folders."""
    return {dataset_name(root): prepared_jobs(root) for root in dict.fromkeys(str(ds.root) for ds in cfg.datasets.values())}


def panorama_section(cfg: Any, volumes: dict, rows: Sequence[dict], patients: dict, aggregation: str, out: Path,
                     make_figures: bool = True) -> dict:
    """Detection maps of the test volumes (``detection_maps/<volume>.nii.gz``) scored the PANORAMA
    way (:mod:`minigpt4.evaluation.panorama`): the ``panorama`` section of ``metrics.json``.
    The patient likelihood is the selected aggregation's score (0 where no slice was classified:
    an inconclusive volume has no better number, and PANORAMA scores every study)."""
    jobs = source_jobs(cfg)
    check_sources(volumes, jobs)
    likelihoods = {key: patients[key]["scores"][aggregation] for key in volumes}
    sheet = all(records[0].get("patient_label") for records in volumes.values())
    section, scored = score_cases(cascade_cases(volumes, rows, likelihoods, jobs, out), cfg.cascade.bootstrap,
                                  cfg.run.seed, SHEET_TRUTH if sheet else VOXEL_TRUTH)
    written = {f"{name}.nii.gz" for _, name in volumes}
    for stale in (out / DETECTION_MAPS).glob("*.nii.gz"):  # an earlier run's volumes (the folder is ours)
        if stale.name not in written:
            stale.unlink()
    if make_figures:
        panorama_figure(scored, out / "panorama_curves.png")
    section.update({"likelihood": f"patient score: {aggregation} of slice P(tumor)",
                    "n_inconclusive": sum(patients[key]["inconclusive"] for key in volumes),
                    "detection_maps": DETECTION_MAPS})
    return section


def evaluate(cfg: Any, stages: Any, make_figures: bool = True, source: Optional[dict] = None,
             volumes: Optional[tuple[dict, dict]] = None, compared: Optional[dict] = None, write: bool = True) -> dict:
    """Choose the operating points on ``val``, run the cascade on ``test``, write every output.

    Args:
        volumes: ``(val, test)`` from :func:`load_volumes` when already read.
        compared: the metrics of the same evaluation with another stage 1
            (``cascade.compare_pancreas_detection``, ``write=False``): shown beside this one
            (:func:`stage1_comparison`, metrics.json ``stage1_compared``, tables.md).
        write: False: return the metrics and write nothing.
    """
    casc = cfg.cascade
    val_volumes, test_volumes = volumes or (load_volumes(cfg, "val"), load_volumes(cfg, "test"))
    if not test_volumes:
        raise ValueError("no test volume in the configured folders")
    batch = cfg.run.eval_batch_size
    start = time.perf_counter()
    val_rows = predict_split(stages, val_volumes, "val", None, casc.crop_margin, batch, False, _progress("val (stages 1-2)"))
    # how much pancreas a conclusive answer needs: configured, else from the val volumes' ground truth
    extents = [sum(r.get("pixels_pancreas", 0) > 0 for r in recs) for recs in val_volumes.values()]
    min_assessed = min_assessed_rule(extents, n_volumes=len(val_volumes)) if casc.min_boxed_slices is None else \
        {"min_slices": int(casc.min_boxed_slices), "rule": "configured (cascade.min_boxed_slices)", "chosen_on": None}
    min_slices = min_assessed["min_slices"]
    # the 3-D rule and the aggregation, chosen together on val by patient AUC
    z_rules = Z_RULES if casc.z_rule == "auto" else (casc.z_rule,)
    val_by_z = {z: patient_scores(val_rows, casc.top_k, min_slices, z) for z in z_rules}
    selections = {z: select_operating_point(val_by_z[z], casc.aggregation, casc.threshold) for z in z_rules}
    z_rule = choose_z_rule(selections)
    val_patients, selection = val_by_z[z_rule], selections[z_rule]
    selection["z_rule"] = z_rule
    selection["z_rule_rule"] = "configured (cascade.z_rule)" if casc.z_rule != "auto" else \
        f"highest patient AUC on val of its selected aggregation (ties: the first of {', '.join(Z_RULES)})"
    selection.update(choose_slice_threshold(val_rows, casc.slice_threshold))
    rows = predict_split(stages, test_volumes, "test", selection["slice_threshold"], casc.crop_margin, batch, True,
                         _progress("test (stages 1-3)"))
    test_by_z = {z: patient_scores(rows, casc.top_k, min_slices, z) for z in z_rules}
    patients = test_by_z[z_rule]
    patient = patient_metrics(patients, selection["thresholds"], casc.bootstrap, cfg.run.seed)
    patient["operating_points"] = operating_points(val_patients, patients, selection, casc.bootstrap, cfg.run.seed)
    rules = rules_considered(val_by_z, test_by_z, selections, z_rule, casc.bootstrap, cfg.run.seed)
    datasets = sorted({str(ds_name) for (ds_name, _) in {**val_patients, **patients}})
    calibration_map, calibration = cascade_calibration(val_patients, val_rows, patients, rows,
                                                       selection["aggregation"], datasets, cfg.run.seed)
    metrics = {
        "slice": slice_metrics(rows, selection["slice_threshold"]),
        "patient": {**patient, **volume_3d_metrics(test_volumes, rows)},
        "selection": selection,
        "rules": rules,
        "z_rule": {"selected": z_rule, "boxes": {z: {"val": box_counts(val_by_z[z]), "test": box_counts(test_by_z[z])}
                                                 for z in z_rules}},
        "calibration": calibration,
        "top_k": casc.top_k,
        "min_boxed_slices": min_slices,
        "min_assessed": min_assessed,
        "inconclusive": {"val": selection["n_val_inconclusive"], "test": patient["n_inconclusive"],
                         "rule": _too_few(min_slices)},
        "volumes": {f"{d}/{v}": {"tumor": p["label"], "n_slices_boxed": p["n_boxed"], "n_boxes_dropped": p["n_dropped"],
                                 "inconclusive": p["inconclusive"], **{m: round(s, 6) for m, s in p["scores"].items()}}
                    for (d, v), p in patients.items()},
        "run": {"stages": {s: checkpoint_identity(p) for s, p in stages.sources.items()},
                "datasets": sorted({str(ds.root) for ds in cfg.datasets.values()}),
                "crop_margin": casc.crop_margin, "batch_size": batch, "seconds": round(time.perf_counter() - start, 3),
                "decoding": "greedy, 1 beam, left padding", "environment": environment_identity(), **(source or {})},
    }
    point = operating_point_record(selection, casc.top_k, min_assessed, z_rule, metrics["run"]["stages"],
                                   len(val_volumes), "+".join(datasets), folders_normalization(cfg))
    point["calibration"] = calibration_map  # the calibration work's map (issue 28.1), chosen on val too
    if compared is not None:
        metrics["stage1_compared"] = stage1_comparison(compared, metrics)

    if write and rank_and_world_size()[0] == 0:  # torchrun: rank 0 writes
        write_outputs(cfg, metrics, point, rows, (test_volumes, patients), make_figures)
    return metrics


def write_outputs(cfg: Any, metrics: dict, point: dict, rows: Sequence[dict], test: tuple[dict, dict],
                  make_figures: bool) -> None:
    """Write what :func:`evaluate` measured into ``run.output_dir`` (adds ``metrics["panorama"]``);
    ``test``: the test volumes and their patient scores."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    selection, calibration = metrics["selection"], metrics["calibration"]
    test_volumes, patients = test
    metrics["panorama"] = panorama_section(cfg, test_volumes, rows, patients, selection["aggregation"], out, make_figures)
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / OPERATING_POINT, point)
    write_text_atomic(out / "tables.md", cascade_tables(metrics) + "\n" + panorama_table(metrics["panorama"]))
    if make_figures:
        p_tumor_figure(rows, selection["slice_threshold"], out / "p_tumor_along_z.png")
        reliability_figure({"patient score": calibration["patient"], "slice P(tumor)": calibration["slice"]},
                           out / "reliability.png")
    save_config(cfg, out / "config.yaml")
