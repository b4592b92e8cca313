"""What ``eval_detection.py`` and ``eval_classification.py`` do; the scripts only call :func:`main`.

Order of work, so that bad input fails in seconds rather than after loading 7 B parameters:
config → records of every configured dataset of the task(s) (``read_prepared``, every image
checked, ``--q-ids`` resolved) → weight files checked → model built → batched prediction →
``predictions.jsonl``, ``metrics.json``, ``tables.md``, figures and ``config.yaml`` in
``run.output_dir`` (one sub-folder per task when a config holds several detection tasks).

Modes: ``--predictions FILE`` re-scores a saved predictions file without a model;
``--checkpoints DIR`` (detection) evaluates every ``checkpoint_epoch_<N>`` of a training run on
``val`` and ``test`` and picks the best epoch on ``val`` (the paper's Table 1 by epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from minigpt4.config import DETECTION_TASKS, ORGANS, Config, ConfigError, DecodingConfig, add_config_arguments, load_config, save_config
from minigpt4.cli import add_provenance_argument
from minigpt4.data.datasets import load_split_records
from minigpt4.evaluation import figures, tables
from minigpt4.evaluation.classification import classification_metrics, predict_classification
from minigpt4.evaluation.classification import rescore_rows as rescore_classification
from minigpt4.evaluation.common import (
    check_records,
    select_ids,
    subsample,
)
from minigpt4.evaluation.detection import detection_metrics, predict_detection, primary_score, recorded_threshold
from minigpt4.evaluation.detection import threshold_unknown_reason
from minigpt4.evaluation.detection import rescore_rows as rescore_detection
from minigpt4.provenance import check_evaluation, provenance_status, provenance_table_lines
from minigpt4.identity import checkpoint_identity, environment_identity
from minigpt4.io import file_sha256, read_json, read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic
from minigpt4.prompts import prompt_wording
from minigpt4.outputs import OutputFolder
from minigpt4.evaluation.baselines import BASELINE_NAME, histogram_baseline_metrics
from minigpt4.evaluation.classification import summarize
from minigpt4.progress import progress_callback
from minigpt4.data.feature_cache import configured_feature_cache
from minigpt4.models.minigpt_v2 import build_model
from minigpt4.training.checks import check_weight_files
from minigpt4.models.checkpoints import load_weights

CLASSIFICATION = "tumor_classification"
_EPOCH_RE = re.compile(r"^checkpoint_epoch_(\d+)$")


def build_parser(kind: str) -> argparse.ArgumentParser:
    """Command line of ``eval_detection.py`` (kind ``detection``) or ``eval_classification.py``."""
    parser = argparse.ArgumentParser(
        prog=f"eval_{kind}.py",
        description=f"Evaluate {kind} on prepared data; results go to run.output_dir.",
    )
    add_config_arguments(parser)
    add_provenance_argument(parser)
    parser.add_argument("--split", choices=("train", "val", "test"), default=None, help="default: run.eval_split (test)")
    parser.add_argument("--predictions", metavar="FILE.jsonl", help="re-score this predictions file; no model is loaded")
    if kind == "detection":
        parser.add_argument("--task", choices=DETECTION_TASKS, help="only this task of the config (default: all detection tasks)")
        parser.add_argument("--checkpoints", metavar="DIR", help="evaluate every checkpoint_epoch_<N> of a training run on val and test")
    parser.add_argument("--q-ids", type=int, nargs="+", metavar="ID", help="evaluate only these q_ids")
    parser.add_argument("--max-samples", type=int, help="evenly spaced subset of this many records per task")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap replicates for the 95%% CIs (0: none)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty run.output_dir no evaluation wrote (its files are kept)")
    return parser


EVAL_OUTPUTS = re.compile(r"(predictions\.jsonl|metrics\.json|tables\.md|config\.yaml|manifest\.json|feature_cache|"
                          r"epoch_\d+|\w+_(detection|classification)|\w+\.png)")
"""Top-level names an evaluation writes in ``run.output_dir``."""


def _claim_output_dir(cfg: Config, kind: str, overwrite: bool):
    """``run.output_dir`` under :mod:`minigpt4.outputs`: new, empty or an evaluation's own
    (``manifest.json``), locked while this evaluation writes; a failure removes what it created."""
    return OutputFolder(Path(cfg.run.output_dir), f"eval_{kind}", option="run.output_dir",
                        owner=f"eval_{kind}.py", overwrite=overwrite)


# ----------------------------------------------------------------------------- records
def configured_tasks(cfg: Config, kind: str, only: Optional[str] = None) -> list[str]:
    """Tasks of the config's datasets this script evaluates, in config order."""
    wanted = DETECTION_TASKS if kind == "detection" else (CLASSIFICATION,)
    tasks = list(dict.fromkeys(ds.task for ds in cfg.datasets.values() if ds.task in wanted))
    if only is not None:
        tasks = [t for t in tasks if t == only]
    if not tasks:
        names = {n: d.task for n, d in cfg.datasets.items()}
        raise ConfigError(f"no dataset with a {only or kind} task in the config (datasets: {names or 'none'})")
    return tasks


