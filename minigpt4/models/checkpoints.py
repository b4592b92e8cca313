"""Checked weight loading and saving (SPEC §2 "Loading pretrained weights").

Formats :func:`load_weights` accepts:

* the project's own checkpoint: a folder holding ``model.safetensors`` (+ ``config.yaml``) or
  the ``.safetensors`` file itself (written by :func:`save_checkpoint`);
* the MiniGPT-v2 stage-3 checkpoint and the MiniGPT-Pancreas release checkpoints: torch pickles
  with a ``"model"`` dict of ``llama_proj.{weight,bias}`` and LoRA factors named with peft-0.2
  names (``llama_model.base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight``,
  no ``.default.`` segment), read with ``torch.load(..., weights_only=True)``;
* a standard PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` +
  ``llama_proj.safetensors``, as written by ``python -m minigpt4.export``, or by peft's
  ``save_pretrained`` with ``llama_proj.safetensors`` added; further adapters in subfolders are
  stacked frozen).

Every trainable tensor the model expects must be found (else ``ValueError`` naming the missing
keys); unexpected keys are reported, never silently dropped. ViT tensors (``visual_encoder.*``,
present only in checkpoints of runs with ``model.vision.trainable``) are optional: they are loaded
when the file has them — from a project checkpoint even into a frozen ViT, since the checkpoint
defines the model — and otherwise the ViT keeps ``vision.weights`` / its initialisation.

When the file's LoRA does not fit the configured adapter (other target modules or rank:
stage-3 has q,v; the paper trains q,k), it becomes a **frozen named adapter stacked with the
trainable one** (peft runs both; the base weights are never modified, so quantized bases work and
nothing is rounded into bf16 weights); the fresh trainable adapter stays at its initialisation
(B = 0), so the model computes exactly what the file's model computed. A project checkpoint
records its adapter stack (names, targets, r, α, source file + sha256) in the safetensors
metadata and stores the frozen adapters' tensors as ``lora_adapters.<name>.<peft-0.2 name>``, so
it rebuilds itself without the stage-3 file. An adapter already on the model (same tensors and
α) is not stacked twice. Old checkpoints (``minigpt-pancreas/1``) that hold ``merged_lora.*``
deltas (merged into the base by earlier versions) load too: each delta set becomes a frozen
adapter, which computes the same function without touching the base.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from minigpt4.io import file_sha256, read_json, save_safetensors_atomic, to_json, write_text_atomic
from minigpt4.models.lora_names import LORA_KEY_PREFIX, LORA_KEY_RE, split_lora_tensors, stable_name

if TYPE_CHECKING:  # annotations only: the model imports this module (no import circle)
    from minigpt4.models.minigpt_v2 import MiniGPTPancreas

log = logging.getLogger(__name__)


WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
# a standard PEFT adapter folder (python -m minigpt4.export): peft's own file names and key names
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PROJECTION_NAME = "llama_proj.safetensors"
VISION_NAME = "visual_encoder.safetensors"  # only when the run trained the ViT
STACK_NAME = "adapter_stack.json"
PEFT_KEY_PREFIX = "base_model.model."
"""peft's saved key prefix (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
FORMAT = "minigpt-pancreas/2"
"""/2: frozen adapters stacked (``lora_adapters.*`` + ``adapter_stack``); /1 merged them (``merged_lora.*``)."""
PROVENANCE_KEY = "provenance"
"""Safetensors metadata key of the training provenance (JSON; see :func:`save_checkpoint`)."""
TASKS_KEY = "tasks"
"""Safetensors metadata key of the tasks a checkpoint was trained for (JSON list, e.g.
``["pancreas_detection"]``; see :func:`checkpoint_tasks`)."""
ENVELOPE_KEY = "envelope"
"""Safetensors metadata key of the training envelope: the acquisition range of the training volumes
(JSON, :func:`minigpt4.training.envelope.training_envelope`; read with :func:`checkpoint_envelope`)."""
PROVENANCE_NAME = "provenance.json"
ENVELOPE_NAME = "envelope.json"
"""The training envelope in a PEFT export folder (as :data:`PROVENANCE_NAME` is the provenance)."""
"""The same record in a PEFT export folder (``python -m minigpt4.export``)."""
MINIGPT_V2_LORA_ALPHA = 16
"""α of the MiniGPT-v2 stage-3 and MiniGPT-Pancreas release adapters (r = 64 is read from the shapes)."""
STAGE3_SOURCE = (
    "checkpoint_stage3.pth: the MiniGPT-v2 stage-3 checkpoint linked from the MiniGPT-4 repository "
    "(https://github.com/Vision-CAIR/MiniGPT-4, 'MiniGPT-v2 (after stage-3)', ~100 MB)"
)

