"""Device, dtype and seeding helpers shared by training, evaluation, the demo and the model.

``resolve_device`` and ``resolve_dtype`` turn the config strings (``run.device``,
``model.dtype``, ``run.amp``) into torch objects with one rule for the whole project:
``auto`` means CUDA when available, bf16 on a GPU that supports it, fp16 on an older GPU and
fp32 on the CPU.
"""

from __future__ import annotations

import os
import random
from typing import Optional, Union

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``meta`` → :class:`torch.device`.

    Raises:
        ValueError: CUDA was asked for but is not available, or the string is not a device.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"run.device={device!r}: not a device ({err}); use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={device!r}: CUDA is not available on this machine; use auto or cpu")
    return resolved


def resolve_dtype(dtype: str, device: Union[str, torch.device]) -> torch.dtype:
    """Config dtype string (``auto`` | ``bf16`` | ``fp16`` | ``fp32``) → :class:`torch.dtype`.

    ``auto`` is bf16 on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU (and on the
    meta device, where nothing is computed).
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :data:`DTYPES` (``torch.bfloat16`` → ``'bf16'``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """Every RNG state needed to resume a run exactly.

    Only tensors, ints, lists and tuples, so ``torch.load(..., weights_only=True)`` reads it back.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cache_dir(sub: Optional[str] = None) -> str:
    """The project's cache folder: ``$MINIGPT_PANCREAS_CACHE`` or ``~/.cache/minigpt-pancreas``."""
    root = os.environ.get("MINIGPT_PANCREAS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "minigpt-pancreas"
    )
    return os.path.join(root, sub) if sub else root
