"""A training run's checkpoint folders and the state that resumes it exactly.

``checkpoint_<...>/`` = ``model.safetensors`` + ``config.yaml``
(:func:`minigpt4.models.checkpoints.save_checkpoint`) + ``training_state.pt`` (optimizer,
schedule, GradScaler, every rank's RNG, the step counter, the best validation score so far);
``checkpoint_latest`` names the newest folder, ``checkpoint_best`` is a copy of the best one.
Folders are written under a temporary name and moved into place, so a crash never leaves half
a checkpoint. :func:`minigpt4.training.train` builds the state; this module writes and reads it.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch

from minigpt4.config import Config
from minigpt4.io import torch_save_atomic, write_text_atomic
from minigpt4.models.checkpoints import save_checkpoint

__all__ = [
    "TRAINING_STATE",
    "LATEST_POINTER",
    "BEST_FOLDER",
    "STATE_FORMAT",
    "resolve_resume",
    "load_training_state",
    "write_checkpoint",
    "copy_as_best",
]


TRAINING_STATE = "training_state.pt"
LATEST_POINTER = "checkpoint_latest"
BEST_FOLDER = "checkpoint_best"
STATE_FORMAT = 1


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """``run.resume`` → a checkpoint folder or None.

    ``auto`` = the folder named in ``<output_dir>/checkpoint_latest`` (None when the run has no
    checkpoint yet, so ``resume: auto`` also starts a fresh run); a path must be a checkpoint
    folder holding ``training_state.pt``.
    """
    if resume is None:
        return None
    if resume == "auto":
        pointer = output_dir / LATEST_POINTER
        if not pointer.is_file():
            return None
        folder = output_dir / pointer.read_text().strip()
    else:
        folder = Path(resume)
    if not (folder / TRAINING_STATE).is_file():
        raise FileNotFoundError(f"run.resume={resume}: {folder / TRAINING_STATE} not found (not a training checkpoint)")
    return folder


def load_training_state(path: Path) -> dict:
    """``torch.load`` of a ``training_state.pt`` (weights only), with an error naming the file.

    Raises:
        ValueError: truncated, corrupt or not a training state (the message says what to do).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        # a truncated zip can surface as OSError(EINVAL) from a seek, without the file's name
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{path}: truncated or unreadable training state ({first}); resume from another checkpoint "
            f"(run.resume=<folder>) or delete {path.parent} and its name in {LATEST_POINTER}"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ValueError(f"{path}: not a training state of this project (no step/optimizer entries)")
    return state


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished temp folder onto ``final``; the old one is removed only afterwards."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_checkpoint(model: torch.nn.Module, cfg: Config, output_dir: Path, name: str, state: dict,
                     provenance: Optional[dict] = None, envelope: Optional[dict] = None) -> Path:
    final = output_dir / name
    tmp = output_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # the tasks it learned, so a cascade can refuse it for another stage (models/stages.py)
        save_checkpoint(model, tmp, cfg, provenance, tasks=[ds.task for ds in cfg.datasets.values()],
                        envelope=envelope)
        torch_save_atomic(tmp / TRAINING_STATE, state)  # a full disk: an OSError naming the file
    except OSError as err:  # name the checkpoint the user will look for, not its temporary folder
        if err.filename is None or not str(err.filename).startswith(str(tmp)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(err.errno, err.strerror, str(final / Path(err.filename).relative_to(tmp))) from None
    _replace_folder(tmp, final)
    write_text_atomic(output_dir / LATEST_POINTER, name + "\n")
    return final


def copy_as_best(folder: Path, output_dir: Path) -> None:
    tmp = output_dir / f".{BEST_FOLDER}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(folder, tmp)
    _replace_folder(tmp, output_dir / BEST_FOLDER)