_MERGED_RE = re.compile(r"^merged_lora\.(?P<index>\d+)\.(?P<name>.+)$")  # legacy (format /1)
_STACKED_RE = re.compile(r"^lora_adapters\.(?P<adapter>[A-Za-z0-9_]+)\.(?P<name>.+)$")


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    path: str
    format: str  # "project" | "torch_pickle" | "peft"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stacked_adapters: list[str] = field(default_factory=list)
    """Names of the frozen LoRA adapters this file added to the model's stack."""
    reused_adapters: list[str] = field(default_factory=list)
    """Frozen adapters of this file already on the model (loaded earlier), not stacked twice."""
    lora_targets_in_file: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.path}: {len(self.loaded)} tensors loaded"]
        if self.stacked_adapters:
            parts.append(f"frozen LoRA adapters stacked: {self.stacked_adapters}")
        if self.reused_adapters:
            parts.append(f"frozen adapters already present: {self.reused_adapters}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys ignored: {self.unexpected[:5]}")
        return "; ".join(parts)


# ---------------------------------------------------------------------- saving
def save_checkpoint(model: MiniGPTPancreas, folder: Union[str, os.PathLike], config: Any = None,
                    provenance: Optional[dict] = None, tasks: Optional[Sequence[str]] = None,
                    envelope: Optional[dict] = None) -> Path:
    """Write ``folder/model.safetensors`` (trainable tensors + frozen adapters) and ``folder/config.yaml``.

    Each file is written to a temporary name and renamed into place; the tensors come last, so
    a folder with ``model.safetensors`` is complete. The safetensors metadata holds ``format``,
    ``lora_alpha``, ``lora_targets`` and ``adapter_stack`` (JSON list of
    :meth:`MiniGPTPancreas.adapter_stack` entries), and ``provenance`` when given; each frozen
    adapter's tensors are stored as ``lora_adapters.<name>.<peft-0.2 name>``.

    Args:
        model: the model.
        folder: checkpoint folder (created).
        config: the :class:`~minigpt4.config.Config` (or ``ModelConfig``/dict) to store beside;
            default ``model.cfg``.
        provenance: the volumes the weights were trained and validated on, with those of their
            ancestors (:func:`minigpt4.provenance.training_provenance`). In the tensor
            file's header, so it travels with the file (``checkpoint_best`` is a copy) and reads
            back without a model (:func:`read_metadata`). A checkpoint without it has unknown
            provenance and the leakage guard refuses it unless told otherwise.
        envelope: the acquisition range of the training volumes (metadata key ``envelope``),
            what a scan's fitness checks compare the input with.
    Returns:
        The path of ``model.safetensors``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.cfg if config is None else config
    if is_dataclass(config):
        config = OmegaConf.structured(config)
    write_text_atomic(folder / CONFIG_NAME, OmegaConf.to_yaml(config))

    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.trainable_state_dict().items()}
    stack = model.adapter_stack()
    trainable = next(entry for entry in stack if entry["trainable"])
    for entry in stack:
        if not entry["trainable"]:
            for name, t in model.adapter_tensors(entry["name"]).items():
                tensors[f"lora_adapters.{entry['name']}.{name}"] = t.to("cpu").contiguous().clone()
    metadata = {
        "format": FORMAT,
        "lora_alpha": str(trainable["alpha"]),
        "lora_targets": to_json(trainable["targets"], where="checkpoint metadata lora_targets"),
        "adapter_stack": to_json(stack, where="checkpoint metadata adapter_stack"),
    }
    if provenance is not None:
        metadata[PROVENANCE_KEY] = to_json(provenance, sort_keys=True)
    if envelope is not None:
        metadata[ENVELOPE_KEY] = to_json(envelope, sort_keys=True, where="checkpoint metadata envelope")
    if tasks is not None:
        metadata[TASKS_KEY] = to_json(sorted(set(tasks)), where="checkpoint metadata tasks")
    path = folder / WEIGHTS_NAME
    return save_safetensors_atomic(path, tensors, metadata)


# ---------------------------------------------------------------------- loading
def _read_project(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, metadata


def read_metadata(path: Union[str, os.PathLike]) -> tuple[str, Path, dict[str, str]]:
    """``(kind, tensor file, metadata)`` of a checkpoint, without reading its tensors.

    ``kind`` is ``"project"`` (a safetensors file this project wrote: its metadata has
    ``format`` = ``minigpt-pancreas/...``), ``"peft"`` (a PEFT adapter folder; its metadata holds
    ``provenance`` when the folder has :data:`PROVENANCE_NAME`, as our exports do, and ``envelope``
    from :data:`ENVELOPE_NAME`), or ``"foreign"``
    (anything else: the MiniGPT-v2 stage-3 ``.pth``, a release ``.pth``, another safetensors
    file, whose metadata is empty).

    Raises:
        FileNotFoundError: nothing there. ValueError: an unreadable safetensors header.
    """
    path = resolve_checkpoint_path(path)
    if path.name == PEFT_WEIGHTS_NAME and (path.parent / PEFT_CONFIG_NAME).is_file():
        records = {key: path.parent / name for key, name in ((PROVENANCE_KEY, PROVENANCE_NAME), (ENVELOPE_KEY, ENVELOPE_NAME))}
        return "peft", path, {key: file.read_text(encoding="utf-8") for key, file in records.items() if file.is_file()}
    if path.suffix != ".safetensors":
        return "foreign", path, {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if not str(metadata.get("format", "")).startswith("minigpt-pancreas/"):
        return "foreign", path, {}
    return "project", path, metadata


def checkpoint_tasks(path: Union[str, os.PathLike]) -> Optional[list[str]]:
    """The tasks a checkpoint was trained for, from its header only (no tensors read).

    :data:`TASKS_KEY` when the trainer wrote it; for checkpoints saved before it, the tasks of the
    datasets its recorded provenance names for the run that wrote it. None when nothing is
    recorded (a foreign checkpoint, an older own one, weights trained on no dataset).

    Raises:
        FileNotFoundError: nothing there. ValueError: an unreadable header or tasks record.
    """
    kind, weights_file, metadata = read_metadata(path)
    if TASKS_KEY in metadata:
        try:
            tasks = json.loads(metadata[TASKS_KEY])
            if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
                raise ValueError(f"not a list of task names: {metadata[TASKS_KEY][:80]!r}")
        except ValueError as err:
            raise ValueError(f"{weights_file}: unreadable '{TASKS_KEY}' record ({err})") from None
        return sorted(tasks)
    try:
        runs = json.loads(metadata.get(PROVENANCE_KEY) or "{}").get("runs") or []
        datasets = (runs[0].get("datasets") or {}).values() if isinstance(runs[0], dict) else []
        tasks = sorted({str(d["task"]) for d in datasets if isinstance(d, dict) and d.get("task")})
    except (ValueError, AttributeError, IndexError, TypeError):
        tasks = []
    return tasks or None


def checkpoint_envelope(path: Union[str, os.PathLike]) -> tuple[Optional[dict], str]:
    """``(envelope, note)``: the training envelope a checkpoint records (header only), or None with
    the reason: ``"none: a foreign checkpoint ..."``, ``"none: not recorded ..."``.

    Raises:
        FileNotFoundError: nothing there. ValueError: an unreadable header or envelope record.
    """
    kind, weights_file, metadata = read_metadata(path)
    if kind == "foreign":
        return None, f"none: {weights_file.name} is a foreign checkpoint (its training data are not recorded)"
    if ENVELOPE_KEY not in metadata:
        return None, f"none: {weights_file.name} records no envelope (trained before issue 28 or exported without it)"
    try:
        envelope = json.loads(metadata[ENVELOPE_KEY])
        if not isinstance(envelope, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ValueError(f"{weights_file}: unreadable '{ENVELOPE_KEY}' record ({err})") from None
    return envelope, f"recorded: {envelope.get('n_recorded', '?')} of {envelope.get('n_volumes', '?')} training volumes"


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {_unsafe_load_reason(err)}; "
                         "this project reads .pth files only as tensors and plain containers (a MiniGPT-v2 / "
                         "release checkpoint), or use a .safetensors file or a checkpoint folder") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (or {{'model': dict of tensors}})")
    return obj


def _unsafe_load_reason(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words: torch's own message
    advises retrying with ``weights_only=False``, which must never be done with a foreign file."""
    text = str(err)
    if match := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"not a plain tensor checkpoint (it would run Python code: {match[1]})"
    if match := re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n|$)", text):
        return f"not a plain tensor checkpoint, or not a torch file at all ({match[1].strip()[:200]})"
    if "Weights only load failed" in text:
        return "not a plain tensor checkpoint"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"not a readable torch file ({type(err).__name__}: {first[:200]})"


