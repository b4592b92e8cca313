"""Checked weight loading and saving (SPEC §2 "Loading pretrained weights").

Formats :func:`load_weights` accepts:

* the project's own checkpoint: a folder holding ``model.safetensors`` (+ ``config.yaml``) or
  the ``.safetensors`` file itself (written by :func:`save_checkpoint`);
* the MiniGPT-v2 stage-3 checkpoint and the MiniGPT-Pancreas release checkpoints: torch pickles
  with a ``"model"`` dict of ``llama_proj.{weight,bias}`` and LoRA factors named with peft-0.2
  names (``llama_model.base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight``,
  no ``.default.`` segment), read with ``torch.load(..., weights_only=True)``.

Every trainable tensor the model expects must be found (else ``ValueError`` naming the missing
keys); unexpected keys are reported, never silently dropped. ViT tensors (``visual_encoder.*``,
present only in checkpoints of runs with ``model.vision.trainable``) are optional: they are loaded
when the file has them — from a project checkpoint even into a frozen ViT, since the checkpoint
defines the model — and otherwise the ViT keeps ``vision.weights`` / its initialisation. When the file's LoRA adapters do
not fit the configured ones (other target modules or rank: stage-3 has q,v; the paper trains
q,k), the file's deltas ``W += B·A·α/r`` are merged into the frozen base weights and the fresh
adapters stay at their initialisation (B = 0), so the model computes exactly what the file's
model computed. Merged deltas are remembered on the model and written into the project's own
checkpoints, so a checkpoint of a later stage reproduces its base without the stage-3 file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt4.io import atomic_path, write_text_atomic
from minigpt4.models.minigpt_v2 import MiniGPTPancreas, stable_name

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
FORMAT = "minigpt-pancreas/1"
MINIGPT_V2_LORA_ALPHA = 16
"""α of the MiniGPT-v2 stage-3 and MiniGPT-Pancreas release adapters (r = 64 is read from the shapes)."""
STAGE3_SOURCE = (
    "checkpoint_stage3.pth: the MiniGPT-v2 stage-3 checkpoint linked from the MiniGPT-4 repository "
    "(https://github.com/Vision-CAIR/MiniGPT-4, 'MiniGPT-v2 (after stage-3)', ~100 MB)"
)

_LORA_RE = re.compile(r"^llama_model\.base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MERGED_RE = re.compile(r"^merged_lora\.(?P<index>\d+)\.(?P<name>.+)$")


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    path: str
    format: str  # "project" | "torch_pickle"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    merged_modules: list[str] = field(default_factory=list)
    """LLaMA modules whose base weight received a LoRA delta from this file."""
    skipped_merges: int = 0
    """Merged-delta sets already present in the model (loaded earlier), not applied twice."""
    lora_targets_in_file: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.path}: {len(self.loaded)} tensors loaded"]
        if self.merged_modules:
            parts.append(f"LoRA deltas of {len(self.merged_modules)} modules merged into the base weights")
        if self.skipped_merges:
            parts.append(f"{self.skipped_merges} merged delta sets already applied")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys ignored: {self.unexpected[:5]}")
        return "; ".join(parts)


# ---------------------------------------------------------------------- saving
def save_checkpoint(model: MiniGPTPancreas, folder: Union[str, os.PathLike], config: Any = None) -> Path:
    """Write ``folder/model.safetensors`` (trainable tensors + merged base deltas) and ``folder/config.yaml``.

    Each file is written to a temporary name and renamed into place; the tensors come last, so
    a folder with ``model.safetensors`` is complete.

    Args:
        model: the model.
        folder: checkpoint folder (created).
        config: the :class:`~minigpt4.config.Config` (or ``ModelConfig``/dict) to store beside;
            default ``model.cfg``.
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
    merged_meta = []
    for index, entry in enumerate(model.merged_lora):
        merged_meta.append({"id": entry["id"], "source": entry["source"], "alpha": entry["alpha"]})
        for name, t in entry["tensors"].items():
            tensors[f"merged_lora.{index}.{name}"] = t.contiguous()
    metadata = {
        "format": FORMAT,
        "lora_alpha": str(model.cfg.lora.alpha),
        "lora_targets": json.dumps(list(model.cfg.lora.target_modules)),
        "merged_lora": json.dumps(merged_meta),
    }
    path = folder / WEIGHTS_NAME
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ---------------------------------------------------------------------- loading
def _read_project(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); only tensors and plain containers are accepted"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (or {{'model': dict of tensors}})")
    return obj


