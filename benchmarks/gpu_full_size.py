"""Full-size MiniGPT-Pancreas on one GPU (random weights, bf16): training-step matrix and the clinician's wait.

Training step (default): one optimizer step = forward + backward of ``grad_accum`` micro-batches
+ fused AdamW on the LoRA + ``llama_proj`` parameters, 448×448 images, the paper's detection
prompt and 40 answer tokens (322 tokens with the LLaMA-2 tokenizer, 384 when compiled: padded to
a multiple of 64), bf16 autocast, MiniGPT-v2's stage-3 q,v LoRA stacked frozen as
``model.init_from`` stacks it. Cases in order of value (:func:`cases`):

1. the default of ``train_configs/stage1_pancreas_detection.yaml``: batch 8 × accumulation 2,
   no checkpointing, eager; 2. the same compiled (``run.compile``: regional compilation);
3. every eager variant (feature cache, batch 16 with partial = every 3rd layer / no / full
   checkpointing); 4. the same variants compiled. Eager cases that follow a compiled one run
   under ``model.eager_layers()``.

``--cascade``: the clinician's wait. The three-stage cascade at full size (one base + three
stage checkpoints with random LoRA and ``llama_proj``, loaded with
:func:`minigpt4.models.stages.load_stages`) scans a 100-slice 512² volume, timed end to end,
with every slice sent through all three stages (an upper bound: a real scan asks stage 3 only
where P(tumor) ≥ threshold) and the TFLOP count of what ran. Goal: ≤ 10 s on one H200.

Results survive any stop: the JSON is rewritten atomically after every case with
``"complete": false`` until the end, and SIGTERM/SIGINT write what is done. One deadline
(``$MINIGPT_DEADLINE``, epoch seconds, from ``benchmarks/gpu/run_device.sh``; else
``--deadline-s`` from the start) is respected: a case starts only with :data:`CASE_MIN_S` left,
one that compiles or recompiles (a new batch / checkpointing combination; the feature cache
reuses the graphs) only with :data:`COMPILE_MIN_S`; after a compile error the remaining compiled
cases are skipped. A case fails when a loss is not finite.

Exit status (:func:`outcome`): 0 when every case ran, or when the only cases left out were
skipped for the deadline (the compile matrix does not fit one device call: that is expected, and
``"outcome": "deadline"`` says so); 1 when a case failed (an error, a non-finite loss, a compile
error) or a signal stopped the run (``"failed"``, ``"interrupted"``).

Model FLOPs (:func:`train_flops`, per sample, of the tokens actually run): frozen EVA forward
(39 blocks, as the model runs them: BLIP-2 drops EVA-CLIP-g's 40th), ``llama_proj`` forward +
weight gradient, LLaMA linear layers forward + activation gradients (frozen base), attention
forward ``4·layers·T²·d`` and backward 2× that, ``lm_head`` at the answer positions only, the
trained LoRA (backward 2× forward) and the frozen stacked LoRA (backward 1×); recomputation under
checkpointing is not counted. MFU = samples/s × FLOP/sample ÷ the card's dense bf16 peak
(:data:`PEAK_BF16`, exact card names; an unknown card gets ``mfu: null`` with its name recorded).

Run (one H100/H200/A100; no weight file, no network)::

    python benchmarks/gpu_full_size.py --json benchmarks/results/gpu_full_size.json [--deadline-s 240]
    python benchmarks/gpu_full_size.py --cascade --json benchmarks/results/cascade_full_size.json
    python benchmarks/gpu_full_size.py --dry-run [--cascade]   # CPU: same code at tiny widths

Limits: random weights (speed and memory do not depend on them; answer lengths do, so the
cascade's generated tokens are recorded); the tokenizer is found by ``benchmarks/full_size.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.full_size import (  # noqa: E402
    DRY_RUN_SIZES,
    deadline,
    full_size_config,
    llama2_tokenizer_path,
    load_full_size_tokenizer,
    seconds_left,
)
from benchmarks.run_all import render_cascade, render_gpu_table  # noqa: E402
from minigpt4.config import CASCADE_STAGES, Config, ModelConfig  # noqa: E402
from minigpt4.io import to_json, write_json_atomic  # noqa: E402
from minigpt4.memory import MINIGPT_V2_ADAPTER, Plan, predict_memory  # noqa: E402
from minigpt4.models.minigpt_v2 import build_model  # noqa: E402
from minigpt4.prompts import DETECTION_TEMPLATES, build_prompt_tokens  # noqa: E402
from minigpt4.tokenizer import Tokenizer  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, by the exact name
# torch.cuda.get_device_name() reports; anything else is unknown (MFU null, never a guess)
PEAK_BF16 = {
    "NVIDIA H200": 989e12,            # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
}
ANSWER_TOKENS = 40
PARTIAL_EVERY = 3
PAD_TO = 64
CASE_MIN_S = 15.0
"""Seconds a case needs left before the deadline to start (build of its optimizer, warm-up, steps)."""
CASE_MIN_S_DRY_RUN = 2.0
"""The same in ``--dry-run`` (a tiny CPU case takes about a second)."""
COMPILE_MIN_S = 90.0
"""Seconds a case that compiles or recompiles needs left (one inductor compile ≈ 25–60 s)."""
CASCADE_GOAL_S = 10.0
CASCADE_MIN_S, CASCADE_MIN_S_DRY_RUN = 45.0, 5.0
"""Seconds the cascade needs left to start (build, three checkpoints, load, warm-up, scan)."""
CASCADE_SLICES = {"gpu": 100, "dry_run": 24}
"""Slices of the scanned volume: 100 on the GPU; 24 in the CPU dry run (only the code path is checked)."""


class Stopped(BaseException):
    """SIGTERM/SIGINT arrived: write what is done and stop (not an Exception: no case catches it)."""


def _stop(signum, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


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

    @property
    def graph_key(self) -> tuple:
        """Cases with the same key share compiled graphs; a new key compiles or recompiles. The
        feature cache is not part of it: it skips the ViT and hands the LLaMA layers the same
        shapes, so a cache variant needs no new compile budget."""
        return self.batch, self.checkpoint_every > 0


def cases(compile_modes: Sequence[bool] = (False, True), dry_run: bool = False) -> list[Case]:
    """The benchmark matrix in order of value: the default config eager, the same compiled, then
    every eager variant (the feature cache, batch 16 with partial / no / full checkpointing), then
    the compiled variants: an eager case never waits behind a compile the deadline may cut.

    ``dry_run``: batches divided by 8 and the compiled cases reduced to the default one (each
    new shape would recompile the tiny layers, which is slow on a CPU and proves nothing more).
    """
    div = 8 if dry_run else 1
    default = (8 // div, 2, 0, False)  # (batch, accum, every, cache)
    variants = [(8 // div, 2, 0, True), (16 // div, 1, PARTIAL_EVERY, False), (16 // div, 1, 0, False),
                (16 // div, 1, 1, False), (16 // div, 1, PARTIAL_EVERY, True), (16 // div, 1, 0, True),
                (16 // div, 1, 1, True)]
    first = [Case(*default[:3], compiled, default[3]) for compiled in (False, True)]
    rest = [Case(b, a, every, compiled, cache) for compiled in (False, True) for b, a, every, cache in variants]
    matrix = [c for c in first + rest if c.compile in compile_modes]
    if dry_run:
        matrix = [c for c in matrix if not c.compile or c == first[1]]
    return matrix


def peak_flops(name: str) -> Optional[float]:
    """Dense bf16 peak of the card named exactly ``name``; None for any other card."""
    return PEAK_BF16.get(name.strip())


def answer_of_length(tokenizer: Tokenizer, n_tokens: int) -> str:
    """A box-like answer whose encoding has ``n_tokens - 1`` ids (+ ``</s>`` = n_tokens)."""
    text = " ".join(["{<12><34><56><78>}"] * 8)
    ids = tokenizer.encode(text)[: n_tokens - 1]
    return tokenizer.decode(ids)


# ----------------------------------------------------------------------------- FLOPs
def _lora_flops_per_token(cfg: ModelConfig, targets: Sequence[str], r: int) -> float:
    """Forward FLOPs per token of one LoRA (A then B) on ``targets`` in every layer."""
    t = cfg.text
    width = {"down_proj": (t.intermediate_size, t.hidden_size), "gate_proj": (t.hidden_size, t.intermediate_size),
             "up_proj": (t.hidden_size, t.intermediate_size)}
    return sum(2 * r * sum(width.get(m, (t.hidden_size, t.hidden_size))) for m in targets) * t.num_layers


def _linear_params(cfg: ModelConfig) -> int:
    """Weights of the LLaMA decoder's linear layers (q, k, v, o, gate, up, down) over all layers."""
    t = cfg.text
    return t.num_layers * (4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size)


