"""From slice answers to a patient answer: pure functions, no model (issue 26).

* **3-D consistency** (:func:`z_consistent`): the pancreas is one organ over adjacent slices, so
  of the slices where stage 1 gave a pancreas box only the largest *run* is kept: consecutive slice
  indices whose boxes overlap (intersection of positive area). Ties: the run with the larger total
  box area, then the first. A run shorter than ``min_run`` is dropped too (an isolated box is
  never the pancreas). Rule names: :data:`Z_RULES` (``none`` keeps every box).
* **Patient scores** (:func:`aggregate`) over the kept slices' P(tumor), rules that do not saturate
  when stage 2's probabilities crowd near 1: :data:`AGGREGATIONS`.
* **How much was assessed** (:func:`min_assessed_rule`, :func:`assessed`): a "no tumor" verdict needs
  at least a minimum number of kept pancreas slices, derived from the ground-truth pancreas extent
  of the validation volumes; below it the patient answer is ``inconclusive``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from minigpt4.config import AGGREGATIONS
from minigpt4.config import Z_RULES

Box = Sequence[float]

__all__ = ["AGGREGATIONS", "Z_RULES", "z_consistent", "box_runs", "aggregate", "min_assessed_rule", "assessed",
           "verdict_line"]
# Z_RULES: ``none``: every pancreas box counts; ``largest_run``: :func:`z_consistent`.
# AGGREGATIONS: patient score from the kept slices' P(tumor): the largest; the mean of the ``top_k`` largest;
# the same mean taken in logit space, mapped back with the sigmoid (P = 0.98 and 0.9999 stay apart:
# logits 3.9 and 9.2); the mean over all kept slices (a lesion spanning more slices scores higher).

LOGIT_CLIP = 1e-7
"""P(tumor) is clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] before the logit (fp32 P of exactly 0 or 1)."""

MIN_ASSESSED_SHARE = 0.5
"""A "no tumor" verdict needs pancreas boxes on at least this share of the pancreas's expected
extent (the median ground-truth extent, in slices, of the validation volumes): with less, most of
the organ was not looked at."""


def boxes_overlap(a: Box, b: Box) -> bool:
    """True when two ``(x1, y1, x2, y2)`` boxes share an area > 0."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_runs(boxes: Sequence[Optional[Box]]) -> list[list[int]]:
    """Runs of positions ``k, k+1, ...`` that all hold a box, each box overlapping the previous one."""
    runs: list[list[int]] = []
    for k, box in enumerate(boxes):
        if box is None:
            continue
        if runs and runs[-1][-1] == k - 1 and boxes_overlap(boxes[k - 1], box):  # type: ignore[arg-type]
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def z_consistent(boxes: Sequence[Optional[Box]], rule: str = "largest_run", min_run: int = 2) -> list[bool]:
    """Which slice boxes a 3-D consistency rule keeps.

    Args:
        boxes: per slice of one volume, in slice order: the pancreas box or None.
        rule: ``largest_run`` (the largest run of adjacent overlapping boxes, at least ``min_run``
            long; ties: larger total area, then the first) or ``none`` (every box).
    Returns:
        One bool per slice, True where a box is kept (False where there is none).
    """
    if rule not in Z_RULES:
        raise ValueError(f"unknown 3-D consistency rule {rule!r}; expected one of {Z_RULES}")
    if rule == "none":
        return [box is not None for box in boxes]
    runs = box_runs(boxes)
    keep = [False] * len(boxes)
    if not runs:
        return keep
    best = max(runs, key=lambda run: (len(run), sum(_area(boxes[k]) for k in run), -run[0]))  # type: ignore[arg-type]
    if len(best) >= min_run:
        for k in best:
            keep[k] = True
    return keep


def _logit(p: float) -> float:
    p = min(1.0 - LOGIT_CLIP, max(LOGIT_CLIP, float(p)))
    return math.log(p / (1.0 - p))


def aggregate(p_tumor: Sequence[Optional[float]], method: str, top_k: int) -> float:
    """A volume's score from its kept slices' P(tumor) (None = slice without a kept box, ignored);
    0 when no slice has one. Methods: :data:`AGGREGATIONS`."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {AGGREGATIONS}")
    values = sorted((float(p) for p in p_tumor if p is not None), reverse=True)
    if not values:
        return 0.0
    if method == "max":
        return values[0]
    if method == "top_k_mean":
        return float(np.mean(values[:top_k]))
    if method == "mean":
        return float(np.mean(values))
    mean_logit = float(np.mean([_logit(p) for p in values[:top_k]]))
    return 1.0 / (1.0 + math.exp(-mean_logit))


def min_assessed_rule(extents: Sequence[int], share: float = MIN_ASSESSED_SHARE, n_volumes: Optional[int] = None,
                      split: str = "val") -> dict:
    """The minimum of kept pancreas slices for a conclusive answer, from the ground-truth pancreas
    extents (slices with pancreas pixels) of the validation volumes: ``ceil(share × median)``,
    at least 1. With no extent known (no val pancreas): 1, said in ``rule``."""
    extents = [int(e) for e in extents if e > 0]
    if not extents:
        return {"min_slices": 1, "share": share, "median_extent_slices": None, "chosen_on": split,
                "n_volumes": n_volumes or 0, "rule": "no pancreas extent known on val: at least 1 kept slice"}
    median = float(np.median(extents))
    return {"min_slices": max(1, math.ceil(share * median - 1e-9)), "share": share, "median_extent_slices": median,
            "chosen_on": split, "n_volumes": n_volumes if n_volumes is not None else len(extents),
            "rule": f"kept pancreas slices >= {share:g} x the median ground-truth pancreas extent of the {split} volumes"}


def assessed(keep: Sequence[bool], boxed: Sequence[bool], min_slices: int) -> dict:
    """How much of a volume the patient answer rests on (report.json ``assessed``)."""
    kept = int(sum(bool(k) for k in keep))
    n_boxed = int(sum(bool(b) for b in boxed))
    return {"slices_with_pancreas": kept, "slices_total": len(keep), "slices_boxed_by_stage1": n_boxed,
            "boxes_dropped_by_z_rule": n_boxed - kept, "min_slices_required": int(min_slices),
            "enough": kept >= max(1, int(min_slices))}


def verdict_line(decision: str, slices_with_pancreas: int, slices_total: Optional[int], min_slices: int) -> str:
    """The verdict with how much was assessed: never a bare "no tumor found" (``slices_total`` None:
    not known, left out)."""
    seen = f"{slices_with_pancreas}{'' if slices_total is None else f' of {slices_total}'} slice(s)"
    if decision == "inconclusive":
        return (f"inconclusive: a pancreas was found on {seen}, fewer than the {min_slices} needed to assess it; "
                "no verdict")
    if decision == "tumor":
        return f"tumor suspected on the {slices_with_pancreas} slice(s) where a pancreas was found ({seen})"
    return f"no tumor found on the {slices_with_pancreas} slice(s) where a pancreas was found ({seen})"