def _normalise(name: str) -> str:
    # DDP prefix and today's peft adapter segment → the stable (peft 0.2) naming
    if name.startswith("module."):
        name = name[len("module.") :]
    return stable_name(name)


def _adapter_name(path: Path) -> str:
    """A peft adapter name from a file name: ``checkpoint_stage3.pth`` → ``checkpoint_stage3``."""
    stem = path.parent.name if path.name == WEIGHTS_NAME else path.stem
    name = re.sub(r"\W+", "_", stem).strip("_") or "adapter"
    return name if name[0].isalpha() else f"adapter_{name}"


def _same_adapter(model: MiniGPTPancreas, entry: dict, tensors: dict[str, torch.Tensor], alpha: float) -> bool:
    if entry["alpha"] != float(alpha):
        return False
    present = model.adapter_tensors(entry["name"])
    return set(present) == set(tensors) and all(
        torch.equal(present[k], tensors[k].to(present[k].device, present[k].dtype)) for k in tensors
    )


def stack_frozen_adapter(
    model: MiniGPTPancreas,
    tensors: dict[str, torch.Tensor],
    alpha: float,
    name: str,
    source: Optional[str],
    sha256: Optional[str],
    report: LoadReport,
    active: bool = True,
) -> str:
    """Add ``tensors`` (peft-0.2 LoRA names) as a frozen adapter unless the model has it already.

    The name gets a suffix (``_2``, …) when a different adapter holds it. Returns the name used.
    """
    for entry in model.adapter_stack():
        if not entry["trainable"] and _same_adapter(model, entry, tensors, alpha):
            report.reused_adapters.append(entry["name"])
            return entry["name"]
    used = {entry["name"] for entry in model.adapter_stack()}
    unique, k = name, 2
    while unique in used:
        unique, k = f"{name}_{k}", k + 1
    model.add_lora_adapter(unique, tensors, alpha=alpha, source=source, sha256=sha256, active=active)
    report.stacked_adapters.append(unique)
    return unique