def eva_forward_flops(cfg: ModelConfig) -> float:
    """Frozen EVA forward of one image: patch embedding + ``vision.depth`` blocks (39 at full size)."""
    v = cfg.vision
    tokens = 1 + v.num_patches
    per_block = 2 * (4 * v.width**2 + 2 * v.width * v.mlp_hidden) * tokens + 4 * tokens**2 * v.width
    return v.depth * per_block + 2 * 3 * v.patch_size**2 * v.width * v.num_patches


def train_flops(cfg: ModelConfig, seq_len: int, answer_tokens: int, stacked: Optional[dict] = None,
                with_vit: bool = True) -> dict:
    """Model FLOPs of one training sample, by term (see the module docstring), and ``total``.

    Args:
        seq_len: tokens run per sample (the padded length when compiled).
        answer_tokens: supervised positions (``lm_head`` runs there only).
        stacked: ``{"targets": [...], "r": int}`` of a frozen stacked LoRA, or None.
        with_vit: False = cached tower features (no EVA forward).
    """
    t, h = cfg.text, cfg.text.hidden_size
    proj = 2 * cfg.vision.width * cfg.merge_tokens * h * cfg.num_visual_tokens
    attention = 4 * t.num_layers * seq_len**2 * h
    lora = _lora_flops_per_token(cfg, cfg.lora.target_modules, cfg.lora.r) * seq_len
    frozen = _lora_flops_per_token(cfg, stacked["targets"], stacked["r"]) * seq_len if stacked else 0
    terms = {
        "eva_forward": eva_forward_flops(cfg) if with_vit else 0,
        "projection_forward_and_weight_grad": 2 * proj,
        "llama_linear_forward_and_input_grad": 2 * 2 * _linear_params(cfg) * seq_len,
        "attention_forward_and_backward": attention + 2 * attention,
        "lm_head_answer_positions": 2 * 2 * h * t.vocab_size * answer_tokens,
        "lora_trained": 3 * lora,
        "lora_frozen_stacked": 2 * frozen,
    }
    return {**terms, "total": sum(terms.values())}


