"""Evaluation throughput: samples/s of batched greedy detection for batch size 1 vs 16, in one run,
and slices/s of the three-stage cascade encoding each slice per stage vs once (issue 20).

Times :func:`minigpt4.evaluation.predict_detection` end to end (PNG loading, the image transform,
generation with left padding, decoding, scoring) on generated 512×512 slices, and checks that the
batched answers equal the one-by-one answers. The cascade row times
:func:`minigpt4.inference.pipeline.run_stages` with every slice through all three stages (threshold
0, whole-slice fallback: random weights rarely answer a box) with ``encode_once`` off and on, and
checks the answers are equal. Tiny: three random stage checkpoints on one base (``load_stages``);
full size: one model for every stage (stage switching is not timed, the compute is the same).

    python benchmarks/bench_eval.py                      # tiny model on CPU (tests/tiny.py sizes)
    python benchmarks/bench_eval.py --full-size          # EVA ViT-g + LLaMA-2-7B sizes on one GPU, bf16

Limits: random weights (speed does not depend on them, but answer lengths do: a random model may
stop early or run to ``max_new_tokens``; the table reports the mean generated length). The full
size uses the real LLaMA-2 tokenizer when ``benchmarks/full_size.py`` finds one (``../shared`` or
the copy carried to the GPU machine in ``benchmarks/gpu/wheels``). No weight file is opened and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt4.config import ModelConfig, load_config  # noqa: E402
from minigpt4.io import to_json  # noqa: E402
from minigpt4.evaluation import predict_detection  # noqa: E402
from minigpt4.inference.pipeline import CascadeSettings, SingleModel, run_stages  # noqa: E402
from minigpt4.models.minigpt_v2 import build_model  # noqa: E402
from minigpt4.tokenizer import load_tokenizer  # noqa: E402

from benchmarks.full_size import llama2_tokenizer_path  # noqa: E402

LLAMA2_TOKENIZER = llama2_tokenizer_path()


def make_records(folder: Path, n: int, size: int = 512, seed: int = 0) -> list[dict]:
    """``n`` random grayscale slices with a pancreas-sized box each."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = folder / f"slice_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        x, y = int(rng.integers(150, 300)), int(rng.integers(200, 300))
        records.append({"q_id": i, "image": str(path), "target": "pancreas", "bbox": [x, y, x + 90, y + 40],
                        "width": size, "height": size, "dataset": "BENCH", "volume_name": f"v{i // 8}", "slice_index": i})
    return records