def load_task_records(cfg: Config, task: str, split: str, q_ids: Optional[Sequence[int]] = None,
                      max_samples: Optional[int] = None) -> tuple[list[dict], dict]:
    """Checked records of every configured dataset of ``task`` for ``split``.

    Returns:
        ``(records, summary)`` with ``summary[name] = {root, task, threshold, n}``.
    """

    subset = dataclasses.replace(cfg, datasets={n: d for n, d in cfg.datasets.items() if d.task == task})
    records, summary = [], {}
    for name, _, _, recs in load_split_records(subset, split):
        ds = cfg.datasets[name]
        source = f"datasets.{name} ({ds.root}, {task}, split {split})"
        check_records(recs, task, source=source)
        threshold = effective_threshold(ds.root, ds.threshold)
        if task != CLASSIFICATION:  # every prediction row says how its slice was selected
            recs = [{**r, "selection_threshold": threshold} for r in recs]
        records.extend(recs)
        summary[name] = {"root": ds.root, "task": task, "threshold": threshold, "n": len(recs)}
    records = subsample(select_ids(records, q_ids, source=f"{task} {split} records"), max_samples)
    return records, summary


def effective_threshold(root: str, threshold: Optional[float]) -> Optional[float]:
    """The selection threshold of a dataset: the config's, else the one its folder was prepared
    with (``manifest.json``); None when neither is known (e.g. a TC folder)."""
    if threshold is not None:
        return float(threshold)
    try:
        value = read_json(Path(root) / "manifest.json").get("parameters", {}).get("threshold")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def common_threshold(datasets: dict) -> Optional[float]:
    """The threshold shared by every evaluated dataset, None when they differ or one is unknown."""
    values = {d.get("threshold") for d in datasets.values()}
    return values.pop() if len(values) == 1 else None


def checkpoint_label(cfg: Config) -> str:
    """A short name of the evaluated weights for the tables."""
    path = cfg.model.ckpt or cfg.model.init_from
    if path is None:
        return "this evaluation (random init)"
    p = Path(path)
    return f"this evaluation ({p.parent.name}/{p.name})" if p.parent.name else f"this evaluation ({p.name})"


def eval_prompts(cfg: Config) -> tuple[str, str]:
    """``(detection instruction template, yes/no question)`` evaluation asks: ``run.eval_instruction``
    else the configured wording's (``model.prompts.wording``: the paper's first instruction and
    question, or the release's for the zero-shot baseline)."""
    wording = prompt_wording(cfg.model.prompts.wording)
    return cfg.run.eval_instruction or wording.detection_template, wording.classification_question


def decoding_identity(generation: DecodingConfig) -> dict:
    """How answers were decoded: strategy, beams, length, and the sampling values when sampling."""
    identity = {"strategy": generation.strategy, "num_beams": generation.num_beams, "max_new_tokens": generation.max_new_tokens}
    if generation.do_sample:
        identity.update(temperature=generation.temperature, top_p=generation.top_p)
    if generation.repetition_penalty != 1.0:
        identity["repetition_penalty"] = generation.repetition_penalty
    return identity


