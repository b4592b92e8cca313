"""Deterministic mixing of several datasets into batches (SPEC §5, release behaviour).

Every optimizer step takes its *whole global batch* from one dataset, chosen with probability
proportional to ``sample_ratio``. Each dataset is read as an endless stream of reshuffled passes.
Everything is a pure function of ``(seed, global step)``:

* the dataset of step ``t`` is drawn from ``random.Random(f"{seed}:mix:{t}")``;
* the position of dataset ``d`` in its stream at step ``t`` is the global batch size times the
  number of earlier steps that chose ``d``;
* pass ``p`` of dataset ``d`` is ``numpy`` permutation seeded by ``(seed, d, p)``.

So the data position of a run is just its step counter: resuming needs no sampler state, and
the same global batch splits identically over any number of processes and accumulation steps.

Layout of one global step of ``G = micro_batch × accum × world`` items: micro-batch ``m`` of rank
``r`` holds items ``[(m·world + r)·micro_batch, … + micro_batch)``. One process with
``accum = N`` therefore sees exactly the micro-batches that ``N`` DDP ranks see with
``accum = 1`` — the basis of the DDP-equivalence test.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Iterator, Sequence

import numpy as np

__all__ = ["MixPlan", "StepBatches"]


class MixPlan:
    """Which samples every global step reads.

    Args:
        sizes: number of records per dataset (all > 0).
        ratios: ``sample_ratio`` per dataset.
        micro_batch: per-process micro-batch size (``run.batch_size``).
        accum: gradient-accumulation steps.
        world: number of processes.
        seed: run seed.
        iters_per_epoch: steps per epoch (positive: ``run.iters_per_epoch`` is checked at load);
            None = ``ceil(sum(sizes) / global_batch)`` (a full pass's worth of samples).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        ratios: Sequence[float],
        micro_batch: int,
        accum: int = 1,
        world: int = 1,
        seed: int = 0,
        iters_per_epoch: int | None = None,
    ) -> None:
        if not sizes or len(sizes) != len(ratios):
            raise ValueError(f"sizes {list(sizes)} and ratios {list(ratios)} must be non-empty and of equal length")
        if min(sizes) <= 0:
            raise ValueError(f"every dataset needs at least one record, got sizes {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.ratios = [float(r) for r in ratios]
        self.micro_batch, self.accum, self.world = int(micro_batch), int(accum), int(world)
        self.seed = int(seed)
        self.global_batch = self.micro_batch * self.accum * self.world
        self.steps_per_epoch = (
            int(iters_per_epoch) if iters_per_epoch is not None else math.ceil(sum(self.sizes) / self.global_batch)
        )
        self._cum = np.cumsum(self.ratios) / sum(self.ratios)
        self._choices: list[int] = []
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def dataset_of_step(self, step: int) -> int:
        if len(self.sizes) == 1:
            return 0
        while len(self._choices) <= step:
            u = random.Random(f"{self.seed}:mix:{len(self._choices)}").random()
            self._choices.append(min(bisect.bisect_right(self._cum.tolist(), u), len(self.sizes) - 1))
        return self._choices[step]

    def consumed_before(self, step: int) -> list[int]:
        """Items read from each dataset's stream before global step ``step`` (the data position)."""
        counts = [0] * len(self.sizes)
        for t in range(step):
            counts[self.dataset_of_step(t)] += self.global_batch
        return counts

    def _item(self, dataset: int, position: int) -> int:
        n = self.sizes[dataset]
        passes, offset = divmod(position, n)
        key = (dataset, passes)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 4 * len(self.sizes):
                self._perm_cache.clear()
            perm = np.random.default_rng([self.seed, dataset, passes]).permutation(n)
            self._perm_cache[key] = perm
        return int(perm[offset])

    def micro_batches(self, step: int, rank: int, start: int | None = None) -> list[list[tuple[int, int, int]]]:
        """The ``accum`` micro-batches of ``rank`` at global ``step``: lists of
        ``(dataset, record index, stream position)``; ``start`` = this dataset's stream position
        at ``step`` if already known."""
        dataset = self.dataset_of_step(step)
        if start is None:
            start = self.consumed_before(step)[dataset]
        batches = []
        for m in range(self.accum):
            first = start + (m * self.world + rank) * self.micro_batch
            batches.append([(dataset, self._item(dataset, p), p) for p in range(first, first + self.micro_batch)])
        return batches

    def batches(self, first_step: int, last_step: int, rank: int) -> "StepBatches":
        """Batch sampler for a DataLoader over global steps ``[first_step, last_step)``."""
        return StepBatches(self, first_step, last_step, rank)


class StepBatches:
    """Iterable of micro-batches (``accum`` per step) for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, plan: MixPlan, first_step: int, last_step: int, rank: int) -> None:
        self.plan, self.first_step, self.last_step, self.rank = plan, first_step, last_step, rank

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step) * self.plan.accum

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        consumed = self.plan.consumed_before(self.first_step)
        for step in range(self.first_step, self.last_step):
            dataset = self.plan.dataset_of_step(step)
            yield from self.plan.micro_batches(step, self.rank, start=consumed[dataset])
            consumed[dataset] += self.plan.global_batch
