"""Training throughput through the real loop (train.py's trainer, DataLoader, mixing, logging).

    python benchmarks/bench_train.py                       # tiny model, synthetic phantoms, CPU
    python benchmarks/bench_train.py --size full --device cuda --batch-size 16 --workers 8
        # full-size MiniGPT-v2 shapes (random weights: nothing is loaded) on a GPU, same data pipeline

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

from minigpt4.config import load_config  # noqa: E402


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
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    from minigpt4.training import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else _synthetic(tmp / "data")
        options = [
            f"datasets.synthetic.root={data}", f"run.output_dir={tmp / 'run'}", f"run.device={args.device}",
            f"run.batch_size={args.batch_size}", f"run.num_workers={args.workers}", "run.validate=false",
            f"run.iters_per_epoch={args.steps}", "run.max_epoch=1", "run.log_interval=1", "run.resume=null",
        ]
        if args.size == "full":
            # full-size shapes from the ModelConfig defaults, random weights (no files needed)
            options += ["model.vision.image_size=448", "model.vision.patch_size=14", "model.vision.width=1408",
                        "model.vision.depth=39", "model.vision.num_heads=16", "model.vision.mlp_hidden=6144",
                        "model.text.hidden_size=4096", "model.text.num_layers=32", "model.text.num_heads=32",
                        "model.text.intermediate_size=11008", "model.text.vocab_size=32000",
                        "model.text.max_position_embeddings=4096", "model.lora.r=64", "model.dtype=auto",
                        "run.amp=auto", f"model.text.tokenizer={ROOT.parent / 'shared/data/tokenizer/llama2/tokenizer.model'}"]
        cfg = load_config(ROOT / "train_configs" / "quickstart_cpu.yaml", options)
        train(cfg)
        rows = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step" and r["step"] > args.warmup]
    summary = {
        "size": args.size, "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
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