def generation_flops(cfg: ModelConfig, prompt_tokens: int, new_tokens: int, stacked: Optional[dict] = None,
                     logits_positions: Optional[int] = None) -> float:
    """Forward FLOPs of answering one image: EVA, projection, a prefill of ``prompt_tokens`` and
    ``new_tokens - 1`` decoding steps with a KV cache; ``lm_head`` at ``logits_positions``
    (default ``new_tokens``; 1 for P(yes)). ``new_tokens`` 1 = a prefill only."""
    t, h = cfg.text, cfg.text.hidden_size
    run = prompt_tokens + max(new_tokens - 1, 0)
    per_token = 2 * _linear_params(cfg) + _lora_flops_per_token(cfg, cfg.lora.target_modules, cfg.lora.r)
    if stacked:
        per_token += _lora_flops_per_token(cfg, stacked["targets"], stacked["r"])
    attention = 4 * t.num_layers * h * (prompt_tokens**2 + sum(prompt_tokens + j for j in range(1, max(new_tokens, 1))))
    positions = new_tokens if logits_positions is None else logits_positions
    return (eva_forward_flops(cfg) + 2 * cfg.vision.width * cfg.merge_tokens * h * cfg.num_visual_tokens
            + per_token * run + attention + 2 * h * t.vocab_size * positions)


# ----------------------------------------------------------------------------- model
def stack_random_adapter(model, r: int, targets: Sequence[str] = MINIGPT_V2_ADAPTER["targets"], seed: int = 7) -> dict:
    """Stack a frozen LoRA with random factors on ``targets``, as ``model.init_from`` stacks
    MiniGPT-v2's stage-3 q,v adapter. Returns ``{"targets", "r", "params"}``."""
    t = model.cfg.text
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(t.num_layers):
        for m in targets:
            prefix = f"llama_model.base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, t.hidden_size, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(t.hidden_size, r, generator=generator) * 0.01
    model.add_lora_adapter("stage3", tensors, alpha=16, source="random (benchmark)")
    return {"targets": list(targets), "r": r, "params": sum(x.numel() for x in tensors.values())}


