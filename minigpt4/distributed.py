"""Process-group helpers for ``torchrun`` (DDP): NCCL on GPU, gloo on CPU; the one place that
reads ``RANK`` / ``WORLD_SIZE`` (:func:`env_rank_and_world_size`) and splits work across ranks
(:func:`shard`). Used by training, the cascade evaluation and ``scan.py``.

A plain ``python train.py`` is a world of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from minigpt4 import utils

__all__ = ["DistInfo", "init_distributed", "rank_device", "rank_and_world_size", "env_rank_and_world_size", "shard", "barrier", "all_reduce_mean", "broadcast_object",
           
           "all_gather_objects", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def rank_device(name: str, local_rank: int = 0) -> torch.device:
    """``run.device`` → a device (``minigpt4.utils.resolve_device``); under torchrun a bare
    ``auto``/``cuda`` becomes ``cuda:<local rank>``."""
    device = utils.resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1)."""
    rank, world = env_rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # long timeout: ranks > 0 wait at a barrier while rank 0 validates and writes checkpoints
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(hours=2),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object from ``src`` to every rank (identity without a group)."""
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``: from torch.distributed when a process group is initialised, else
    from the ``RANK``/``WORLD_SIZE`` environment variables torchrun sets, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return env_rank_and_world_size()


def env_rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` from the ``RANK``/``WORLD_SIZE`` environment variables torchrun
    sets, else ``(0, 1)``; the one parser of them (:func:`init_distributed` uses it too)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                         "are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def shard(names: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The volumes of one rank: ``sorted(names)[rank::world_size]`` (round-robin by sorted name,
    so every volume goes to exactly one rank, whatever order the inputs were listed in)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    ordered = sorted(names)
    duplicated = sorted(name for name, count in Counter(ordered).items() if count > 1)
    if duplicated:
        raise ValueError(f"volume names must be unique (they name the output folders): {duplicated}")
    return ordered[rank::world_size]