@dataclass
class CheckpointContents:
    """What a weight file holds, in the model's naming (see :func:`read_checkpoint`)."""

    format: str  # "project" | "torch_pickle" | "peft"
    path: Path  # the file (or PEFT folder) read
    weights_file: Path  # the tensor file the main LoRA comes from (its sha256 is the provenance)
    state: dict[str, torch.Tensor]  # llama_proj.*, the main LoRA (peft-0.2 names), visual_encoder.*
    lora_alpha: float  # alpha of the main LoRA
    frozen: list[dict] = field(default_factory=list)
    """Frozen stacked adapters: ``name, tensors, alpha, source, sha256, active``."""


def resolve_checkpoint_path(path: Union[str, os.PathLike]) -> Path:
    """A checkpoint folder → its tensor file (``model.safetensors``, or a PEFT folder's
    ``adapter_model.safetensors``); a file stays as it is.

    Raises:
        FileNotFoundError: nothing there (the message says where stage-3 comes from).
    """
    path = Path(path)
    if path.is_dir():
        path = path / (PEFT_WEIGHTS_NAME if (path / PEFT_CONFIG_NAME).is_file() else WEIGHTS_NAME)
    if not path.is_file():
        hint = f"; get {STAGE3_SOURCE}" if "stage3" in path.name else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    return path