def _normalise(name: str) -> str:
    # DDP prefix and today's peft adapter segment → the stable (peft 0.2) naming
    if name.startswith("module."):
        name = name[len("module.") :]
    return stable_name(name)


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _split_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """{module path: {"A": A, "B": B}} of LoRA factors, and the remaining tensors."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for name, value in state.items():
        match = _LORA_RE.match(name)
        if match:
            lora.setdefault(match["module"], {})[match["ab"]] = value
        else:
            rest[name] = value
    return lora, rest


def merge_lora_into_base(
    model: MiniGPTPancreas, lora: dict[str, dict[str, torch.Tensor]], alpha: float, source: str
) -> list[str]:
    """Add ``B·A·α/r`` of each module into the frozen LLaMA base weight; return the module paths.

    Applied at most once per delta set (identified by a hash of its tensors), and recorded in
    ``model.merged_lora`` so that :func:`save_checkpoint` can store it.
    """
    tensors = {}
    for module, pair in lora.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: LoRA of {module} has only lora_{''.join(pair)}")
        for ab, value in pair.items():
            tensors[f"llama_model.base_model.model.{module}.lora_{ab}.weight"] = value.detach().to("cpu", torch.float32)
    alpha = float(alpha)
    ident = _fingerprint(tensors) + f"-a{alpha:g}"
    if any(entry["id"] == ident for entry in model.merged_lora):
        return []
    llama = model.llama
    with torch.no_grad():
        for module_path, pair in sorted(lora.items()):
            try:
                module = llama.get_submodule(module_path)
            except AttributeError:
                raise ValueError(f"{source}: LoRA module {module_path} does not exist in this LLaMA") from None
            base = getattr(module, "base_layer", module)  # a peft LoRA layer wraps the Linear
            A, B = pair["A"].to(torch.float32), pair["B"].to(torch.float32)
            rank = A.shape[0]
            if B.shape[1] != rank or base.weight.shape != (B.shape[0], A.shape[1]):
                raise ValueError(
                    f"{source}: LoRA of {module_path} has A {tuple(A.shape)}, B {tuple(B.shape)} which do not "
                    f"fit the weight {tuple(base.weight.shape)}"
                )
            if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"{source}: cannot merge LoRA into a quantized weight ({module_path})")
            delta = (B.to(base.weight.device) @ A.to(base.weight.device)) * (alpha / rank)
            base.weight.add_(delta.to(base.weight.dtype))
    model.merged_lora.append({"id": ident, "source": source, "alpha": alpha, "tensors": tensors})
    return sorted(lora)


def load_weights(model: MiniGPTPancreas, path: Union[str, os.PathLike], lora_alpha: Optional[float] = None) -> LoadReport:
    """Load a checkpoint into ``model``, checked (see the module docstring for the formats).

    Args:
        model: the model (LoRA already attached).
        path: project folder / ``.safetensors`` / MiniGPT-v2 or release ``.pth``.
        lora_alpha: α of the file's LoRA (only used when its deltas are merged); default: the
            value stored in a project checkpoint, else :data:`MINIGPT_V2_LORA_ALPHA`.
    Returns:
        A :class:`LoadReport` (also logged).
    Raises:
        FileNotFoundError: no such file/folder (the message says where stage-3 comes from).
        ValueError: unreadable file, missing trainable keys (named), shape mismatches.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        hint = f"; get {STAGE3_SOURCE}" if "stage3" in path.name else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")

    if path.suffix == ".safetensors":
        raw, metadata = _read_project(path)
        report = LoadReport(str(path), "project")
        try:  # metadata is free text in the file header: a bad value names the file and the field
            alpha = lora_alpha if lora_alpha is not None else float(metadata.get("lora_alpha", MINIGPT_V2_LORA_ALPHA))
            # deltas merged into the base by earlier stages come first
            sets = json.loads(metadata.get("merged_lora", "[]"))
            if not isinstance(sets, list) or not all(isinstance(s, dict) for s in sets):
                raise ValueError("merged_lora is not a list of objects")
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: bad checkpoint metadata ({err}); re-save the checkpoint with this project") from None
        merged_sets: dict[int, dict[str, torch.Tensor]] = {}
        state = {}
        for name, value in raw.items():
            match = _MERGED_RE.match(name)
            if match:
                merged_sets.setdefault(int(match["index"]), {})[match["name"]] = value
            else:
                state[_normalise(name)] = value
        for index in sorted(merged_sets):
            meta = sets[index] if index < len(sets) else {}
            lora, rest = _split_lora(merged_sets[index])
            report.unexpected += [f"merged_lora.{index}.{k}" for k in rest]
            done = merge_lora_into_base(model, lora, float(meta.get("alpha", MINIGPT_V2_LORA_ALPHA)), meta.get("source", str(path)))
            if done:
                report.merged_modules += done
            else:
                report.skipped_merges += 1
    else:
        state = {_normalise(k): v for k, v in _read_pickle(path).items()}
        report = LoadReport(str(path), "torch_pickle")
        alpha = lora_alpha if lora_alpha is not None else MINIGPT_V2_LORA_ALPHA

    params = {stable_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    vision = {n: p for n, p in model.named_parameters() if n.startswith("visual_encoder.")}
    if report.format == "project":  # a trained ViT loads into any model of the same sizes
        params.update(vision)
    optional = set(vision)
    file_lora, rest = _split_lora(state)
    model_lora, _ = _split_lora(params)
    report.lora_targets_in_file = sorted({m.rsplit(".", 1)[-1] for m in file_lora})
    fits = set(file_lora) == set(model_lora) and all(
        file_lora[m].get(ab) is not None and file_lora[m][ab].shape == model_lora[m][ab].shape
        for m in model_lora
        for ab in ("A", "B")
    )
    to_load = dict(rest)
    if file_lora and not fits:
        log.warning(
            "%s: LoRA in the file (targets %s, %d modules) does not fit the configured adapters (%s, r=%d): "
            "merging its deltas into the base weights (alpha=%s), fresh adapters attached",
            path, report.lora_targets_in_file, len(file_lora), list(model.cfg.lora.target_modules), model.cfg.lora.r, alpha,
        )
        done = merge_lora_into_base(model, file_lora, alpha, str(path))
        if done:
            report.merged_modules += done
        else:
            report.skipped_merges += 1
        expected = [n for n in params if not _LORA_RE.match(n)]
    else:
        to_load.update({n: v for n, v in state.items() if _LORA_RE.match(n)})
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
