"""What produced an output, in one place (issue 24): the identity of a checkpoint (path and
content SHA-256), of the software (package versions) and of the machine. ``scan.py`` records them
in ``done.json`` / ``scan.json``; the evaluations in ``metrics.json`` (``run``).
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from minigpt4.io import file_sha256, to_json

VERSION_PACKAGES = ("minigpt-pancreas", "numpy", "nibabel", "pydicom", "highdicom", "pillow", "torch",
                    "transformers", "peft")


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes; of a folder, of its files' relative paths and SHA-256s (sorted,
    hidden files skipped), so adding, removing, renaming or changing a file changes it."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not found")
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    listing = [[p.relative_to(path).as_posix(), file_sha256(p)] for p in files]
    return hashlib.sha256(to_json(listing).encode("utf-8")).hexdigest()


def checkpoint_identities(paths: Mapping[str, str | os.PathLike]) -> list[CheckpointIdentity]:
    """``{stage: checkpoint path}`` → identities, sorted by stage. A folder holding
    ``model.safetensors`` (a project checkpoint) is identified by that file, as the evaluation's
    ``metrics.json`` identifies it; another file or folder by :func:`content_sha256`."""
    identities = []
    for stage, path in sorted(paths.items()):
        target = Path(path)
        if target.is_dir() and (target / "model.safetensors").is_file():
            target = target / "model.safetensors"
        identities.append(CheckpointIdentity(stage=str(stage), path=str(path), sha256=content_sha256(target)))
    return identities


def package_versions() -> dict:
    """Python and the versions of the packages that shape the outputs (None: not installed)."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class CheckpointIdentity:
    """One stage's weights: ``stage`` (e.g. ``pancreas_detection``), ``path`` as configured and
    ``sha256`` of its content (:func:`minigpt4.scan_outputs.checkpoint_identities`)."""

    stage: str
    path: str
    sha256: str

    def as_dict(self) -> dict:
        return {"stage": self.stage, "path": self.path, "sha256": self.sha256}


def checkpoint_identity(path: Optional[str]) -> Optional[dict]:
    """Path, size, mtime and sha256 of the weights being evaluated (a file, the
    ``model.safetensors`` of a checkpoint folder or the ``adapter_model.safetensors`` of a PEFT
    export); None when no checkpoint is configured."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():  # the tensor file of a checkpoint folder, or of a PEFT export
        target = next((target / name for name in ("model.safetensors", "adapter_model.safetensors")
                       if (target / name).is_file()), target)
    info: dict[str, Any] = {"path": str(path), "resolved": str(target.resolve())}
    if target.is_file():
        stat = target.stat()
        info.update(size=stat.st_size, mtime=stat.st_mtime, sha256=file_sha256(target))
    else:
        info["exists"] = False
    return info


def environment_identity() -> dict:
    import transformers  # lazy: importing transformers takes seconds; only the writers of metrics.json need it

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "pid": os.getpid(),
    }