def read_checkpoint(path: Union[str, os.PathLike], lora_alpha: Optional[float] = None) -> CheckpointContents:
    """Read any accepted checkpoint format (module docstring) without a model.

    Args:
        path: project folder / ``.safetensors`` / ``.pth`` / PEFT adapter folder.
        lora_alpha: alpha of a ``.pth`` file's LoRA; default :data:`MINIGPT_V2_LORA_ALPHA`
            (project and PEFT files record theirs; a given value overrides it).
    Raises:
        FileNotFoundError, ValueError: missing or unreadable file, inconsistent adapter stack.
    """
    path = resolve_checkpoint_path(path)
    if path.name == PEFT_WEIGHTS_NAME and (path.parent / PEFT_CONFIG_NAME).is_file():
        return _read_peft_folder(path.parent, lora_alpha)
    if path.suffix != ".safetensors":
        state = {_normalise(k): v for k, v in _read_pickle(path).items()}
        alpha = lora_alpha if lora_alpha is not None else MINIGPT_V2_LORA_ALPHA
        return CheckpointContents("torch_pickle", path, path, state, float(alpha))

    raw, metadata = _read_project(path)
    try:  # metadata is free text in the file header: a bad value names the file and the field
        alpha = lora_alpha if lora_alpha is not None else float(metadata.get("lora_alpha", MINIGPT_V2_LORA_ALPHA))
        stack = json.loads(metadata.get("adapter_stack", "[]"))
        legacy = json.loads(metadata.get("merged_lora", "[]"))  # format /1: deltas merged into the base
        for key, value in (("adapter_stack", stack), ("merged_lora", legacy)):
            if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
                raise ValueError(f"{key} is not a list of objects")
        for entry in stack:
            if not entry.get("trainable") and ("name" not in entry or "alpha" not in entry):
                raise ValueError("an adapter_stack entry lacks its name or alpha")
            float(entry.get("alpha", 0))
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: bad checkpoint metadata ({err}); re-save the checkpoint with this project") from None
    contents = CheckpointContents("project", path, path, {}, float(alpha))
    stacked: dict[str, dict[str, torch.Tensor]] = {}
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in raw.items():
        if match := _STACKED_RE.match(name):
            stacked.setdefault(match["adapter"], {})[match["name"]] = value
        elif match := _MERGED_RE.match(name):
            merged.setdefault(int(match["index"]), {})[match["name"]] = value
        else:
            contents.state[_normalise(name)] = value
    entries = [e for e in stack if not e.get("trainable")]
    if set(stacked) != {e["name"] for e in entries}:
        raise ValueError(
            f"{path}: adapter tensors {sorted(stacked)} do not match the recorded adapter stack "
            f"{[e['name'] for e in entries]}"
        )
    for entry in entries:  # frozen adapters of earlier stages, in stack order
        contents.frozen.append({
            "name": entry["name"], "tensors": stacked[entry["name"]], "alpha": float(entry["alpha"]),
            "source": entry.get("source"), "sha256": entry.get("sha256"), "active": entry.get("active", True),
        })
    for index in sorted(merged):
        meta = legacy[index] if index < len(legacy) else {}
        source = meta.get("source", str(path))
        contents.frozen.append({
            "name": _adapter_name(Path(source)), "tensors": merged[index],
            "alpha": float(meta.get("alpha", MINIGPT_V2_LORA_ALPHA)), "source": source, "sha256": None, "active": True,
        })
    return contents


