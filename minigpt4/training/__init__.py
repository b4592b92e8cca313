"""Training: the loop (:func:`train`), the per-step LR schedule, dataset mixing and DDP helpers."""

from minigpt4.training.schedule import WarmupCosineSchedule, lr_at
from minigpt4.training.trainer import TrainResult, train

__all__ = ["train", "TrainResult", "WarmupCosineSchedule", "lr_at"]