def build_benchmark_model(dry_run: bool, device: str):
    """The stage-1 config's model with random weights and a random frozen q,v adapter stacked."""
    tokenizer_path = llama2_tokenizer_path()
    cfg = full_size_config([*(DRY_RUN_SIZES if dry_run else ("model.dtype=bf16",)), "model.gradient_checkpointing=false"],
                           tokenizer_path)
    tokenizer = load_full_size_tokenizer(tokenizer_path)
    model = build_model(cfg.model, device=device, load_weights=False, tokenizer=tokenizer)
    stacked = stack_random_adapter(model, cfg.model.lora.r if dry_run else MINIGPT_V2_ADAPTER["r"])
    return cfg, model, tokenizer, stacked, tokenizer_path


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(model, case: Case, steps: int, warmup: int, instruction: str, answer: str, device: str) -> dict:
    """Time ``steps`` optimizer steps of ``case`` after ``warmup`` ones; losses, peak memory on CUDA."""
    model.enable_gradient_checkpointing(case.checkpoint_every > 0, every=max(case.checkpoint_every, 1))
    model.pad_to_multiple_of = PAD_TO if case.compile else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, **({"fused": True} if cuda else {}))
    size = model.cfg.vision.image_size
    images = torch.randn(case.batch, 3, size, size, device=device)
    instructions, answers = [instruction] * case.batch, [answer] * case.batch
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    stance = model.eager_layers() if (model.compiled and not case.compile) else contextlib.nullcontext()
    losses: list[torch.Tensor] = []
    row = dataclasses.asdict(case) | {"checkpointing": case.checkpointing}
    tower = None

    def step():
        for _ in range(case.grad_accum):
            with autocast:
                loss = model(None if tower is not None else images, instructions, answers, tower_tokens=tower).loss
            (loss / case.grad_accum).backward()  # as the trainer: the logits are not held through backward
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        with stance:
            if case.feature_cache:  # what the cache hands the model after the first epoch
                with torch.no_grad(), autocast:
                    tower = model.encode_tower(images)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                step()
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        return row | {"status": "oom", "oom": True}
    finally:
        optimizer = tower = images = None  # free them before the next case (step() holds the cells)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    values = [float(x) for x in losses]
    # strict JSON: a non-finite loss is written as its name ("nan", "inf")
    row.update({"losses": [v if math.isfinite(v) else str(v) for v in values], "step_s": seconds, "samples_per_s": case.batch * case.grad_accum / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None})
    if not all(math.isfinite(v) for v in values):
        row.update(status="failed", error=f"non-finite loss: {values}")
    else:
        row["status"] = "ok"
    return row


def _skip(case: Case, why: str) -> dict:
    return dataclasses.asdict(case) | {"checkpointing": case.checkpointing, "status": "skipped", "skipped": why}


def _write(path: Optional[str], result: dict) -> None:
    if path:
        write_json_atomic(path, result)


