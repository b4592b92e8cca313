"""``eval_cascade.py``: the clinical cascade on the val and test volumes of prepared folders:
operating points chosen on val, per-slice and per-patient results on test
(:func:`minigpt4.evaluation.cascade.evaluate`)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt4.cli import add_provenance_argument
from minigpt4.config import add_config_arguments, load_config
from minigpt4.distributed import cleanup, init_distributed
from minigpt4.evaluation.cascade import cascade_tables, evaluate, folders_normalization, load_volumes, source_jobs
from minigpt4.evaluation.panorama import check_sources
from minigpt4.models.stages import check_stage_tasks, load_stages, require_all_stages
from minigpt4.outputs import OutputFolder, check_output_folder
from minigpt4.provenance import check_cascade_leakage, stage_provenance

CASCADE_OUTPUTS = ("predictions.jsonl", "metrics.json", "tables.md", "p_tumor_along_z.png", "reliability.png",
                   "config.yaml", "operating_point.json", "detection_maps", "panorama_curves.png")
"""What ``eval_cascade.py`` writes in ``run.output_dir`` (besides its ``manifest.json``)."""


def compared_config(cfg, where: str):
    """The config of the comparison run (``cascade.compare_pancreas_detection`` as stage 1, nothing
    else changed), or None when no comparison is configured.

    Raises:
        FileNotFoundError / ValueError: the checkpoint is missing, or is this cascade's own stage 1.
    """
    other = cfg.cascade.compare_pancreas_detection
    if other is None:
        return None
    if not Path(other).exists():
        raise FileNotFoundError(f"{where}: cascade.compare_pancreas_detection {other} not found; train it, or set "
                                "cascade.compare_pancreas_detection=null to skip the comparison")
    if Path(other).resolve() == Path(cfg.cascade.stages.pancreas_detection).resolve():
        raise ValueError(f"{where}: cascade.compare_pancreas_detection is cascade.stages.pancreas_detection ({other}): "
                         "compare another stage 1, or set it to null")
    baseline = copy.deepcopy(cfg)
    baseline.cascade.stages.pancreas_detection = other
    baseline.cascade.compare_pancreas_detection = None
    return baseline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval_cascade.py", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    add_provenance_argument(parser)
    parser.add_argument("--no-figures", action="store_true", help="skip the P(tumor) figure")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty run.output_dir no evaluation wrote (its files are kept)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``eval_cascade.py --cfg-path eval_configs/cascade.yaml``; returns the metrics written.

    Everything that can be checked without the model is checked first (seconds): the stages are
    configured and exist, every val/test slice has a PNG, the test split is not empty, each
    checkpoint records its stage's task (a warning where it records none), no stage (or its ancestors) trained on a val/test volume,
    and ``run.output_dir`` may be written (:class:`minigpt4.outputs.OutputFolder`).
    """
    args = build_parser().parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    require_all_stages(cfg.cascade.stages.configured(), args.cfg_path)
    baseline_cfg = compared_config(cfg, args.cfg_path)
    volumes = load_volumes(cfg, "val"), load_volumes(cfg, "test")  # fail on data before loading the model
    if not volumes[1]:
        roots = ", ".join(dict.fromkeys(str(ds.root) for ds in cfg.datasets.values()))
        raise ValueError(f"{roots}: the test split holds no volume (annotations/split.json); nothing to evaluate")
    check_sources(volumes[1], source_jobs(cfg))  # the detection maps need every test CT and label file
    folders_normalization(cfg)  # folders prepared alike (also checked, and recorded, after the scan)
    check_stage_tasks(cfg.cascade.stages.configured())  # checkpoint headers only
    provenance = stage_provenance(check_cascade_leakage(cfg, args.allow_unknown_provenance))
    if baseline_cfg is not None:
        check_stage_tasks({"pancreas_detection": baseline_cfg.cascade.stages.pancreas_detection})
        check_cascade_leakage(baseline_cfg, args.allow_unknown_provenance)
    out = Path(cfg.run.output_dir)
    # every rank checks the folder before any rank starts: a refused folder stops them all, none waits
    check_output_folder(out, "eval_cascade", lambda manifest: manifest.get("command") == "eval_cascade",
                        args.overwrite, option="run.output_dir", owner="eval_cascade.py")
    info = init_distributed(cfg.run.device)  # torchrun: the volumes are sharded across ranks
    try:
        folder = OutputFolder(out, "eval_cascade", option="run.output_dir", owner="eval_cascade.py",
                              overwrite=args.overwrite)
        with folder if info.is_main else contextlib.nullcontext():  # rank 0 locks and writes
            if info.is_main:
                folder.check_no_foreign(CASCADE_OUTPUTS)
                if not folder.manifest:
                    folder.write_manifest({"written_by": "eval_cascade.py"})
            compared = None
            if baseline_cfg is not None:  # the same cascade with the other stage 1, nothing written
                baseline = load_stages(cfg.model, baseline_cfg.cascade.stages.configured(), device=info.device,
                                       check_tasks=False)
                compared = evaluate(baseline_cfg, baseline, False, None, volumes, write=False)
                del baseline  # its base weights go before the cascade's load: one base in memory at a time
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            stages = load_stages(cfg.model, cfg.cascade.stages.configured(), device=info.device, check_tasks=False)
            metrics = evaluate(cfg, stages, not args.no_figures,
                               {"config": str(args.cfg_path), "options": list(args.options),
                                "provenance": provenance}, volumes, compared=compared)
    finally:
        cleanup()
    if info.is_main:
        print(cascade_tables(metrics), file=sys.stderr)
    return metrics
