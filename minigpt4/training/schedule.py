"""Learning-rate schedule of SPEC §5: linear warm-up from ``warmup_lr``, then cosine to ``min_lr``.

Updated per optimizer step (not per epoch), so the curve does not depend on how steps are grouped
into epochs, and a resumed run only needs the step counter to continue it exactly.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_at", "WarmupCosineSchedule"]


def lr_at(step: int, total_steps: int, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int) -> float:
    """Learning rate for the ``step``-th optimizer update (0-based).

    ``step < warmup_steps``: linear from ``warmup_lr`` (step 0) towards ``init_lr``; afterwards a
    half cosine from ``init_lr`` (at ``warmup_steps``) to ``min_lr`` (at ``total_steps``), then
    ``min_lr``.

    >>> lr_at(0, 100, 1e-5, 1e-6, 1e-6, 10)
    1e-06
    >>> round(lr_at(10, 100, 1e-5, 1e-6, 1e-6, 10), 12)
    1e-05
    """
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets ``lr`` of every parameter group before each optimizer step.

    Usage: ``schedule.apply()`` before ``optimizer.step()``, then ``schedule.advance()``.
    Its whole state is the step counter (``state_dict() -> {"step": int}``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        init_lr: float,
        min_lr: float,
        warmup_lr: float,
        warmup_steps: int,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.init_lr, self.min_lr, self.warmup_lr = float(init_lr), float(min_lr), float(warmup_lr)
        self.warmup_steps = int(warmup_steps)
        self.step = 0

    def current_lr(self) -> float:
        return lr_at(self.step, self.total_steps, self.init_lr, self.min_lr, self.warmup_lr, self.warmup_steps)

    def apply(self) -> float:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
