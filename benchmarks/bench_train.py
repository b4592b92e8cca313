"""Training throughput through the real loop (train.py's trainer, DataLoader, mixing, logging).

    python benchmarks/bench_train.py                       # tiny model, synthetic phantoms, CPU
    python benchmarks/bench_train.py --size full --device cuda --batch-size 8 --grad-accum 2 --workers 8
        # the paper's stage-1 model (train_configs/stage1_pancreas_detection.yaml: frozen ViT, LoRA r 64
        # on q,k) with random weights on a GPU, same data pipeline (benchmarks/full_size.py)

Reports samples/s (global batch / step wall time) and the data-loading share of step time
(time spent waiting for the next batch / step time), medians over the steps after warm-up, as
written to ``log.jsonl`` by the trainer. Data: ``--data`` (a prepared MSD folder) or synthetic
phantoms generated into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt4.config import DatasetConfig, load_config  # noqa: E402


def _synthetic(folder: Path) -> Path:
    from preprocessing import pipeline, synthetic

    raw = synthetic.generate(folder / "raw", scheme="msd", n=12, n_slices=24, size=256, seed=0, log=lambda *a: None)
    opts = pipeline.Options(dataset="MSD", images=[raw["images"]], labels=raw["labels"], out=str(folder / "prep"))
    pipeline.prepare(opts, log=lambda *a: None)
    return folder / "prep"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", help="prepared MSD folder (default: synthetic phantoms)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="--size full's code path at tiny widths (benchmarks/full_size.py DRY_RUN_SIZES), for CPU tests")
    parser.add_argument("--options", nargs="*", default=[], help="extra config overrides (key=value)")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    from minigpt4.training import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else _synthetic(tmp / "data")
        options = [
            f"run.output_dir={tmp / 'run'}", f"run.device={args.device}", f"run.batch_size={args.batch_size}",
            f"run.grad_accum_steps={args.grad_accum}", f"run.num_workers={args.workers}", "run.validate=false",
            f"run.iters_per_epoch={args.steps}", "run.max_epoch=1", "run.log_interval=1", "run.resume=null",
        ]
        build_with = None
        if args.size == "full":
            from benchmarks.full_size import DRY_RUN_SIZES, full_size_config, llama2_tokenizer_path, load_full_size_tokenizer

            # the paper's stage-1 model (not the CPU quickstart's trainable ViT and 4-module LoRA)
            tokenizer_path = llama2_tokenizer_path()
            sizes = list(DRY_RUN_SIZES) if args.dry_run else []
            cfg = full_size_config([*options, *sizes, *args.options], tokenizer_path)
            cfg.datasets = {"synthetic": DatasetConfig(root=str(data), task="pancreas_detection")}
            if tokenizer_path is None:  # tiny tokenizer inside the 32,000-entry LLaMA vocabulary
                build_with = load_full_size_tokenizer(None)
        else:
            cfg = load_config(ROOT / "train_configs" / "quickstart_cpu.yaml",
                              [f"datasets.synthetic.root={data}", *options, *args.options])
        if build_with is not None:
            import functools

            from minigpt4.models import minigpt_v2

            # train() builds from the config, whose random LLaMA must match its tokenizer: pass the
            # tiny one in instead, as build_model allows for benchmarks
            minigpt_v2.build_model = functools.partial(minigpt_v2.build_model, tokenizer=build_with)
        train(cfg)
        rows = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step" and r["step"] > args.warmup]
    summary = {
        "size": args.size, "device": args.device, "batch_size": args.batch_size, "grad_accum_steps": args.grad_accum,
        "workers": args.workers,
        "steps_measured": len(steps),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steps),
        "data_fraction": statistics.median(r["data_fraction"] for r in steps),
    }
    print(f"{args.size} on {args.device}: {summary['samples_per_s']:.1f} samples/s, "
          f"data loading {100 * summary['data_fraction']:.1f} % of step time "
          f"(batch {args.batch_size}, {args.workers} workers, median of {len(steps)} steps)")
    if args.json:
        from minigpt4.io import write_json_atomic

        write_json_atomic(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