def check_export_manifest(folder: Path) -> None:
    """A folder :mod:`minigpt4.export` wrote must match its ``manifest.json``: status complete and
    every listed file present with its size (a disk-full or killed export is never loadable).
    Folders without a manifest (peft's own ``save_pretrained``, older exports) pass.

    Raises:
        ValueError: naming the folder or file and what differs.
    """
    path = folder / "manifest.json"
    if not path.is_file():
        return
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("command") != "export":
        return
    files = manifest.get("files")
    if manifest.get("status") != "complete" or not isinstance(files, dict):
        raise ValueError(f"{folder}: an incomplete export (interrupted, or the disk filled up while writing); "
                         "export the checkpoint again")
    for rel, size in sorted(files.items()):
        file = folder / rel
        if not file.is_file():
            raise ValueError(f"{file}: missing from the export (its manifest lists it); export the checkpoint again")
        if file.stat().st_size != size:
            raise ValueError(f"{file}: {file.stat().st_size} bytes, the export manifest says {size} "
                             "(truncated or replaced); export the checkpoint again")


def _read_peft_folder(folder: Path, lora_alpha: Optional[float]) -> CheckpointContents:
    """A folder written by :mod:`minigpt4.export` (or any PEFT LoRA folder + ``llama_proj.safetensors``)."""
    check_export_manifest(folder)
    config, state = _read_peft_adapter(folder)
    alpha = float(lora_alpha if lora_alpha is not None else config["lora_alpha"])
    projection = folder / PROJECTION_NAME
    if not projection.is_file():
        raise FileNotFoundError(f"{folder}: {PROJECTION_NAME} missing (the llama_proj weights of a PEFT export)")
    state.update(_read_project(projection)[0])
    if (folder / VISION_NAME).is_file():
        state.update(_read_project(folder / VISION_NAME)[0])
    contents = CheckpointContents("peft", folder, folder / PEFT_WEIGHTS_NAME, state, alpha)
    stack_file = folder / STACK_NAME
    if stack_file.is_file():
        entries = read_json(stack_file)
    else:  # peft's own save_pretrained: every further adapter in a subfolder named after it
        entries = [{"name": d.name} for d in sorted(folder.iterdir()) if (d / PEFT_CONFIG_NAME).is_file()]
    for entry in entries:
        if entry.get("trainable"):
            continue
        sub = folder / entry.get("folder", entry["name"])
        sub_config, sub_tensors = _read_peft_adapter(sub)
        contents.frozen.append({
            "name": entry["name"], "tensors": sub_tensors,
            "alpha": float(sub_config["lora_alpha"]), "source": entry.get("source"), "sha256": entry.get("sha256"),
            "active": entry.get("active", True),
        })
    return contents


