"""Evaluation throughput: samples/s of batched greedy detection for batch size 1 vs 16, in one run,
and slices/s of the three-stage cascade encoding each slice per stage vs once (issue 20).

Times :func:`minigpt4.evaluation.predict_detection` end to end (PNG loading, the image transform,
generation with left padding, decoding, scoring) on generated 512×512 slices, and compares the
batched answers with the one-by-one answers: exactly, and within a tolerance (boxes within one grid
unit, the same yes/no; :func:`agree`). In bf16 a batch may change an answer by a numerics effect
(other kernels for other shapes), so what decides is fp32: ``--check-dtype fp32`` (the default
when the timed model is not fp32) casts the model and compares batch 1 with the largest batch on
:data:`CHECK_SAMPLES` samples; both records are in the JSON. One deadline
(``$MINIGPT_DEADLINE`` or ``--deadline-s``): a row that cannot finish is skipped and the JSON, rewritten
after every row, says why (``"stopped"``). The cascade row times
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

from minigpt4.boxes import parse_box, parse_yes_no  # noqa: E402
from minigpt4.config import ModelConfig, load_config  # noqa: E402
from minigpt4.io import to_json, write_json_atomic  # noqa: E402
from minigpt4.evaluation import predict_detection  # noqa: E402
from minigpt4.inference.pipeline import CascadeSettings, SingleModel, run_stages  # noqa: E402
from minigpt4.models.minigpt_v2 import build_model  # noqa: E402
from minigpt4.tokenizer import load_tokenizer  # noqa: E402

from benchmarks.full_size import deadline, llama2_tokenizer_path, seconds_left  # noqa: E402

LLAMA2_TOKENIZER = llama2_tokenizer_path()
MIN_ROW_S = 1.0
"""Seconds a row needs at least (before the first pass is timed, nothing better is known)."""


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


GRID_TOLERANCE = 1
"""Grid units two box answers may differ by per coordinate and still agree (see :func:`agree`)."""
CHECK_SAMPLES = 8
"""Samples of the fp32 comparison (``--check-dtype fp32``): batch 1 vs the largest batch."""


def agree(first: str, this: str, tolerance: int = GRID_TOLERANCE) -> bool:
    """Two answers to the same question agree: the same text; or both boxes (the scoring rule,
    :func:`minigpt4.boxes.parse_box`) with every coordinate within ``tolerance`` grid units; or the
    same yes/no. A numerics effect of bf16 (batch 16 vs 1 runs other kernels; seen 1 in 32 answers
    on a CPU bf16 emulation) may move a box by a grid unit; it must not change a box into prose."""
    if first == this:
        return True
    a, b = parse_box(first), parse_box(this)
    if a is not None and b is not None:
        return all(abs(x - y) <= tolerance for x, y in zip(a, b))
    yes_a, yes_b = parse_yes_no(first), parse_yes_no(this)
    return yes_a is not None and yes_a == yes_b


def compare(reference: list[str], answers: list[str]) -> dict:
    """``same_answers_as_first`` (exact), ``agree_within_tolerance`` (:func:`agree`) and every
    differing answer with both texts."""
    differences = [{"sample": i, "first": b, "this": a, "within_tolerance": agree(b, a)}
                   for i, (a, b) in enumerate(zip(answers, reference)) if a != b]
    n = max(len(answers), 1)
    return {"same_answers_as_first": float(np.mean([a == b for a, b in zip(answers, reference)])) if answers else 1.0,
            "agree_within_tolerance": 1 - sum(not d["within_tolerance"] for d in differences) / n,
            "differences": differences}


def fp32_check(model, records: list[dict], batch: int) -> dict:
    """The same answers at batch 1 and ``batch`` in fp32 (the model cast in place): the build is
    right when they are equal; bf16 rows may differ by a numerics effect, fp32 must not."""
    model.to(torch.float32)
    first = [r["answer"] for r in predict_detection(model, records, "pancreas_detection", batch_size=1)]
    batched = [r["answer"] for r in predict_detection(model, records, "pancreas_detection", batch_size=batch)]
    return {"dtype": "fp32", "samples": len(records), "batches": [1, batch], **compare(first, batched)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="paper sizes on a CUDA GPU (bf16)")
    parser.add_argument("--samples", type=int, default=None, help="default 64 (tiny) / 32 (full size)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cascade-slices", type=int, default=16, help="slices of the cascade row (0: skip it)")
    parser.add_argument("--check-dtype", choices=["fp32", "none"], default=None,
                        help="compare batch 1 with the largest batch in fp32 on the first "
                             f"{CHECK_SAMPLES} samples (default: fp32 when the timed model is not fp32)")
    parser.add_argument("--fail-on-difference", action="store_true",
                        help="exit 1 when the answers that decide differ: the fp32 check's, or the timed rows' "
                             f"when they ran in fp32 (bf16 rows: recorded, and must agree within {GRID_TOLERANCE} grid unit)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds from the start (ignored when $MINIGPT_DEADLINE is set); what cannot finish "
                             "before it is skipped and says so")
    parser.add_argument("--json", default=None, help="also write the results here (rewritten after every row)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        until = deadline(args.deadline_s, started)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

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
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    timed_dtype = str(model.dtype).replace("torch.", "")
    check_dtype = args.check_dtype or ("none" if model.dtype == torch.float32 else "fp32")
    results: list[dict] = []
    cascade: list[dict] = []
    out = {"device": name, "full_size": args.full_size, "build_s": build_s, "max_new_tokens": args.max_new_tokens,
           "dtype": timed_dtype, "tolerance": f"boxes within {GRID_TOLERANCE} grid unit per coordinate, the same yes/no",
           "complete": False, "stopped": None, "rows": results, "cascade": cascade, "fp32_check": None}

    def write() -> None:
        if args.json:
            write_json_atomic(args.json, out)

    def skip(what: str, need: float) -> bool:
        """Too little time left for ``what`` (it needs about ``need`` s): recorded, True."""
        left = seconds_left(until)
        if left >= need:
            return False
        out["stopped"] = f"deadline: {max(left, 0):.0f} s left, {what} needs about {need:.0f} s"
        write()
        print(f"skipped {what}: {out['stopped']}", file=sys.stderr)
        return True

    write()
    with tempfile.TemporaryDirectory() as tmp:
        records = make_records(Path(tmp), n)
        predict_detection(model, records[: max(args.batch_sizes)], "pancreas_detection", max(args.batch_sizes))  # warm-up
        reference = None
        pass_s = MIN_ROW_S
        for batch in args.batch_sizes:
            if skip(f"batch {batch}", pass_s * args.repeats):
                break
            seconds, rows = time_case(model, records, batch, args.repeats)
            pass_s = max(pass_s, seconds)  # the first row (batch 1) is the slowest pass: an upper bound
            answers = [r["answer"] for r in rows]
            reference = reference or answers
            tokens = [len(model.tokenizer.encode(a)) for a in answers]
            results.append({"batch": batch, "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
                            "mean_answer_tokens": float(np.mean(tokens)), **compare(reference, answers)})
            write()
            print(to_json(results[-1]), flush=True)
        if args.cascade_slices and out["stopped"] is None and not skip("the cascade row", 3 * pass_s * args.repeats):
            stages = cascade_stages(cfg, model, Path(tmp), args.full_size)
            rng = np.random.default_rng(1)
            slices = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(args.cascade_slices)]
            cascade.extend(time_cascade(stages, slices, max(args.batch_sizes), args.repeats))
            write()
        if check_dtype == "fp32" and out["stopped"] is None and not skip("the fp32 check", 4 * pass_s):
            out["fp32_check"] = fp32_check(model, records[:CHECK_SAMPLES], max(args.batch_sizes))
            print(to_json(out["fp32_check"]), flush=True)
    out["complete"] = out["stopped"] is None
    # what decides: answers in fp32 (the check, or the timed rows when they ran in fp32)
    deciding = [out["fp32_check"]] if out["fp32_check"] else results if timed_dtype == "float32" else []
    out["answers_equal_in_fp32"] = all(not r["differences"] for r in deciding) if deciding else None
    out["bf16_within_tolerance"] = (all(r["agree_within_tolerance"] == 1.0 for r in results)
                                    if timed_dtype != "float32" and results else None)
    write()

    base = results[0]["samples_per_s"] if results else None
    print()
    print(f"device: {name}; model: {'full size, bf16' if args.full_size else 'tiny (tests/tiny.py), fp32'}; "
          f"build {build_s:.1f} s; max_new_tokens {args.max_new_tokens}; torch {torch.__version__}")
    print()
    print("| batch | samples/s | speed-up vs first | mean answer tokens | answers equal to first | within tolerance |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.1f}× | "
              f"{r['mean_answer_tokens']:.1f} | {100 * r['same_answers_as_first']:.0f} % | "
              f"{100 * r['agree_within_tolerance']:.0f} % |")
    if out["fp32_check"]:
        check = out["fp32_check"]
        verdict = f"{len(check['differences'])} differ" if check["differences"] else "equal"
        print(f"\nfp32 check, batch 1 vs {check['batches'][1]} on {check['samples']} samples: {verdict}")
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
    if out["stopped"]:
        print(f"stopped: {out['stopped']}", file=sys.stderr)
    if out["answers_equal_in_fp32"] is False and args.fail_on_difference:
        print("error: batched answers differ from batch 1 in fp32 (see 'differences' / 'fp32_check')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