def run_identity(cfg: Config, args: argparse.Namespace, model: Any, split: str, datasets: dict,
                 batch_size: int, seconds: float, n: int) -> dict:
    """Everything needed to know what was evaluated and how (goes into metrics.json ``run``)."""
    task_list = sorted({d["task"] for d in datasets.values()})
    return {
        "mode": "predict",
        "config": str(args.cfg_path),
        "options": list(args.options),
        "split": split,
        "datasets": datasets,
        "checkpoint": checkpoint_identity(cfg.model.ckpt),
        "init_from": checkpoint_identity(cfg.model.init_from),
        "model": {
            "llama": cfg.model.text.path,
            "eva": cfg.model.vision.weights,
            "dtype_config": cfg.model.dtype,
            "dtype": str(getattr(model, "dtype", None)),
            "device": str(getattr(model, "device", None)),
            "quantization": cfg.model.text.quantization,
            "lora_target_modules": list(cfg.model.lora.target_modules),
        },
        "decoding": {
            **decoding_identity(cfg.model.generation),
            "padding_side": "left",
            "instruction": eval_prompts(cfg)[1] if CLASSIFICATION in task_list else eval_prompts(cfg)[0],
            "prompt_wording": cfg.model.prompts.wording,
        },
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "samples_per_s": round(n / seconds, 3) if seconds > 0 else None,
        "environment": environment_identity(),
    }


def tc_variant(root: str, records: Sequence[dict]) -> Optional[str]:
    """``paper`` or ``msd-only`` for a TC folder: its manifest's ``variant`` (``tc``), else read off
    the records (``tc-import``): ``paper`` when no source holds both classes."""
    try:
        variant = read_json(Path(root) / "manifest.json").get("parameters", {}).get("variant")
    except (OSError, ValueError):
        variant = None
    if variant:
        return str(variant)
    classes = {}
    for r in records:
        classes.setdefault(r["dataset"], set()).add(r["answer"])
    if not classes:
        return None
    if all(len(c) == 1 for c in classes.values()):
        return "paper"
    return "msd-only" if set(classes) == {"MSD"} else None


def _in_folder(record: dict, root: str) -> bool:
    return Path(record["image"]).resolve().is_relative_to(Path(root).resolve())


def classification_context(cfg: Config, records: Sequence[dict], rows: Sequence[dict], seed: int) -> dict:
    """Table 2's context: the crop-size + histogram baseline fitted on the train split of the same
    folders and scored on ``records`` (``baseline``), each folder's variant (``tc_variant``), and,
    when the config holds several TC folders (e.g. the paper's set and the ``msd-only`` variant),
    the model's and the baseline's metrics per folder (``per_folder``)."""
    names = [n for n, d in cfg.datasets.items() if d.task == CLASSIFICATION]
    roots = {n: cfg.datasets[n].root for n in names}
    variants = {n: tc_variant(roots[n], [r for r in records if _in_folder(r, roots[n])]) for n in names}
    try:
        train, _ = load_task_records(cfg, CLASSIFICATION, "train")
    except (FileNotFoundError, ValueError) as err:
        skipped = {"name": BASELINE_NAME, "skipped": f"no usable train split ({err})"}
        return {"baseline": skipped, "tc_variant": variants}
    context: dict[str, Any] = {"baseline": histogram_baseline_metrics(train, records, n_boot=0, seed=seed),
                               "tc_variant": variants}
    if len(names) > 1:
        per_folder = {}
        for n in names:
            picked = [i for i, r in enumerate(records) if _in_folder(r, roots[n])]
            folder_train = [r for r in train if _in_folder(r, roots[n])]
            per_folder[n] = {"root": roots[n], "variant": variants[n], **summarize([rows[i] for i in picked]),
                             "baseline": histogram_baseline_metrics(folder_train, [records[i] for i in picked], seed=seed)}
        context["per_folder"] = per_folder
    return context


# ----------------------------------------------------------------------------- outputs
def write_detection_outputs(out: Path, rows: list[dict], metrics: dict, label: str, make_figures: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "tables.md", tables.detection_table(metrics, label))
    if make_figures and rows:
        figures.detection_examples(rows, out / "examples.png")
        figures.box_heatmaps(rows, out / "box_heatmaps.png", title=metrics.get("task") or "")
        figures.iou_histogram(rows, out / "iou_histogram.png")