def training_matrix(args, device: str, until: Optional[float]) -> dict:
    """The training-step cases, the JSON rewritten after each; returns the result dict."""
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    result = {"kind": "training_step", "gpu": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "dry_run": args.dry_run, "complete": False, "stopped": None, "deadline": until,
              "peak_flops": peak_flops(name) if device == "cuda" else None, "steps": args.steps, "warmup": args.warmup,
              "default_plan": {"batch": 8, "grad_accum": 2}, "rows": []}
    _write(args.json, result)
    current: Optional[Case] = None
    try:
        cfg, model, tokenizer, stacked, tokenizer_path = build_benchmark_model(args.dry_run, device)
        instruction = DETECTION_TEMPLATES[0].format("pancreas")
        answer = answer_of_length(tokenizer, ANSWER_TOKENS)
        sample = build_prompt_tokens(tokenizer, instruction, model.num_visual_tokens, answer=answer)
        seq_len = len(sample.input_ids)
        padded = math.ceil(seq_len / PAD_TO) * PAD_TO
        n_answer = int((sample.labels != -100).sum())
        n_train = sum(t.numel() for t in model.trainable_state_dict().values())
        counts = {"trainable_params": n_train, "stacked_adapter_params": stacked["params"],
                  "total_params": sum(p.numel() for p in model.parameters()) - stacked["params"]}
        flops = {(compiled, cache): train_flops(cfg.model, padded if compiled else seq_len, n_answer, stacked,
                                                with_vit=not cache) for compiled in (False, True) for cache in (False, True)}
        result.update({"seq_len": seq_len, "seq_len_compiled": padded, "answer_tokens": n_answer,
                       "flops_per_sample": flops[False, False]["total"], "flops_per_sample_cached": flops[False, True]["total"],
                       "flops_terms": flops[False, False], "build_s": time.perf_counter() - started,
                       "tokenizer": "LLaMA-2" if tokenizer_path else "tiny", "stacked_adapter": stacked, "counts": counts})
        _write(args.json, result)
        compiled_keys: set = set()
        compile_error: Optional[str] = None
        for case in cases((False,) if args.no_compile else (False, True), dry_run=args.dry_run):
            current = case
            need = COMPILE_MIN_S if case.compile and case.graph_key not in compiled_keys else (
                CASE_MIN_S_DRY_RUN if args.dry_run else CASE_MIN_S)
            left = seconds_left(until)
            if case.compile and compile_error:
                row = _skip(case, f"compile failed earlier ({compile_error[:200]})")
            elif left < need:
                what = "a compile or recompile" if need == COMPILE_MIN_S else "a case"
                row = _skip(case, f"deadline: {max(left, 0):.0f} s left, {what} needs {need:.0f} s")
            else:
                if case.compile and not model.compiled:
                    model.compile_regions(pad_to_multiple_of=PAD_TO, backend="eager" if args.dry_run else "inductor")
                try:
                    row = run_case(model, case, args.steps, args.warmup, instruction, answer, device)
                except Exception as err:  # a failing case must not lose the others' figures
                    row = dataclasses.asdict(case) | {"checkpointing": case.checkpointing, "status": "failed",
                                                      "error": f"{type(err).__name__}: {err}"[:500]}
                    if case.compile:
                        compile_error = row["error"]
                if case.compile:
                    compiled_keys.add(case.graph_key)
            run_len = padded if case.compile else seq_len
            plan = Plan(case.batch, case.grad_accum, case.checkpoint_every > 0, max(case.checkpoint_every, 1))
            run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, compile=case.compile))
            predicted = predict_memory(run_cfg, counts, plan, seq_len=run_len)
            row.update({"seq_len": run_len, "predicted_gib": predicted["peak"], "predicted_reserved_gib": predicted["reserved"],
                        "flops_per_sample": flops[case.compile, case.feature_cache]["total"]})
            if "samples_per_s" in row:
                peak = result["peak_flops"]
                row["mfu"] = row["samples_per_s"] * row["flops_per_sample"] / peak if peak else None
            result["rows"].append(row)
            current = None
            _write(args.json, result)
            print(to_json({k: v for k, v in row.items() if k != "losses"}), flush=True)
        cut = [r for r in result["rows"] if str(r.get("skipped", "")).startswith("deadline")]
        result["complete"] = not cut  # every case ran (or was skipped after a compile error)
        if cut:
            result["stopped"] = f"deadline: {len(cut)} of {len(result['rows'])} cases skipped"
    except Stopped as stop:
        result["stopped"] = f"{stop} after {len(result['rows'])} cases"
        result["interrupted"] = True
        if current is not None:
            result["rows"].append(_skip(current, f"interrupted by {stop}") | {"status": "interrupted"})
    except Exception as err:  # the build (or the bookkeeping) failed: recorded, then raised
        result["error"] = f"{type(err).__name__}: {err}"[:500]
        raise
    finally:
        result["outcome"] = outcome(result)
        _write(args.json, result)
    return result


def outcome(result: dict) -> str:
    """``"complete"``, ``"deadline"`` (only the deadline left cases out: not an error),
    ``"failed"`` (a case or the build failed) or ``"interrupted"`` (SIGTERM/SIGINT)."""
    if result.get("interrupted"):
        return "interrupted"
    if result.get("error") or any(r.get("status") == "failed" for r in result.get("rows", [])):
        return "failed"
    return "complete" if result.get("complete") else "deadline"


