"""Full-size MiniGPT-Pancreas training-step benchmark on one GPU (random weights, bf16).

One training step = forward + backward + AdamW step of the LoRA + ``llama_proj`` parameters,
with 448×448 images, the paper's prompt and ~40 answer tokens, under bf16 autocast (the
project's GPU default). For each batch size (1, 4, 8, 16) and gradient checkpointing off/on it
prints samples/s, peak GPU memory and model FLOP utilisation (MFU), as a Markdown table, and
says whether the default training config (batch 16) fits an A100-40GB as used in the paper.

Model FLOPs per sample (what MFU counts; recomputation under checkpointing is not counted):
frozen EVA forward ``2·N_vit·T_vit + 4·depth·T_vit²·C`` plus LLaMA forward and backward. The
LLaMA base is frozen, so its backward computes activation gradients only (≈ one forward):
``2 × (2·N_llm·T + 4·layers·T²·d)`` + the LoRA/projection weight gradients (``2·N_train·T``).

Run (one H100/H200, ~3-5 minutes; needs no weight file and no network)::

    python benchmarks/gpu_full_size.py [--batch-sizes 1 4 8 16] [--steps 5] [--json out.json]

Limits: random weights (speed and memory do not depend on them); the tokenizer is the real
LLaMA-2 one when ``../shared/data/tokenizer/llama2/tokenizer.model`` exists, else the tiny one
(only token ids differ; the sequence length is set to the same ~40 answer tokens either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt4.config import ModelConfig, load_config  # noqa: E402
from minigpt4.models.minigpt_v2 import build_model  # noqa: E402
from minigpt4.prompts import DETECTION_TEMPLATES, build_prompt_tokens  # noqa: E402
from minigpt4.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "llama2" / "tokenizer.model"
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
ANSWER_TOKENS = 40


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


def model_flops_per_sample(cfg: ModelConfig, seq_len: int, n_train: int) -> float:
    v, t = cfg.vision, cfg.text
    n_vit = v.depth * (4 * v.width**2 + 2 * v.width * v.mlp_hidden)
    t_vit = 1 + v.num_patches
    vit = 2 * n_vit * t_vit + 4 * v.depth * t_vit**2 * v.width
    n_llm = t.num_layers * (4 * t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size) + t.hidden_size * t.vocab_size
    llm_fwd = 2 * n_llm * seq_len + 4 * t.num_layers * seq_len**2 * t.hidden_size
    return vit + 2 * llm_fwd + 2 * n_train * seq_len + 2 * cfg.vision.width * cfg.merge_tokens * t.hidden_size * cfg.num_visual_tokens


def run_case(model, batch: int, checkpointing: bool, steps: int, warmup: int, instruction: str, answer: str) -> dict:
    model.enable_gradient_checkpointing(checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=True)
    size = model.cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, device="cuda")
    instructions, answers = [instruction] * batch, [answer] * batch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, instructions, answers).loss
        loss.backward()
        optimizer.step()

    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        del optimizer
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"batch": batch, "checkpointing": checkpointing, "oom": True}
    peak = torch.cuda.max_memory_allocated() / 2**30
    del optimizer
    return {"batch": batch, "checkpointing": checkpointing, "step_s": seconds, "samples_per_s": batch / seconds, "peak_gib": peak}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-path", default=str(ROOT / "train_configs" / "stage1_pancreas_detection.yaml"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one GPU (H100/H200/A100)", file=sys.stderr)
        return 2

    # full-size model, random weights: no weight file is opened
    options = ["model.vision.weights=null", "model.text.path=null", "model.init_from=null", "model.ckpt=null",
               "model.dtype=bf16", "model.gradient_checkpointing=false"]
    cfg_path = args.cfg_path if Path(args.cfg_path).is_file() else None
    cfg = load_config(cfg_path, options)
    tokenizer = load_tokenizer(str(LLAMA2_TOKENIZER)) if LLAMA2_TOKENIZER.is_file() else load_tokenizer()
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    model = build_model(cfg.model, device="cuda", load_weights=False, tokenizer=tokenizer)
    build_s = time.perf_counter() - start

    instruction = DETECTION_TEMPLATES[0].format("pancreas")
    answer = answer_of_length(tokenizer, ANSWER_TOKENS)
    sample = build_prompt_tokens(tokenizer, instruction, model.num_visual_tokens, answer=answer)
    seq_len = len(sample.input_ids)
    n_answer = int((sample.labels != -100).sum())
    n_train = sum(t.numel() for t in model.trainable_state_dict().values())
    flops = model_flops_per_sample(cfg.model, seq_len, n_train)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)

    rows = []
    for checkpointing in (False, True):
        for batch in args.batch_sizes:
            row = run_case(model, batch, checkpointing, args.steps, args.warmup, instruction, answer)
            if not row.get("oom"):
                row["mfu"] = row["samples_per_s"] * flops / peak if peak else None
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"GPU: {name}; torch {torch.__version__}; bf16 autocast; weights bf16 (frozen), trainables fp32; "
          f"build {build_s:.0f} s; sequence {seq_len} tokens ({model.num_visual_tokens} visual, {n_answer} answer incl. </s>); "
          f"tokenizer {tokenizer.path.name if tokenizer.path else 'tiny'}; model FLOPs/sample {flops / 1e12:.2f} TFLOP; "
          f"peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    print()
    print("| batch | grad. checkpointing | samples/s | step (s) | peak memory (GiB) | MFU |")
    print("|---:|:---:|---:|---:|---:|---:|")
    for row in rows:
        gc = "on" if row["checkpointing"] else "off"
        if row.get("oom"):
            print(f"| {row['batch']} | {gc} | OOM | | | |")
        else:
            mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
            print(f"| {row['batch']} | {gc} | {row['samples_per_s']:.2f} | {row['step_s']:.3f} | {row['peak_gib']:.1f} | {mfu} |")
    default = next((r for r in rows if r["batch"] == cfg.run.batch_size and not r["checkpointing"]), None)
    default_gc = next((r for r in rows if r["batch"] == cfg.run.batch_size and r["checkpointing"]), None)
    print()
    for label, row in (("off", default), ("on", default_gc)):
        if row is not None:
            fits = "OOM here" if row.get("oom") else ("yes" if row["peak_gib"] < 40 * 1e9 / 2**30 - 1.5 else "no")
            peak_text = "" if row.get("oom") else f" peak {row['peak_gib']:.1f} GiB;"
            print(f"default training config (batch {cfg.run.batch_size}, checkpointing {label}):{peak_text} fits an A100-40GB: {fits}")
    if args.json:
        from minigpt4.io import write_json_atomic

        write_json_atomic(args.json, {"gpu": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                      "seq_len": seq_len, "flops_per_sample": flops,
                                      "default_batch": cfg.run.batch_size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
