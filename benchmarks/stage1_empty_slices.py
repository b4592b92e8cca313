"""Stage 1 on whole volumes: the paper-faithful checkpoint beside one trained with slices without
pancreas (``datasets.*.empty_share``, issue 26), on the same slices (CPU, tiny models).

    python benchmarks/stage1_empty_slices.py --data quickstart_output/data/MSD quickstart_output/data/NIH \
        --checkpoint paper=runs/paper/checkpoint_best --checkpoint empty50=runs/empty50/checkpoint_best \
        --split val test --max-volumes 10 [--json out.json]

Every slice of up to ``--max-volumes`` volumes per folder and split (evenly spaced by name, as
``eval_cascade.py``), through the one pipeline's stage-1 code (:func:`minigpt4.inference.pipeline.run_stages`
with a single checkpoint and no patient threshold: greedy ``[refer]`` answer parsed by the one box
rule, P(no box) by teacher forcing). Printed per checkpoint and split:

* false box rate: slices without pancreas given a box (the cascade's "no box" = no crop);
* pancreas box rate and mean IoU on slices with pancreas;
* the AUC of P(no box) for "this slice has no pancreas" (its use as a confidence);
* wall and CPU seconds.

The figures come from tiny models on synthetic phantoms: they test the mechanism, not the paper.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.boxes import box_iou  # noqa: E402
from minigpt4.evaluation.stats import auc_score  # noqa: E402
from minigpt4.io import write_json_atomic  # noqa: E402


def measure(model, volumes: dict, batch_size: int) -> dict:
    """Stage-1 numbers of one checkpoint on ``{(dataset, volume): [slice records]}``."""
    from minigpt4.evaluation.cascade import _read_slices
    from minigpt4.inference.pipeline import CascadeSettings, SingleModel, run_stages

    settings = CascadeSettings(threshold=None, batch_size=batch_size)
    empty_boxed, pancreas_boxed, ious, p_no_box, labels = [], [], [], [], []
    for records in volumes.values():
        rows = run_stages(_OnlyStage1(SingleModel(model)), _read_slices(records), settings)
        for record, row in zip(records, rows):
            has = record.get("pixels_pancreas", 0) > 0
            boxed = row.pancreas_box is not None
            (pancreas_boxed if has else empty_boxed).append(boxed)
            if has:
                ious.append(box_iou(row.pancreas_box, record["bbox_pancreas"]) if boxed else 0.0)
            p_no_box.append(row.p_no_box)
            labels.append(not has)
    return {"n_slices_without_pancreas": len(empty_boxed), "false_box_rate": float(np.mean(empty_boxed)) if empty_boxed else None,
            "n_pancreas_slices": len(pancreas_boxed),
            "pancreas_box_rate": float(np.mean(pancreas_boxed)) if pancreas_boxed else None,
            "pancreas_iou": float(np.mean(ious)) if ious else None,
            "p_no_box_auc": auc_score(np.asarray(labels), np.asarray(p_no_box, dtype=float)),
            "n_volumes": len(volumes)}


class _OnlyStage1:
    """A single checkpoint whose stage 2 is never reached: every crop is skipped (no threshold, no
    stage 3) by answering P(yes) = 0 without running the model."""

    shares_tower = True

    def __init__(self, single) -> None:
        self.single = single

    def use(self, stage: str):
        if stage == "tumor_classification":
            return _NoClassifier(self.single.model)
        return self.single.use(stage)


class _NoClassifier:
    def __init__(self, model) -> None:
        self.model = model
        self.image_transform = model.image_transform
        self.device = getattr(model, "device", "cpu")

    def yes_probability(self, images, questions):
        return np.zeros(len(questions))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from minigpt4.config import DatasetConfig, load_config
    from minigpt4.evaluation.cascade import load_volumes
    from minigpt4.models.minigpt_v2 import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="prepared MSD / NIH folders (--all-slices)")
    parser.add_argument("--checkpoint", action="append", required=True, help="name=checkpoint folder (its config.yaml)")
    parser.add_argument("--split", nargs="+", default=["val", "test"])
    parser.add_argument("--max-volumes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        cfg = load_config(Path(path) / "config.yaml", [f"model.ckpt={path}", "model.init_from=null",
                                                        f"cascade.max_volumes={args.max_volumes}"])
        cfg.datasets = {f"d{i}": DatasetConfig(root=root, task="pancreas_detection") for i, root in enumerate(args.data)}
        model = build_model(cfg.model, device="cpu").eval()
        for split in args.split:
            wall, cpu = time.perf_counter(), time.process_time()
            figures = measure(model, load_volumes(cfg, split), args.batch_size)
            figures.update(wall_s=round(time.perf_counter() - wall, 1), cpu_s=round(time.process_time() - cpu, 1))
            results.setdefault(name, {})[split] = figures
            print(f"{name:12s} {split:5s} false box rate {figures['false_box_rate']:.3f} "
                  f"({figures['n_slices_without_pancreas']} slices without pancreas) | pancreas box rate "
                  f"{figures['pancreas_box_rate']:.3f}, IoU {figures['pancreas_iou']:.3f} ({figures['n_pancreas_slices']}) "
                  f"| AUC of P(no box) {figures['p_no_box_auc']:.3f} | {figures['wall_s']} s wall, {figures['cpu_s']} s CPU",
                  flush=True)
    if args.json:
        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
