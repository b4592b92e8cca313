"""A provenance record bound to the weights it describes, and how to tell an own checkpoint.

A project checkpoint keeps its provenance in the tensor file's own header
(:data:`minigpt4.models.checkpoints.PROVENANCE_KEY`), so it cannot describe other tensors. A PEFT
export keeps it in ``provenance.json`` beside the tensor files; that record names the sha256 of
every tensor file the export wrote (:data:`BOUND_KEY`), and :func:`check_binding` refuses a record
whose files changed since (an earlier export's record left beside other weights, a re-saved
adapter).

An own checkpoint that lost its provenance (``provenance.json`` deleted from an export, a
``model.safetensors`` re-saved without its metadata) still says it is ours through the files
around it: :func:`own_checkpoint_marks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from minigpt4.io import file_sha256

BOUND_KEY = "weights_sha256"
"""Key of ``provenance.json`` (an export's record): ``{tensor file relative to the folder: sha256}``."""

OWN_MARKS = ("config.yaml", "adapter_stack.json", "training_state.pt")
"""Files this project writes beside its weights (a checkpoint folder: ``config.yaml`` and, for the
latest, ``training_state.pt``; an export: ``adapter_stack.json``)."""


def tensor_files(folder: Path) -> list[str]:
    """Every ``.safetensors`` file of an export folder (its sub-folders' adapters too), relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if p.is_file())


def bind(record_text: str, folder: Path, files: list[str]) -> str:
    """The provenance record (JSON text) with the sha256 of ``files`` (relative to ``folder``) added."""
    record = json.loads(record_text)
    record[BOUND_KEY] = {rel: file_sha256(folder / rel) for rel in sorted(files)}
    return json.dumps(record, sort_keys=True)


def check_binding(record_path: Path) -> Optional[str]:
    """Why the record at ``record_path`` does not describe the tensor files beside it; None when
    every file it names has the recorded sha256 and no tensor file is left out."""
    folder = record_path.parent
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    bound = record.get(BOUND_KEY) if isinstance(record, dict) else None
    if not isinstance(bound, dict) or not bound:
        return "it names no weights (written before records were bound to their weights' sha256)"
    for rel in sorted(set(tensor_files(folder)) - set(bound)):
        return f"{rel} is not among the weights it describes"
    for rel, digest in sorted(bound.items()):
        path = folder / rel
        if not path.is_file():
            return f"{rel}, which it describes, is missing"
        actual = file_sha256(path)
        if actual != digest:
            return f"it describes {rel} with sha256 {str(digest)[:12]}…, the file there has {actual[:12]}…"
    return None


def own_checkpoint_marks(weights_file: Path) -> list[str]:
    """The files beside ``weights_file`` that say this project wrote it (:data:`OWN_MARKS`, or an
    export's ``manifest.json``); empty for a foreign file."""
    folder = weights_file.parent
    marks = [name for name in OWN_MARKS if (folder / name).is_file()]
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("command") == "export":
                marks.append("manifest.json")
        except (OSError, ValueError, AttributeError):
            pass
    return marks
