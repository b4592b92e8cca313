"""Scoring the clinical cascade end to end, as a user meets it (``eval_cascade.py``, issue 13).

The paper scores each stage on ground-truth inputs (crops cut with the ground-truth pancreas box,
slices known to hold a tumor). Here every slice of every volume goes through the three stages of
the inference pipeline (:func:`minigpt4.inference.pipeline.run_stages`: stage 1 pancreas box →
crop from the predicted box → stage 2 P(tumor) → stage 3 tumor box where P(tumor) >= threshold),
and this module scores what it returns.

Per volume, the slices' P(tumor) are aggregated (``max`` and mean of the ``top_k`` largest) into
a patient score (0 for a volume where no slice got a box). The threshold and the aggregation are
chosen on the ``val`` volumes (stages 1–2 only), never on ``test``. Outputs in
``run.output_dir``: ``predictions.jsonl`` (one row per test slice), ``metrics.json`` (``slice``,
``patient``, ``selection``, ``run``), ``tables.md``, ``p_tumor_along_z.png`` and ``config.yaml``.
3-D boxes: x, y continuous as in 2-D scoring (no +1), z covers whole slices (slice k spans [k, k + 1)).

Limits: volumes come from prepared folders written with ``--all-slices`` (the default
preprocessing writes PNGs of target slices only); the patient-level labels of the paper's data
are confounded with the source dataset (MSD volumes nearly all hold a tumor, NIH volumes none).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from minigpt4.boxes import box_iou
from minigpt4.evaluation.stats import auc_score, cluster_bootstrap, safe_ratio
from minigpt4.inference.pipeline import AGGREGATIONS, CascadeSettings, aggregate, scan_slices

FALLBACK_THRESHOLD = 0.5


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


# ----------------------------------------------------------------------------- patient level
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


def volume_truth(records: Sequence[dict]) -> dict:
    """Ground truth of one volume from its slice records: tumor yes/no and 3-D boxes."""
    pancreas = [(r["slice_index"], r["bbox_pancreas"]) for r in records if r.get("pixels_pancreas", 0) > 0]
    tumor = [(r["slice_index"], r["bbox_tumor"]) for r in records if r.get("pixels_tumor", 0) > 0]
    return {"tumor": bool(tumor), "pancreas_3d": box_3d(pancreas), "tumor_3d": box_3d(tumor)}


def patient_scores(rows: Sequence[dict], top_k: int) -> dict[tuple[str, str], dict]:
    """``{(dataset, volume): {label, scores: {aggregation: score}, dataset}}`` from slice rows."""
    by_volume: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_volume.setdefault((row["dataset"], row["volume_name"]), []).append(row)
    out = {}
    for key, vrows in by_volume.items():
        ps = [r["p_tumor"] for r in vrows]
        out[key] = {"dataset": key[0], "label": any(r["has_tumor"] for r in vrows),
                    "scores": {m: aggregate(ps, m, top_k) for m in AGGREGATIONS}}
    return out


def select_operating_point(val_patients: dict, aggregation: str, threshold: Optional[float]) -> dict:
    """Aggregation and threshold from the validation volumes.

    ``aggregation='auto'``: the one with the higher val AUC (``max`` on ties or when undefined).
    Per aggregation the threshold is ``threshold`` when given, else Youden's J on val (0.5 when
    val lacks a class, said in ``notes``).
    """
    labels = np.asarray([v["label"] for v in val_patients.values()], dtype=bool)
    selection: dict[str, Any] = {"n_val_volumes": int(labels.size), "n_val_tumor": int(labels.sum()),
                                 "val_auc": {}, "thresholds": {}, "notes": []}
    for method in AGGREGATIONS:
        scores = np.asarray([v["scores"][method] for v in val_patients.values()], dtype=float)
        selection["val_auc"][method] = auc_score(labels, scores) if labels.size else None
        if threshold is not None:
            selection["thresholds"][method] = float(threshold)
            continue
        chosen = choose_threshold(labels, scores) if labels.size else None
        if chosen is None:
            chosen = FALLBACK_THRESHOLD
            selection["notes"].append(f"{method}: val volumes hold one class only: threshold {FALLBACK_THRESHOLD}")
        selection["thresholds"][method] = chosen
    if aggregation == "auto":
        aucs = selection["val_auc"]
        top = aucs["top_k_mean"] if aucs["top_k_mean"] is not None else -1.0
        aggregation = "top_k_mean" if top > (aucs["max"] if aucs["max"] is not None else -1.0) else "max"
        selection["aggregation_rule"] = "higher patient AUC on val (max on ties)"
    else:
        selection["aggregation_rule"] = "configured"
    selection["aggregation"] = aggregation
    selection["threshold"] = selection["thresholds"][aggregation]
    selection["threshold_rule"] = "configured (cascade.threshold)" if threshold is not None else "Youden's J on val"
    return selection


def patient_metrics(patients: dict, thresholds: dict, n_boot: int, seed: int) -> dict:
    """Per aggregation: AUC, sensitivity, specificity at its threshold, with volume bootstrap CIs."""
    keys = list(patients)
    labels = np.asarray([patients[k]["label"] for k in keys], dtype=bool)
    strata = [patients[k]["dataset"] for k in keys]
    out: dict[str, Any] = {"n_volumes": len(keys), "n_tumor": int(labels.sum())}
    for method in AGGREGATIONS:
        scores = np.asarray([patients[k]["scores"][method] for k in keys], dtype=float)
        t = thresholds[method]

        def stat(idx: np.ndarray, scores=scores, t=t) -> dict:
            sens, spec = sensitivity_specificity(labels[idx], scores[idx], t)
            return {"auc": auc_score(labels[idx], scores[idx]), "sensitivity": sens, "specificity": spec}

        point = stat(np.arange(len(keys)))
        ci = cluster_bootstrap(keys, stat, n_boot=n_boot, seed=seed, strata=strata)
        out[method] = {"threshold": t, **point, "ci95": ci}
    return out


# ----------------------------------------------------------------------------- metrics
def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def slice_metrics(rows: Sequence[dict]) -> dict:
    """``pancreas_iou``, ``false_box_rate``, ``tc_auc_predicted_crops``, ``tc_auc_gt_crops``,
    ``tumor_iou`` (+ ``tumor_iou_stage3_alone``) over the test slices, with their counts."""
    pancreas = [r for r in rows if r["has_pancreas"]]
    empty = [r for r in rows if not r["has_pancreas"]]
    tumor = [r for r in rows if r["has_tumor"]]
    both = [r for r in pancreas if r["p_tumor"] is not None and r["p_tumor_gt_crop"] is not None]
    labels = np.asarray([r["has_tumor"] for r in both], dtype=bool)
    return {
        "n_slices": len(rows),
        "pancreas_iou": _mean([r["pancreas_iou"] for r in pancreas]),
        "n_pancreas_slices": len(pancreas),
        "pancreas_box_rate": safe_ratio(sum(r["pancreas_box"] is not None for r in pancreas), len(pancreas)),
        "false_box_rate": safe_ratio(sum(r["pancreas_box"] is not None for r in empty), len(empty)),
        "n_slices_without_pancreas": len(empty),
        "tc_auc_predicted_crops": auc_score(labels, [r["p_tumor"] for r in both]) if both else None,
        "tc_auc_gt_crops": auc_score(labels, [r["p_tumor_gt_crop"] for r in both]) if both else None,
        "n_tc_slices": len(both),
        "n_tc_tumor_slices": int(labels.sum()),
        "tumor_iou": _mean([r["tumor_iou"] for r in tumor]),
        "tumor_iou_stage3_alone": _mean([r["tumor_iou_alone"] for r in tumor]),
        "n_tumor_slices": len(tumor),
        "tumor_asked_rate": safe_ratio(sum(r["tumor_asked"] for r in rows), len(rows)),
    }


def score_volume(records: Sequence[dict], results: Sequence[dict], split: str) -> list[dict]:
    """Prediction rows of one volume: identity, ground truth, the cascade's answers and IoUs."""
    rows = []
    for rec, res in zip(records, results):
        has_pancreas = rec.get("pixels_pancreas", 0) > 0
        has_tumor = rec.get("pixels_tumor", 0) > 0
        row = {"dataset": rec["dataset"], "volume_name": rec["volume_name"], "slice_index": rec["slice_index"],
               "split": split, "image": rec["image"], "width": rec["width"], "height": rec["height"],
               "has_pancreas": has_pancreas, "has_tumor": has_tumor,
               "gt_pancreas_box": list(rec["bbox_pancreas"]) if has_pancreas else None,
               "gt_tumor_box": list(rec["bbox_tumor"]) if has_tumor else None, **res}
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
    from minigpt4.config import ConfigError
    from minigpt4.evaluation.common import subsample
    from preprocessing.layout import read_volumes

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
    """Scored prediction rows of every slice of ``volumes``. Under torchrun each rank scans its
    share of the volumes (:func:`minigpt4.scan_outputs.shard` by ``dataset/volume``) and every
    rank gets all rows, in the order of one process."""
    from minigpt4.scan_outputs import rank_and_world_size, shard
    from minigpt4.training.distributed import all_gather_objects

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
        rows += score_volume(records, [r.record() for r in results.slices], split)
        if progress is not None:
            progress(done, len(mine))
    if world > 1:
        order = {key: number for number, key in enumerate(volumes)}
        rows = sorted((row for part in all_gather_objects(rows) for row in part),
                      key=lambda row: order[(row["dataset"], row["volume_name"])])  # stable: slices keep their order
    return rows


