"""Full-size MiniGPT-Pancreas training-step benchmark on one GPU (random weights, bf16).

One optimizer step = forward + backward of ``grad_accum`` micro-batches + fused AdamW on the LoRA
+ ``llama_proj`` parameters, 448×448 images, the paper's detection prompt and 40 answer tokens
(322 tokens with the LLaMA-2 tokenizer), bf16 autocast. Cases (in this order, each timed after
warm-up; the memory model's prediction, ``minigpt4/memory.py``, is printed next to the measured
peak):

- batch 16 with activation checkpointing off / partial (every 3rd layer) / on (every layer), and
  the default configs' batch 8 × accumulation 2 without checkpointing;
- each with the frozen-ViT feature cache off / on (on = the tower output is computed once, as
  ``run.cache_visual_features`` does after the first epoch; its MFU counts no ViT FLOPs);
- all of the above eager, then with ``run.compile``'s regional compilation (each decoder layer
  and EVA block compiled on its own; compiling is in place, so eager cases run first).

Model FLOPs per sample (what MFU counts; recomputation under checkpointing is not counted):
frozen EVA forward ``2·N_vit·T_vit + 4·depth·T_vit²·C`` plus LLaMA forward and backward. The
LLaMA base is frozen, so its backward computes activation gradients only (≈ one forward):
``2 × (2·N_llm·T + 4·layers·T²·d)`` + the LoRA/projection weight gradients (``2·N_train·T``):
≈ 10.9 TFLOP at 322 tokens. MFU = samples/s × FLOP/sample ÷ the card's dense bf16 peak
(:data:`PEAK_BF16`).

Run (one H100/H200/A100; no weight file, no network)::

    python benchmarks/gpu_full_size.py --json benchmarks/results/gpu_full_size.json [--time-budget 240]
    python benchmarks/gpu_full_size.py --dry-run     # CPU: the same code path at tiny widths, 1 step per case

Limits: random weights (speed and memory do not depend on them); the tokenizer is found by
``benchmarks/full_size.py`` (real LLaMA-2 or the tiny one; the sequence length is the same);
cases left when ``--time-budget`` seconds have passed are reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.full_size import DRY_RUN_SIZES, full_size_config, llama2_tokenizer_path, load_full_size_tokenizer  # noqa: E402
from benchmarks.run_all import render_gpu_table  # noqa: E402
from minigpt4.config import ModelConfig  # noqa: E402
from minigpt4.io import to_json  # noqa: E402
from minigpt4.memory import Plan, predict_memory  # noqa: E402
from minigpt4.models.minigpt_v2 import build_model  # noqa: E402
from minigpt4.prompts import DETECTION_TEMPLATES, build_prompt_tokens  # noqa: E402
from minigpt4.tokenizer import Tokenizer  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; the first key found
# in torch.cuda.get_device_name() wins, so the specific H100 variants come before "H100"
PEAK_BF16 = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12}
ANSWER_TOKENS = 40
PARTIAL_EVERY = 3


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    grad_accum: int
    checkpoint_every: int  # 0 = off
    compile: bool
    feature_cache: bool

    @property
    def checkpointing(self) -> str:
        return {0: "off", 1: "all layers"}.get(self.checkpoint_every, f"every {self.checkpoint_every}")


def cases(compile_modes: Sequence[bool] = (False, True), dry_run: bool = False) -> list[Case]:
    """The benchmark matrix in run order (eager first: compiling is in place).

    ``dry_run``: batches divided by 8 and a single compiled case (each checkpointing mode would
    recompile the tiny layers, which is slow on a CPU and proves nothing more).
    """
    div = 8 if dry_run else 1
    plans = [(16 // div, 1, 0), (16 // div, 1, PARTIAL_EVERY), (16 // div, 1, 1), (8 // div, 2, 0)]
    matrix = [Case(b, a, every, compiled, cache) for compiled in compile_modes for b, a, every in plans
              for cache in (False, True)]
    if dry_run:
        matrix = [c for c in matrix if not c.compile] + [c for c in matrix if c.compile][:1]
    return matrix


def peak_flops(name: str) -> Optional[float]:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def answer_of_length(tokenizer: Tokenizer, n_tokens: int) -> str:
    """A box-like answer whose encoding has ``n_tokens - 1`` ids (+ ``</s>`` = n_tokens)."""
    text = " ".join(["{<12><34><56><78>}"] * 8)
    ids = tokenizer.encode(text)[: n_tokens - 1]
    return tokenizer.decode(ids)


def model_flops_per_sample(cfg: ModelConfig, seq_len: int, n_train: int, with_vit: bool = True) -> float:
    """Model FLOPs of one training sample (see the module docstring); ``with_vit=False``: cached features."""
    v, t = cfg.vision, cfg.text
    n_vit = v.depth * (4 * v.width**2 + 2 * v.width * v.mlp_hidden)
    t_vit = 1 + v.num_patches
    vit = 2 * n_vit * t_vit + 4 * v.depth * t_vit**2 * v.width
    n_llm = t.num_layers * (4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size) + t.hidden_size * t.vocab_size
    llm_fwd = 2 * n_llm * seq_len + 4 * t.num_layers * seq_len**2 * t.hidden_size
    proj = 2 * cfg.vision.width * cfg.merge_tokens * t.hidden_size * cfg.num_visual_tokens
    return (vit if with_vit else 0) + 2 * llm_fwd + 2 * n_train * seq_len + proj


def run_case(model, case: Case, steps: int, warmup: int, instruction: str, answer: str, device: str) -> dict:
    """Time ``steps`` optimizer steps of ``case`` after ``warmup`` ones; peak memory on CUDA."""
    model.enable_gradient_checkpointing(case.checkpoint_every > 0, every=max(case.checkpoint_every, 1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, **({"fused": True} if cuda else {}))
    size = model.cfg.vision.image_size
    images = torch.randn(case.batch, 3, size, size, device=device)
    instructions, answers = [instruction] * case.batch, [answer] * case.batch
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    tower = None
    if case.feature_cache:  # what the cache hands the model after the first epoch
        with torch.no_grad(), autocast:
            tower = model.encode_tower(images)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        for _ in range(case.grad_accum):
            with autocast:
                loss = model(None if tower is not None else images, instructions, answers, tower_tokens=tower).loss
            (loss / case.grad_accum).backward()  # as the trainer: the logits are not held through backward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = dataclasses.asdict(case) | {"checkpointing": case.checkpointing}
    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        row["oom"] = True
        return row
    finally:
        optimizer = tower = images = None  # free them before the next case (step() holds the cells)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    global_batch = case.batch * case.grad_accum
    row.update({"step_s": seconds, "samples_per_s": global_batch / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=300, help="seconds; later cases are skipped")
    parser.add_argument("--no-compile", action="store_true", help="eager cases only")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, 1 step per case, compile with the eager backend (graph capture only)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, args.steps, args.warmup = "cpu", 1, 0
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("no CUDA device: this benchmark needs one GPU (H100/H200/A100); --dry-run checks it on CPU", file=sys.stderr)
        return 2

    started = time.perf_counter()
    tokenizer_path = llama2_tokenizer_path()
    cfg = full_size_config([*(DRY_RUN_SIZES if args.dry_run else ("model.dtype=bf16",)), "model.gradient_checkpointing=false"],
                           tokenizer_path)
    tokenizer = load_full_size_tokenizer(tokenizer_path)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg.model, device=device, load_weights=False, tokenizer=tokenizer)
    build_s = time.perf_counter() - started

    instruction = DETECTION_TEMPLATES[0].format("pancreas")
    answer = answer_of_length(tokenizer, ANSWER_TOKENS)
    sample = build_prompt_tokens(tokenizer, instruction, model.num_visual_tokens, answer=answer)
    seq_len = len(sample.input_ids)
    n_answer = int((sample.labels != -100).sum())
    n_train = sum(t.numel() for t in model.trainable_state_dict().values())
    flops = {cache: model_flops_per_sample(cfg.model, seq_len, n_train, with_vit=not cache) for cache in (False, True)}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    peak = peak_flops(name)
    counts = {"trainable_params": n_train, "total_params": sum(p.numel() for p in model.parameters())}

    rows, compiled = [], False
    for case in cases((False,) if args.no_compile else (False, True), dry_run=args.dry_run):
        if time.perf_counter() - started > args.time_budget:
            rows.append(dataclasses.asdict(case) | {"checkpointing": case.checkpointing,
                                                    "skipped": f"time budget {args.time_budget:.0f} s"})
            continue
        if case.compile and not compiled:
            model.compile_regions(pad_to_multiple_of=64, backend="eager" if args.dry_run else "inductor")
            compiled = True
        try:
            row = run_case(model, case, args.steps, args.warmup, instruction, answer, device)
        except Exception as err:  # a compile failure must not lose the eager figures
            row = dataclasses.asdict(case) | {"checkpointing": case.checkpointing, "error": f"{type(err).__name__}: {err}"[:500]}
        plan = Plan(case.batch, case.grad_accum, case.checkpoint_every > 0, max(case.checkpoint_every, 1))
        run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, compile=case.compile))
        row["predicted_gib"] = predict_memory(run_cfg, counts, plan)["peak"]
        if "samples_per_s" in row:
            row["mfu"] = row["samples_per_s"] * flops[case.feature_cache] / peak if peak else None
        rows.append(row)
        print(to_json(row), flush=True)

    result = {"gpu": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seq_len": seq_len,
              "answer_tokens": n_answer, "flops_per_sample": flops[False], "flops_per_sample_cached": flops[True],
              "peak_flops": peak, "build_s": build_s, "steps": args.steps, "warmup": args.warmup,
              "tokenizer": "LLaMA-2" if tokenizer_path else "tiny", "default_plan": {"batch": 8, "grad_accum": 2},
              "dry_run": args.dry_run, "rows": rows}
    print()
    print(render_gpu_table(result))
    if args.json:
        from minigpt4.io import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