def time_case(model, records: list[dict], batch: int, repeats: int) -> tuple[float, list[dict]]:
    """Best-of-``repeats`` seconds for one pass over ``records``."""
    best, rows = float("inf"), []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        rows = predict_detection(model, records, "pancreas_detection", batch_size=batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, rows


def time_cascade(stages, slices: list[np.ndarray], batch: int, repeats: int) -> list[dict]:
    """Best-of-``repeats`` slices/s of the cascade encoding per stage, then once; answers compared."""
    settings = CascadeSettings(threshold=0.0, batch_size=batch, whole_slice_fallback=True)
    run_stages(stages, slices[:batch], settings)  # warm-up
    rows, reference = [], None
    for encode_once in (False, True):
        best = float("inf")
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            results = [r.record() for r in run_stages(stages, slices, settings, encode_once=encode_once)]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        reference = reference or results
        rows.append({"encode_once": encode_once, "slices": len(slices), "batch": batch, "seconds": best,
                     "slices_per_s": len(slices) / best, "tower_passes_per_slice": 2 if encode_once else 3,
                     "same_answers_as_per_stage": results == reference})
        print(to_json(rows[-1]), flush=True)
    return rows


def cascade_stages(cfg: ModelConfig, model, folder: Path, full_size: bool):
    """Three random stage checkpoints on one base (tiny), or the one model for every stage (full size)."""
    if full_size:
        return SingleModel(model)
    from minigpt4.models.stages import load_stages
    from tests.tiny import random_checkpoints

    return load_stages(cfg, random_checkpoints(folder, cfg, ("pancreas_detection", "tumor_classification",
                                                             "tumor_detection")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="paper sizes on a CUDA GPU (bf16)")
    parser.add_argument("--samples", type=int, default=None, help="default 64 (tiny) / 32 (full size)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cascade-slices", type=int, default=16, help="slices of the cascade row (0: skip it)")
    parser.add_argument("--fail-on-difference", action="store_true",
                        help="exit 1 when a batch's answers differ from the first batch size's (both are in the JSON)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.full_size:
        if not torch.cuda.is_available():
            print("--full-size needs a CUDA GPU", file=sys.stderr)
            return 2
        options = ["model.vision.weights=null", "model.text.path=null", "model.init_from=null", "model.ckpt=null",
                   "model.dtype=bf16", f"model.max_new_tokens={args.max_new_tokens}"]
        cfg: ModelConfig = load_config(ROOT / "eval_configs" / "stage1_pancreas_detection.yaml", options).model
        tokenizer = load_tokenizer(str(LLAMA2_TOKENIZER)) if LLAMA2_TOKENIZER else load_tokenizer()
        device, n = "cuda", args.samples or 32
    else:
        from tests.tiny import tiny_model_config

        cfg = tiny_model_config(max_new_tokens=args.max_new_tokens)
        tokenizer, device, n = None, "cpu", args.samples or 64

    start = time.perf_counter()
    model = build_model(cfg, device=device, load_weights=False, tokenizer=tokenizer)
    build_s = time.perf_counter() - start
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        records = make_records(Path(tmp), n)
        predict_detection(model, records[: max(args.batch_sizes)], "pancreas_detection", max(args.batch_sizes))  # warm-up
        reference = None
        for batch in args.batch_sizes:
            seconds, rows = time_case(model, records, batch, args.repeats)
            answers = [r["answer"] for r in rows]
            reference = reference or answers
            tokens = [len(model.tokenizer.encode(a)) for a in answers]
            results.append({"batch": batch, "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
                            "mean_answer_tokens": float(np.mean(tokens)),
                            "same_answers_as_first": float(np.mean([a == b for a, b in zip(answers, reference)])),
                            "differences": [{"sample": i, "first": b, "this": a}
                                            for i, (a, b) in enumerate(zip(answers, reference)) if a != b]})
            print(to_json(results[-1]), flush=True)
        cascade = []
        if args.cascade_slices:
            stages = cascade_stages(cfg, model, Path(tmp), args.full_size)
            rng = np.random.default_rng(1)
            slices = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(args.cascade_slices)]
            cascade = time_cascade(stages, slices, max(args.batch_sizes), args.repeats)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    base = results[0]["samples_per_s"]
    print()
    print(f"device: {name}; model: {'full size, bf16' if args.full_size else 'tiny (tests/tiny.py), fp32'}; "
          f"build {build_s:.1f} s; max_new_tokens {args.max_new_tokens}; torch {torch.__version__}")
    print()
    print("| batch | samples/s | speed-up vs first | mean answer tokens | answers equal to first |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.1f}× | "
              f"{r['mean_answer_tokens']:.1f} | {100 * r['same_answers_as_first']:.0f} % |")
    if cascade:
        print()
        print(f"Cascade, {cascade[0]['slices']} slices through all three stages, batch {cascade[0]['batch']}:")
        print()
        print("| tower encoding | tower passes per slice | slices/s | speed-up | answers equal to per stage |")
        print("|---|---:|---:|---:|---:|")
        for r in cascade:
            print(f"| {'once (stages 1 and 3 share)' if r['encode_once'] else 'per stage'} | "
                  f"{r['tower_passes_per_slice']} | {r['slices_per_s']:.2f} | "
                  f"{r['slices_per_s'] / cascade[0]['slices_per_s']:.2f}× | {'yes' if r['same_answers_as_per_stage'] else 'NO'} |")
    if args.json:
        from minigpt4.io import write_json_atomic

        write_json_atomic(args.json, {"device": name, "full_size": args.full_size, "build_s": build_s,
                                      "max_new_tokens": args.max_new_tokens, "rows": results, "cascade": cascade})
    differ = [r["batch"] for r in results if r["differences"]]
    if differ and args.fail_on_difference:
        print(f"error: answers at batch {differ} differ from batch {results[0]['batch']} (see 'differences')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
