"""Tiny model configs for CPU tests (import from any test: ``from tests.tiny import ...``).

Sizes: EVA 2 blocks, width 64, 4 heads, MLP 128, 112-pixel images, patch 14 (8×8 = 64 patches
→ 16 visual tokens); LLaMA 2 layers, hidden 64, 4 heads, FFN 128, the project's tiny
SentencePiece tokenizer (vocab 512, built offline and cached); LoRA r 8 on q,k.
A forward+backward of a batch of 2 takes a few tens of milliseconds on one CPU core.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from minigpt4.config import LoraConfig, ModelConfig, TextConfig, VisionConfig
from minigpt4.tokenizer import TINY_VOCAB_SIZE


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """A tiny :class:`ModelConfig`; ``overrides`` are dotted keys, e.g. ``**{"lora.r": 4}`` or
    plain top-level fields such as ``max_new_tokens=5``."""
    cfg = ModelConfig(
        vision=VisionConfig(image_size=112, patch_size=14, width=64, depth=2, num_heads=4, mlp_hidden=128),
        text=TextConfig(
            hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=TINY_VOCAB_SIZE,
            max_position_embeddings=512,
        ),
        lora=LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "k_proj"]),
        dtype="fp32",
        max_new_tokens=8,
        seed=0,
    )
    if overrides:
        merged = OmegaConf.merge(
            OmegaConf.structured(cfg), OmegaConf.from_dotlist([f"{k}={_yaml(v)}" for k, v in overrides.items()])
        )
        cfg = OmegaConf.to_object(merged)
    return cfg


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def build_tiny_model(device: str = "cpu", load_weights: bool = True, cfg: Optional[ModelConfig] = None, **overrides: Any):
    """``build_model(tiny_model_config(**overrides))``; returns the model in eval mode."""
    from minigpt4.models.minigpt_v2 import build_model

    cfg = cfg if cfg is not None else tiny_model_config(**overrides)
    return build_model(cfg, device=device, load_weights=load_weights)


def tiny_images(batch: int = 2, size: int = 112, seed: int = 0) -> torch.Tensor:
    """Random normalised-looking images (B, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def random_checkpoints(folder, cfg: ModelConfig, names, seed: int = 100) -> dict:
    """``{name: checkpoint folder}``: checkpoints of one base (``cfg``) whose trainable tensors are
    different random values (N(0, 0.2²), seeded per name), written by ``save_checkpoint`` with a
    provenance of no volume (random weights); a name that is a task is recorded as its task."""
    from pathlib import Path

    from minigpt4.config import TASKS
    from minigpt4.provenance import PROVENANCE_SCHEMA
    from minigpt4.models.checkpoints import save_checkpoint
    from minigpt4.models.minigpt_v2 import build_model

    paths = {}
    for number, name in enumerate(names):
        model = build_model(cfg)
        generator = torch.Generator().manual_seed(seed + number)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        # honest provenance: random weights, trained and validated on no volume
        provenance = {"schema": PROVENANCE_SCHEMA, "runs": [{"run": f"tests/tiny.py random_checkpoints ({name})", "datasets": {}}]}
        # a stage's fixture records its stage's task, as the trainer does (stages.check_stage_tasks)
        tasks = [name] if name in TASKS else None
        paths[name] = str(save_checkpoint(model, Path(folder) / name, provenance=provenance, tasks=tasks).parent)
    return paths