EXIT_STATUS = {"complete": 0, "deadline": 0, "failed": 1, "interrupted": 1}
"""The process exit status of each :func:`outcome`."""


# ----------------------------------------------------------------------------- the clinician's wait
def scan_volume(stages, slices, threshold=None, margin: int = 0, batch_size: int = 8, **gt) -> list[dict]:
    """The cascade as the public API runs it (:func:`minigpt4.inference.pipeline.scan_slices`,
    encoding each slice once where the stages share the frozen ViT): the ONE place this benchmark
    calls it. Returns the slices' ``predictions.jsonl`` rows."""
    from minigpt4.inference.pipeline import CascadeSettings, scan_slices

    settings = CascadeSettings(threshold=threshold, crop_margin=margin, batch_size=batch_size)
    return [r.record() for r in scan_slices(stages, slices, settings, **gt).slices]


def random_stage_checkpoints(cfg: Config, folder: Path, device: str, dry_run: bool) -> tuple[dict, dict]:
    """Three stage checkpoints of one random base: each with its own random LoRA + ``llama_proj``
    and the shared random frozen q,v adapter (as stage checkpoints trained from MiniGPT-v2 carry it)."""
    from minigpt4.models.checkpoints import save_checkpoint

    model = build_model(cfg.model, device=device, load_weights=False)
    stacked = stack_random_adapter(model, cfg.model.lora.r if dry_run else MINIGPT_V2_ADAPTER["r"])
    paths = {}
    for number, name in enumerate(CASCADE_STAGES):
        generator = torch.Generator().manual_seed(100 + number)
        with torch.no_grad():
            for param in model.trainable_parameters().values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        paths[name] = str(save_checkpoint(model, folder / name, cfg).parent)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return paths, stacked