# ----------------------------------------------------------------------------- outputs
def cascade_tables(metrics: dict) -> str:
    from minigpt4.evaluation.tables import fmt

    s, p, sel = metrics["slice"], metrics["patient"], metrics["selection"]
    lines = [
        "## Cascade on every slice of the test volumes (predicted inputs)", "",
        "| metric | value | n | the paper's per-stage number (ground-truth inputs) |", "|---|---|---|---|",
        f"| pancreas IoU (slices with pancreas) | {fmt(s['pancreas_iou'])} | {s['n_pancreas_slices']} | 0.574 (Table 1, slices with ratio > 0.6 only) |",
        f"| false box rate (slices without pancreas given a box) | {fmt(s['false_box_rate'])} | {s['n_slices_without_pancreas']} | not measured |",
        f"| tumor AUC, crops from the predicted box | {fmt(s['tc_auc_predicted_crops'])} | {s['n_tc_slices']} ({s['n_tc_tumor_slices']} tumor) | accuracy 0.876 (Table 2, GT crops, MSD vs NIH) |",
        f"| tumor AUC, crops from the ground-truth box | {fmt(s['tc_auc_gt_crops'])} | {s['n_tc_slices']} | same slices, same model |",
        f"| tumor IoU through the cascade (slices with tumor) | {fmt(s['tumor_iou'])} | {s['n_tumor_slices']} | 0.168 (Table 3, tumor slices only) |",
        f"| tumor IoU, stage 3 alone on the same slices | {fmt(s['tumor_iou_stage3_alone'])} | {s['n_tumor_slices']} | |",
        "", "## Patient level (test volumes)", "",
        f"Threshold and aggregation chosen on {sel['n_val_volumes']} val volumes ({sel['n_val_tumor']} with tumor): "
        f"**{sel['aggregation']}** (top_k = {metrics['top_k']}), threshold {fmt(sel['threshold'])} ({sel['threshold_rule']}).", "",
        "| aggregation | threshold | AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |", "|---|---|---|---|---|",
    ]
    for method in AGGREGATIONS:
        m = p[method]

        def cell(name, m=m):
            ci = m["ci95"].get(name)
            return fmt(m[name]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")

        mark = " (selected)" if method == sel["aggregation"] else ""
        lines.append(f"| {method}{mark} | {fmt(m['threshold'])} | {cell('auc')} | {cell('sensitivity')} | {cell('specificity')} |")
    lines += ["", f"{p['n_volumes']} test volumes, {p['n_tumor']} with tumor. "
              f"3-D IoU of the slice-box unions: pancreas {fmt(p['pancreas_iou_3d'])} ({p['n_pancreas_volumes']} volumes), "
              f"tumor {fmt(p['tumor_iou_3d'])} ({p['n_tumor_volumes']} volumes).", ""]
    for note in sel["notes"]:
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"


def p_tumor_figure(rows: Sequence[dict], threshold: float, path: Path, columns: int = 4) -> Path:
    """P(tumor) along z per test volume: GT tumor slices shaded red, pancreas slices marked below."""
    from matplotlib.figure import Figure

    from minigpt4.evaluation.figures import _save

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


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from minigpt4.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="eval_cascade.py", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--no-figures", action="store_true", help="skip the P(tumor) figure")
    return parser


def _progress(label: str):
    from minigpt4.progress import progress_callback

    return progress_callback(label, unit="volume")


def evaluate(cfg: Any, stages: Any, make_figures: bool = True, source: Optional[dict] = None) -> dict:
    """Choose the operating point on ``val``, run the cascade on ``test``, write every output."""
    from minigpt4.config import save_config
    from minigpt4.evaluation.common import checkpoint_identity, environment_identity
    from minigpt4.io import write_json_atomic, write_jsonl_atomic, write_text_atomic

    casc = cfg.cascade
    val_volumes = load_volumes(cfg, "val")  # both splits are checked before any model work
    test_volumes = load_volumes(cfg, "test")
    if not test_volumes:
        raise ValueError("no test volume in the configured folders")
    batch = cfg.run.eval_batch_size
    start = time.perf_counter()
    val_rows = predict_split(stages, val_volumes, "val", None, casc.crop_margin, batch, False, _progress("val (stages 1-2)"))
    selection = select_operating_point(patient_scores(val_rows, casc.top_k), casc.aggregation, casc.threshold)
    rows = predict_split(stages, test_volumes, "test", selection["threshold"], casc.crop_margin, batch, True,
                         _progress("test (stages 1-3)"))
    patients = patient_scores(rows, casc.top_k)
    metrics = {
        "slice": slice_metrics(rows),
        "patient": {**patient_metrics(patients, selection["thresholds"], casc.bootstrap, cfg.run.seed),
                    **volume_3d_metrics(test_volumes, rows)},
        "selection": selection,
        "top_k": casc.top_k,
        "volumes": {f"{d}/{v}": {"tumor": p["label"], **{m: round(s, 6) for m, s in p["scores"].items()}}
                    for (d, v), p in patients.items()},
        "run": {"stages": {s: checkpoint_identity(p) for s, p in stages.sources.items()},
                "datasets": sorted({str(ds.root) for ds in cfg.datasets.values()}),
                "crop_margin": casc.crop_margin, "batch_size": batch, "seconds": round(time.perf_counter() - start, 3),
                "decoding": "greedy, 1 beam, left padding", "environment": environment_identity(), **(source or {})},
    }
    from minigpt4.scan_outputs import rank_and_world_size

    if rank_and_world_size()[0] != 0:
        return metrics  # torchrun: rank 0 writes
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "tables.md", cascade_tables(metrics))
    if make_figures:
        p_tumor_figure(rows, selection["threshold"], out / "p_tumor_along_z.png")
    save_config(cfg, out / "config.yaml")
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``eval_cascade.py --cfg-path eval_configs/cascade.yaml``; returns the metrics written."""
    from minigpt4.config import ConfigError, load_config
    from minigpt4.models.stages import load_stages

    args = build_parser().parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    missing = [s for s in ("pancreas_detection", "tumor_classification", "tumor_detection")
               if getattr(cfg.cascade.stages, s) is None]
    if missing:
        raise ConfigError(f"{args.cfg_path}: cascade.stages.{missing[0]} is not set (all three stages are needed)")
    for stage, path in cfg.cascade.stages.configured().items():
        if not Path(path).exists():
            raise FileNotFoundError(f"cascade.stages.{stage}: checkpoint not found: {path}")
    load_volumes(cfg, "val"), load_volumes(cfg, "test")  # fail on data before loading the model
    from minigpt4.training.distributed import cleanup, init_distributed

    info = init_distributed(cfg.run.device)  # torchrun: the volumes are sharded across ranks
    try:
        stages = load_stages(cfg.model, cfg.cascade.stages.configured(), device=info.device)
        metrics = evaluate(cfg, stages, not args.no_figures, {"config": str(args.cfg_path), "options": list(args.options)})
    finally:
        cleanup()
    if info.is_main:
        print(cascade_tables(metrics), file=sys.stderr)
    return metrics