def _read_peft_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, {peft-0.2 name: tensor})`` of one PEFT LoRA folder."""
    config = read_json(folder / PEFT_CONFIG_NAME)
    unsupported = {k: config[k] for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern") if config.get(k)}
    if config.get("peft_type", "LORA") != "LORA" or unsupported or "lora_alpha" not in config:
        got = unsupported or config.get("peft_type")
        raise ValueError(f"{folder / PEFT_CONFIG_NAME}: only plain LoRA adapters are supported (got {got})")
    tensors, _ = _read_project(folder / PEFT_WEIGHTS_NAME)
    ours = {LORA_KEY_PREFIX + k[len(PEFT_KEY_PREFIX):]: v for k, v in tensors.items() if k.startswith(PEFT_KEY_PREFIX)}
    bad = [k for k in tensors if not k.startswith(PEFT_KEY_PREFIX)] + [k for k in ours if not LORA_KEY_RE.match(k)]
    if bad:
        raise ValueError(f"{folder / PEFT_WEIGHTS_NAME}: not LoRA factors in peft's naming, e.g. {bad[:3]}")
    return config, ours


def load_weights(model: MiniGPTPancreas, path: Union[str, os.PathLike], lora_alpha: Optional[float] = None) -> LoadReport:
    """Load a checkpoint into ``model``, checked (see the module docstring for the formats).

    Args:
        model: the model (LoRA already attached).
        path: project folder / ``.safetensors`` / MiniGPT-v2 or release ``.pth`` / PEFT export folder.
        lora_alpha: alpha of the file's LoRA; default: the value the file records, else
            :data:`MINIGPT_V2_LORA_ALPHA`.
    Returns:
        A :class:`LoadReport` (also logged).
    Raises:
        FileNotFoundError: no such file/folder (the message says where stage-3 comes from).
        ValueError: unreadable file, missing trainable keys (named), shape mismatches.
    """
    contents = read_checkpoint(path, lora_alpha)
    path, state, alpha = contents.path, contents.state, contents.lora_alpha
    report = LoadReport(str(path), contents.format)
    for frozen in contents.frozen:
        stack_frozen_adapter(model, frozen["tensors"], frozen["alpha"], frozen["name"], frozen["source"],
                             frozen["sha256"], report, active=frozen["active"])

    params = model.trainable_parameters()
    vision = {n: p for n, p in model.named_parameters() if n.startswith("visual_encoder.")}
    if report.format in ("project", "peft"):  # a trained ViT loads into any model of the same sizes
        params.update(vision)
    optional = set(vision)
    file_lora, rest = split_lora_tensors(state)
    model_lora, _ = split_lora_tensors(params)
    report.lora_targets_in_file = sorted({m.rsplit(".", 1)[-1] for m in file_lora})
    fits = set(file_lora) == set(model_lora) and all(
        file_lora[m].get(ab) is not None and file_lora[m][ab].shape == model_lora[m][ab].shape
        for m in model_lora
        for ab in ("A", "B")
    )
    to_load = dict(rest)
    if file_lora and not fits:
        trainable = next(e for e in model.adapter_stack() if e["trainable"])
        log.warning(
            "%s: LoRA in the file (targets %s, %d modules) does not fit the trainable adapter (%s, r=%d): "
            "stacked as a frozen adapter (alpha=%s); the base weights stay unchanged",
            path, report.lora_targets_in_file, len(file_lora), trainable["targets"], trainable["r"], alpha,
        )
        lora_state = {n: v for n, v in state.items() if LORA_KEY_RE.match(n)}
        stack_frozen_adapter(model, lora_state, alpha, _adapter_name(path), str(path),
                             file_sha256(contents.weights_file), report)
        expected = [n for n in params if not LORA_KEY_RE.match(n)]
    else:
        to_load.update({n: v for n, v in state.items() if LORA_KEY_RE.match(n)})
        expected = list(params)

    report.missing = sorted(n for n in expected if n not in to_load and n not in optional)
    expected = [n for n in expected if n in to_load or n not in optional]
    if report.missing:
        raise ValueError(
            f"{path}: {len(report.missing)} trainable tensors missing from the checkpoint, e.g. {report.missing[:6]}"
        )
    wrong = [f"{n}: {tuple(to_load[n].shape)} != {tuple(params[n].shape)}" for n in expected if to_load[n].shape != params[n].shape]
    if wrong:
        raise ValueError(f"{path}: shape mismatch (is the config the checkpoint's?): {wrong[:5]}")
    with torch.no_grad():
        for name in expected:
            params[name].copy_(to_load[name].to(params[name].dtype))
    report.loaded = sorted(expected)
    report.unexpected += sorted(n for n in to_load if n not in params)
    log.info(report.summary())
    return report
