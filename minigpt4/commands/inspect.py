"""``python -m minigpt4.inspect --cfg-path CFG [--options k=v ...] [--memory]``: parameter counts as JSON.

Builds the configured model on the meta device (no memory, no weight file, a few seconds even
at full size) and prints one JSON object: parameter counts per part, trainable and total
counts, the number of visual tokens, the LoRA targets and the bf16 memory of the weights.
``--memory`` adds ``memory_gib`` (predicted ``max_memory_allocated`` of a training step for the
config's batch size, sequence length and checkpointing), ``memory_reserved_gib`` (+ the allocator's
reserve), ``memory_device_gib`` (+ the CUDA context), ``memory_parts_gib`` (every term),
``memory_assumptions`` (tokens, bytes per token per layer, dropout semantics, stacked adapter,
budget, expected error) and ``memory_preferred_plan`` (the plan of effective batch
``batch_size × grad_accum_steps`` whose device figure fits 39.5 GiB with the least recomputation);
the arithmetic is in ``minigpt4/memory.py``.
Full-size defaults: vision 986,975,872; LLM 6,738,415,616; projection 23,072,768;
LoRA 33,554,432; 256 visual tokens.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from minigpt4.config import Config, ModelConfig, add_config_arguments, load_config
from minigpt4.io import to_json
from minigpt4.models.minigpt_v2 import build_model
from minigpt4.memory import predict_memory, preferred_plan


def model_report(cfg: ModelConfig) -> dict:
    """Parameter counts of the model ``cfg`` describes (built on the meta device)."""
    model = build_model(cfg, device="meta")
    named = list(model.named_parameters())

    def count(predicate) -> int:
        return sum(p.numel() for n, p in named if predicate(n, p))

    is_lora = lambda n, p: ".lora_" in n  # noqa: E731
    vision = count(lambda n, p: n.startswith("visual_encoder."))
    llm = count(lambda n, p: n.startswith("llama_model.") and not is_lora(n, p))
    proj = count(lambda n, p: n.startswith("llama_proj."))
    lora = count(is_lora)
    trainable = count(lambda n, p: p.requires_grad)
    total = count(lambda n, p: True)
    return {
        "vision_params": vision,
        "ln_vision_params": count(lambda n, p: n.startswith("ln_vision.")),
        "llm_params": llm,
        "proj_params": proj,
        "lora_params": lora,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 3),
        "visual_tokens": cfg.num_visual_tokens,
        "lora_targets": list(cfg.lora.target_modules),
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "weights_bf16_gib": round(total * 2 / 2**30, 2),
    }


def memory_report(cfg: Config, counts: dict) -> dict:
    """``memory_gib`` and its parts for ``cfg``, plus the plan :func:`minigpt4.memory.preferred_plan` picks."""
    import dataclasses


    predicted = predict_memory(cfg, counts)
    try:
        plan = preferred_plan(cfg, counts, effective_batch=cfg.run.batch_size * cfg.run.grad_accum_steps)
        figures = predict_memory(cfg, counts, plan)
        preferred = {**dataclasses.asdict(plan), "memory_gib": figures["peak"], "memory_device_gib": figures["device"]}
    except ValueError:  # nothing of this effective batch fits the budget
        preferred = None
    return {
        "memory_gib": predicted["peak"],
        "memory_reserved_gib": predicted["reserved"],
        "memory_device_gib": predicted["device"],
        "memory_parts_gib": predicted["parts"],
        "memory_assumptions": {k: v for k, v in predicted.items() if k not in ("peak", "reserved", "device", "parts")},
        "memory_preferred_plan": preferred,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt4.inspect", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--memory", action="store_true", help="add the predicted peak GPU memory of a training step")
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    report = model_report(cfg.model)
    if args.memory:
        report.update(memory_report(cfg, report))
    sys.stdout.write(to_json(report, indent=1, where="report") + "\n")
    return 0