def write_classification_outputs(out: Path, rows: list[dict], metrics: dict, label: str, make_figures: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "tables.md", tables.classification_table(metrics, label))
    if make_figures and rows:
        figures.roc_figure(rows, out / "roc_curve.png", metrics.get("auc"))
        figures.confusion_figure(metrics["confusion_matrix"], out / "confusion_matrix.png")


def _progress(task: str):
    return progress_callback(task, unit="sample")


def _feature_cache(cfg: Config, model: Any):
    """``run.cache_visual_features``: the cache of the loaded tower (no autocast, like evaluation), else None."""
    if not cfg.run.cache_visual_features:
        return None

    return configured_feature_cache(cfg, model, autocast_dtype=None)


def _build_model(cfg: Config):
    check_weight_files(cfg)
    return build_model(cfg.model, device=cfg.run.device)


# ----------------------------------------------------------------------------- re-scoring
def infer_detection_task(rows: Sequence[dict], cfg_tasks: Sequence[str]) -> str:
    """Task of a predictions file: from its targets, else the config's single detection task."""
    targets = {r.get("target") for r in rows}
    if None not in targets and targets:
        if {r.get("dataset") for r in rows} == {"ABD"} and targets <= set(ORGANS):
            return "organ_detection"  # an ABD file of pancreas rows only is still Table 4
        if targets == {"tumor"}:
            return "tumor_detection"
        if targets == {"pancreas"}:
            return "pancreas_detection"
        if targets <= set(ORGANS):
            return "organ_detection"
    if len(cfg_tasks) == 1:
        return cfg_tasks[0]
    raise ValueError(f"cannot tell the detection task of the predictions (targets {sorted(map(str, targets))}); pass --task")


def _rescore(args: argparse.Namespace, cfg: Config, kind: str) -> dict:
    path = Path(args.predictions)
    source = str(path)
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{source}: no predictions in the file")
    identity = {"mode": "rescore", "predictions": source, "sha256": file_sha256(path), "config": str(args.cfg_path)}
    out = Path(cfg.run.output_dir)
    if kind == "detection":
        rows = rescore_detection(rows, source=source)
        cfg_tasks = [d.task for d in cfg.datasets.values() if d.task in DETECTION_TASKS]
        task = args.task or infer_detection_task(rows, list(dict.fromkeys(cfg_tasks)))
        metrics = detection_metrics(rows, task, n_boot=args.bootstrap, seed=cfg.run.seed)
        # the file's own record, never the config's folders: those may have been re-prepared since
        metrics["threshold"] = recorded_threshold(rows)
        metrics["threshold_unknown"] = threshold_unknown_reason(rows)  # why it is None: not recorded, or mixed
        metrics["run"] = identity
        write_detection_outputs(out, rows, metrics, f"re-scored {path.name}", not args.no_figures)
    else:
        rows = rescore_classification(rows, source=source)
        metrics = classification_metrics(rows, n_boot=args.bootstrap, seed=cfg.run.seed)
        metrics["run"] = identity
        write_classification_outputs(out, rows, metrics, f"re-scored {path.name}", not args.no_figures)
    save_config(cfg, out / "config.yaml")
    return metrics


# ----------------------------------------------------------------------------- checkpoints
def epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``checkpoint_epoch_<N>`` folders of a training run, by N."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--checkpoints {folder}: folder not found")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _EPOCH_RE.match(p.name)))
    if not found:
        raise FileNotFoundError(f"--checkpoints {folder}: no checkpoint_epoch_<N> folders inside")
    return found


