"""``python -m minigpt4.inspect --cfg-path CFG [--options k=v ...]``: parameter counts as JSON.

Builds the configured model on the meta device (no memory, no weight file, a few seconds even
at full size) and prints one JSON object: parameter counts per part, trainable and total
counts, the number of visual tokens, the LoRA targets and the bf16 memory of the weights.
Full-size defaults: vision 986,975,872; LLM 6,738,415,616; projection 23,072,768;
LoRA 33,554,432; 256 visual tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from minigpt4.config import ModelConfig, add_config_arguments, load_config


def model_report(cfg: ModelConfig) -> dict:
    """Parameter counts of the model ``cfg`` describes (built on the meta device)."""
    from minigpt4.models.minigpt_v2 import build_model

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt4.inspect", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)
    json.dump(model_report(cfg.model), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    from minigpt4.cli import run_main

    raise SystemExit(run_main(main, prog="python -m minigpt4.inspect"))
