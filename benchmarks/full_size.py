"""What every full-size benchmark shares: the paper's stage-1 model with random weights, the tokenizer.

Full size = ``train_configs/stage1_pancreas_detection.yaml``'s model (EVA ViT-g 39 blocks, frozen;
LLaMA-2-7B sizes; LoRA r 64 on q,k) with every weight file switched off, so nothing is opened or
downloaded. The tokenizer is the real LLaMA-2 one where a copy exists (:data:`TOKENIZER_PLACES`,
e.g. the one ``benchmarks/gpu/fetch_wheels.sh`` puts next to the carried wheels for the GPU
machine), else the project's tiny tokenizer inside the 32,000-entry LLaMA vocabulary (only token
ids differ; the sequence lengths are set by the benchmarks, not by the tokenizer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "train_configs" / "stage1_pancreas_detection.yaml"
TOKENIZER_PLACES = (
    ROOT / "benchmarks" / "gpu" / "wheels" / "llama2_tokenizer.model",
    ROOT.parent / "shared" / "data" / "tokenizer" / "llama2" / "tokenizer.model",
)
"""Where a LLaMA-2 ``tokenizer.model`` is looked for (``$MINIGPT_TOKENIZER`` first)."""
RANDOM_WEIGHTS = ("model.vision.weights=null", "model.text.path=null", "model.text.tokenizer=null",
                  "model.init_from=null", "model.ckpt=null")

DEADLINE_ENV = "MINIGPT_DEADLINE"
"""Absolute deadline (Unix epoch seconds) that ``benchmarks/gpu/run_device.sh`` passes to every step."""

DRY_RUN_SIZES = ("model.vision.image_size=112", "model.vision.width=64", "model.vision.depth=2",
                 "model.vision.num_heads=4", "model.vision.mlp_hidden=128", "model.text.hidden_size=64",
                 "model.text.num_layers=2", "model.text.num_heads=4", "model.text.intermediate_size=128",
                 "model.lora.r=8", "model.dtype=fp32", "run.amp=none")
"""``--dry-run``: the full-size code path at tests/tiny.py widths (the 32,000-entry vocabulary is kept)."""


def llama2_tokenizer_path(explicit: Optional[str] = None) -> Optional[Path]:
    """The first LLaMA-2 tokenizer found: ``explicit``, ``$MINIGPT_TOKENIZER``, :data:`TOKENIZER_PLACES`.

    Raises:
        FileNotFoundError: ``explicit`` (or the variable) names a file that does not exist.
    """
    named = explicit or os.environ.get("MINIGPT_TOKENIZER")
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"tokenizer not found: {named}")
        return Path(named)
    return next((p for p in TOKENIZER_PLACES if p.is_file()), None)


def full_size_config(options: Sequence[str] = (), tokenizer: Optional[Path] = None):
    """The stage-1 config with random weights; the real tokenizer in ``model.text.tokenizer`` if given."""
    from minigpt4.config import load_config

    extra = [f"model.text.tokenizer={tokenizer}"] if tokenizer is not None else []
    return load_config(STAGE1, [*RANDOM_WEIGHTS, *extra, *options])


def load_full_size_tokenizer(path: Optional[Path]):
    """The LLaMA-2 tokenizer at ``path``, else the tiny one (pass it to ``build_model(tokenizer=...)``)."""
    from minigpt4.tokenizer import load_tokenizer

    return load_tokenizer(str(path)) if path is not None else load_tokenizer()


def deadline(relative_s: Optional[float] = None, started: Optional[float] = None) -> Optional[float]:
    """The absolute deadline (epoch seconds): ``$MINIGPT_DEADLINE`` when set (run_device.sh's one
    overall deadline), else ``started`` (default now) + ``relative_s``, else None (none).

    Raises:
        ValueError: ``$MINIGPT_DEADLINE`` is not a number.
    """
    named = os.environ.get(DEADLINE_ENV)
    if named:
        try:
            return float(named)
        except ValueError:
            raise ValueError(f"${DEADLINE_ENV}={named!r} is not a Unix time in seconds") from None
    if relative_s is None:
        return None
    return (time.time() if started is None else started) + relative_s


def seconds_left(until: Optional[float]) -> float:
    """Seconds until the absolute deadline ``until`` (infinite when None)."""
    return float("inf") if until is None else until - time.time()