def _evaluate_checkpoints(args: argparse.Namespace, cfg: Config, task: str) -> dict:
    found = epoch_checkpoints(Path(args.checkpoints))
    missing = [str(p) for _, p in found if not (p / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"--checkpoints: no model.safetensors in {missing[:5]}")
    splits = {s: load_task_records(cfg, task, s, args.q_ids, args.max_samples) for s in ("val", "test")}
    # every epoch of the run (each records its provenance; reading it needs no tensors)
    check_evaluation(cfg, [n for n, d in cfg.datasets.items() if d.task == task], "test", [str(p) for _, p in found],
                     args.allow_unknown_provenance)
    # the model is built without model.ckpt: every epoch's weights are loaded over it in turn
    base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ckpt=None))
    model = _build_model(base)
    out = Path(cfg.run.output_dir)
    epochs, best, best_rows = [], None, None
    batch = cfg.run.eval_batch_size
    for epoch, folder in found:
        load_weights(model, folder)
        # named by this epoch's tower weights: shared by every epoch when the EVA is frozen
        feature_cache = _feature_cache(cfg, model)
        entry: dict[str, Any] = {"epoch": epoch, "checkpoint": checkpoint_identity(str(folder))}
        test_rows: list[dict] = []
        for split, (records, _) in splits.items():
            rows = predict_detection(model, records, task, batch, num_workers=cfg.run.num_workers,
                                     progress=_progress(f"epoch {epoch} {split}"), instruction=eval_prompts(cfg)[0],
                                     feature_cache=feature_cache)
            metrics = detection_metrics(rows, task, n_boot=0)
            write_jsonl_atomic(out / f"epoch_{epoch}" / split / "predictions.jsonl", rows)
            write_json_atomic(out / f"epoch_{epoch}" / split / "metrics.json", metrics)
            entry[split] = metrics
            if split == "test":
                test_rows = rows
        epochs.append(entry)
        if best is None or primary_score(entry["val"]) > primary_score(best["val"]):
            best, best_rows = entry, test_rows
    assert best is not None
    best_metrics = detection_metrics(best_rows, task, n_boot=args.bootstrap, seed=cfg.run.seed)
    best_metrics["threshold"] = common_threshold(splits["test"][1])
    # a subset is not the test set: its key and label say so
    subset = args.max_samples is not None or args.q_ids is not None
    test_key = "best_test_subset" if subset else "best_test"
    summary = {
        "task": task,
        "selection": "highest weighted mean IoU on the val split (earliest on ties)",
        "best_epoch": best["epoch"],
        "best_checkpoint": best["checkpoint"],
        test_key: best_metrics,
        "subset": {"max_samples": args.max_samples, "q_ids": args.q_ids} if subset else None,
        "epochs": [{"epoch": e["epoch"], "checkpoint": e["checkpoint"]["path"],
                    "val": {k: e["val"][k] for k in ("per_dataset", "weighted")},
                    "test": {k: e["test"][k] for k in ("per_dataset", "weighted")}} for e in epochs],
        "run": {"mode": "checkpoints", "checkpoints": str(args.checkpoints), "config": str(args.cfg_path),
                "datasets": {s: info for s, (_, info) in splits.items()}, "batch_size": batch,
                "max_new_tokens": cfg.model.generation.max_new_tokens, "decoding": {**decoding_identity(cfg.model.generation), "padding_side": "left"},
                "dtype": str(model.dtype), "environment": environment_identity()},
    }
    write_json_atomic(out / "metrics.json", summary)
    label = f"epoch {best['epoch']} (best on val)"
    if subset:
        label += f", subset of {len(best_rows)} test slices (--max-samples/--q-ids), not the test set"
    write_text_atomic(out / "tables.md", tables.epochs_table(epochs, best["epoch"], best_metrics["threshold"]) + "\n" + tables.detection_table(best_metrics, label))
    write_jsonl_atomic(out / "predictions.jsonl", best_rows)
    if not args.no_figures and best_rows:
        figures.detection_examples(best_rows, out / "examples.png")
        figures.box_heatmaps(best_rows, out / "box_heatmaps.png", title=task)
        figures.iou_histogram(best_rows, out / "iou_histogram.png")
    save_config(cfg, out / "config.yaml")
    return summary


