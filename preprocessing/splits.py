"""Seeded split by volume (SPEC §4 item 5): one split per dataset, reused by every stage and TC."""

from __future__ import annotations

from typing import Iterable

import numpy as np

SPLITS = ("train", "val", "test")


def _count(n: int, ratio: float) -> int:
    # Round half up (Python's round() is banker's rounding, 2.5 → 2, which surprises users).
    return int(np.floor(n * ratio + 0.5))


def split_volumes(volumes: Iterable[str], test_ratio: float = 0.2, val_ratio: float = 0.1,
                  seed: int = 42) -> dict:
    """Split volume names into train / val / test.

    The names are sorted first, so the result does not depend on file-system order; a seeded
    permutation then puts ``round(test_ratio * n)`` volumes in test, and ``round(val_ratio *
    n_rest)`` of the remaining (training) volumes in val.

    Returns:
        ``{"seed", "test_ratio", "val_ratio", "train": [...], "val": [...], "test": [...]}``
        with sorted name lists.
    """
    for name, r in (("test_ratio", test_ratio), ("val_ratio", val_ratio)):
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    names = sorted(set(volumes))
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    n_test = _count(len(names), test_ratio)
    test, rest = shuffled[:n_test], shuffled[n_test:]
    n_val = _count(len(rest), val_ratio)
    val, train = rest[:n_val], rest[n_val:]
    return {"seed": int(seed), "test_ratio": float(test_ratio), "val_ratio": float(val_ratio),
            "train": sorted(train), "val": sorted(val), "test": sorted(test)}


def split_of(split: dict) -> dict[str, str]:
    """``{volume_name: split}`` for a split dict."""
    return {v: s for s in SPLITS for v in split.get(s, [])}


def volume_stem(name: str) -> str:
    """A volume's name without a ``.nii.gz`` / ``.nii`` suffix (``pancreas_002.nii.gz`` → ``pancreas_002``),
    the form every prepared folder and the leakage check use."""
    name = str(name).strip()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_split(split, source) -> dict:
    """A ``split.json`` read from ``source``: an object whose train/val/test are lists of volume
    names, no volume in two splits. Returns it; raises ValueError naming the file otherwise."""
    if not isinstance(split, dict):
        raise ValueError(f"{source}: not a split (expected an object with train/val/test lists, got "
                         f"{type(split).__name__})")
    seen: dict[str, str] = {}
    for name in SPLITS:
        names = split.get(name, [])
        if not isinstance(names, list) or not all(isinstance(v, str) for v in names):
            raise ValueError(f"{source}: '{name}' must be a list of volume names")
        for volume in names:
            if volume in seen and seen[volume] != name:
                raise ValueError(f"{source}: volume {volume} is in both {seen[volume]} and {name}; "
                                 "a volume belongs to one split (re-run python -m preprocessing on that folder)")
            seen[volume] = name
    return split