def volume(n: int, size: int = 512, seed: int = 0):
    """``n`` slices (size, size) uint8: a bright ellipse (the body) with noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.45 * size)) ** 2 < 1
    return [np.clip(body * 120 + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8) for _ in range(n)]


def cascade_wait(args, device: str, until: Optional[float]) -> dict:
    """Time the three-stage scan of one volume (see the module docstring)."""
    from minigpt4.models.stages import load_stages
    from minigpt4.tokenizer import TINY_VOCAB_SIZE

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    n = args.slices or CASCADE_SLICES["dry_run" if args.dry_run else "gpu"]
    result = {"kind": "cascade", "gpu": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "dry_run": args.dry_run, "complete": False, "stopped": None, "slices": n, "size": 512,
              "goal_s": CASCADE_GOAL_S, "peak_flops": peak_flops(name) if device == "cuda" else None}
    _write(args.json, result)
    try:
        need = CASCADE_MIN_S_DRY_RUN if args.dry_run else CASCADE_MIN_S
        if seconds_left(until) < need:
            result["skipped"] = f"deadline: {max(seconds_left(until), 0):.0f} s left"
            return result
        tokenizer_path = llama2_tokenizer_path()
        options = [*(DRY_RUN_SIZES if args.dry_run else ("model.dtype=bf16",)), "model.gradient_checkpointing=false"]
        if tokenizer_path is None:  # the tiny tokenizer: a random LLaMA must match its vocabulary
            options.append(f"model.text.vocab_size={TINY_VOCAB_SIZE}")
        cfg = full_size_config(options, tokenizer_path)
        slices = volume(n)
        box = [200, 230, 330, 300]  # inclusive pixels: every slice gets a crop for stage 2
        with tempfile.TemporaryDirectory(prefix="cascade_bench_") as tmp:
            start = time.perf_counter()
            paths, stacked = random_stage_checkpoints(cfg, Path(tmp), device, args.dry_run)
            result["write_checkpoints_s"] = time.perf_counter() - start
            start = time.perf_counter()
            stages = load_stages(cfg.model, paths, device=device)
            result["load_stages_s"] = time.perf_counter() - start
        kwargs = dict(threshold=None, margin=cfg.cascade.crop_margin, batch_size=args.cascade_batch)
        model = stages.model
        # no autocast: evaluation and eval_cascade.py run the bf16 base as loaded
        warm = min(args.cascade_batch, n)
        start = time.perf_counter()
        scan_volume(stages, slices[:warm], gt_pancreas_boxes=[box] * warm, gt_tumor_slices=[True] * warm, **kwargs)
        _sync(device)
        result["warmup_s"] = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        rows = scan_volume(stages, slices, gt_pancreas_boxes=[box] * n, gt_tumor_slices=[True] * n, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
        tokenizer = model.tokenizer
        prompt = {q: len(build_prompt_tokens(tokenizer, q, model.num_visual_tokens).input_ids)
                  for q in _cascade_questions()}
        max_new = model.cfg.generation.max_new_tokens

        def run_lengths(answers: list[str]) -> list[int]:
            """Tokens each row ran: a batch decodes until its longest answer ends (+ ``</s>``)."""
            lengths = [min(len(tokenizer.encode(a)) + 1, max_new) for a in answers]
            out = []
            for s in range(0, len(lengths), args.cascade_batch):
                chunk = lengths[s:s + args.cascade_batch]
                out += [max(chunk)] * len(chunk)
            return out

        q1, q2, q3 = _cascade_questions()
        stage1 = run_lengths([r["pancreas_answer"] for r in rows])
        crops = sum(r["p_tumor"] is not None for r in rows) + sum(r["p_tumor_gt_crop"] is not None for r in rows)
        stage3 = run_lengths([r["tumor_answer_alone"] for r in rows if r["tumor_answer_alone"] is not None])
        flops = (sum(generation_flops(cfg.model, prompt[q1], k, stacked) for k in stage1)
                 + crops * generation_flops(cfg.model, prompt[q2], 1, stacked, logits_positions=1)
                 + sum(generation_flops(cfg.model, prompt[q3], k, stacked) for k in stage3))
        result.update({
            "seconds": seconds, "slices_per_s": n / seconds, "tflop": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
            "stage1_slices": len(stage1), "stage2_crops": crops, "stage3_slices": len(stage3),
            "mean_tokens_run": {"stage1": sum(stage1) / max(len(stage1), 1), "stage3": sum(stage3) / max(len(stage3), 1)},
            "batch_size": args.cascade_batch, "max_new_tokens": max_new, "prompt_tokens": list(prompt.values()),
            "stacked_adapter": stacked, "adapters": {name: stages.use(name).active_adapters() for name in CASCADE_STAGES},
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "meets_goal": seconds <= CASCADE_GOAL_S if not args.dry_run else None,
            "mfu": flops / seconds / result["peak_flops"] if result["peak_flops"] else None,
        })
        result["complete"] = True
    except Stopped as stop:
        result["stopped"] = str(stop)
        result["interrupted"] = True
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"[:500]
        raise
    finally:
        if result.get("skipped"):
            result["stopped"] = result["skipped"]
        result["outcome"] = outcome(result)
        _write(args.json, result)
    return result


def _cascade_questions() -> tuple[str, str, str]:
    from minigpt4.prompts import TARGET_NAMES, classification_question, detection_instruction

    return (detection_instruction(TARGET_NAMES["pancreas"]), classification_question(),
            detection_instruction(TARGET_NAMES["tumor"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds from the start (ignored when $MINIGPT_DEADLINE is set); later cases are skipped")
    parser.add_argument("--no-compile", action="store_true", help="eager cases only")
    parser.add_argument("--cascade", action="store_true", help="time the three-stage scan of one volume instead")
    parser.add_argument("--slices", type=int, default=None, help="--cascade: slices of the volume (default 100; dry run 24)")
    parser.add_argument("--cascade-batch", type=int, default=16, help="--cascade: images per model call")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, 1 step per case, compile with the eager backend (graph capture only)")
    parser.add_argument("--json", default=None, help="also write the results here (rewritten after every case)")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, args.steps, args.warmup = "cpu", 1, 0
    elif torch.cuda.is_available():
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        print("no CUDA device: this benchmark needs one GPU (H100/H200/A100); --dry-run checks it on CPU", file=sys.stderr)
        return 2
    try:
        until = deadline(args.deadline_s, started)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = cascade_wait(args, device, until) if args.cascade else training_matrix(args, device, until)
    finally:  # callers in the same process (tests) get their handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print()
    print(render_cascade(result) if args.cascade else render_gpu_table(result))
    print(f"outcome: {result['outcome']}" + (f" ({result['stopped']})" if result.get("stopped") else ""))
    return EXIT_STATUS[result["outcome"]]


if __name__ == "__main__":
    raise SystemExit(main())