# ----------------------------------------------------------------------------- main
def main(kind: str, argv: Optional[Sequence[str]] = None) -> dict:
    """Run one evaluation; returns the metrics written (per task when several)."""
    args = build_parser(kind).parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    with _claim_output_dir(cfg, kind, args.overwrite) as folder:
        folder.check_no_foreign([n for n in os.listdir(folder.path) if EVAL_OUTPUTS.fullmatch(n)])
        if not folder.manifest:
            folder.write_manifest({"written_by": f"eval_{kind}.py"})
        return _run(args, cfg, kind)


def _run(args: argparse.Namespace, cfg: Config, kind: str) -> dict:
    """:func:`main` once ``run.output_dir`` is checked and locked."""
    if args.predictions:
        return _rescore(args, cfg, kind)
    tasks = configured_tasks(cfg, kind, getattr(args, "task", None))
    if getattr(args, "checkpoints", None):
        if len(tasks) != 1:
            raise ConfigError(f"--checkpoints evaluates one task; the config has {tasks}: pass --task")
        return _evaluate_checkpoints(args, cfg, tasks[0])
    split = args.split or cfg.run.eval_split
    loaded = {t: load_task_records(cfg, t, split, args.q_ids, args.max_samples) for t in tasks}  # before the model
    weights = {"model.init_from": cfg.model.init_from, "model.ckpt": cfg.model.ckpt}
    provenance: dict[str, dict] = {}
    for task in tasks:  # no volume the weights (or this config) trained on may be evaluated
        for report in check_evaluation(cfg, [n for n, d in cfg.datasets.items() if d.task == task], split,
                                       list(weights.values()), args.allow_unknown_provenance):
            key = next(k for k, p in weights.items() if p is not None and str(p) == report.label)
            provenance[key] = provenance_status(report)
    model = _build_model(cfg)
    feature_cache = _feature_cache(cfg, model)
    root = Path(cfg.run.output_dir)
    results = {}
    for task, (records, datasets) in loaded.items():
        out = root if len(tasks) == 1 else root / task
        batch = cfg.run.eval_batch_size
        start = time.perf_counter()
        if task == CLASSIFICATION:
            rows = predict_classification(model, records, batch, num_workers=cfg.run.num_workers, progress=_progress(task),
                                          feature_cache=feature_cache, question=eval_prompts(cfg)[1])
            metrics = classification_metrics(rows, n_boot=args.bootstrap, seed=cfg.run.seed)
            metrics.update(classification_context(cfg, records, rows, cfg.run.seed))
        else:
            rows = predict_detection(model, records, task, batch, num_workers=cfg.run.num_workers, progress=_progress(task),
                                     instruction=eval_prompts(cfg)[0], feature_cache=feature_cache)
            metrics = detection_metrics(rows, task, n_boot=args.bootstrap, seed=cfg.run.seed)
            metrics["threshold"] = common_threshold(datasets)
        metrics["run"] = run_identity(cfg, args, model, split, datasets, batch, time.perf_counter() - start, len(rows))
        metrics["run"]["provenance"] = provenance  # per weight file: recorded / not recorded / unknown
        writer = write_classification_outputs if task == CLASSIFICATION else write_detection_outputs
        writer(out, rows, metrics, checkpoint_label(cfg), not args.no_figures)
        unknown = provenance_table_lines(provenance)
        if unknown:  # said first: these figures may include volumes the weights trained on
            write_text_atomic(out / "tables.md", "\n".join(unknown) + "\n" + (out / "tables.md").read_text(encoding="utf-8"))
        save_config(cfg, out / "config.yaml")
        results[task] = metrics
        headline = metrics["accuracy"] if task == CLASSIFICATION else metrics["weighted"]["mean_iou"]
        print(f"{task} ({split}, n = {len(rows)}): {'accuracy' if task == CLASSIFICATION else 'weighted mean IoU'} "
              f"{tables.fmt(headline)} -> {out}", file=sys.stderr)
    return results[tasks[0]] if len(tasks) == 1 else results


def detection_main(argv: Optional[Sequence[str]] = None) -> dict:
    """``eval_detection.py``: returns the metrics written to ``metrics.json``."""
    return main("detection", argv)


def classification_main(argv: Optional[Sequence[str]] = None) -> dict:
    """``eval_classification.py``: returns the metrics written to ``metrics.json``."""
    return main("classification", argv)
