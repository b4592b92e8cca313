"""The clinical cascade's three stages served on one base (issue 13, item 1).

EVA and LLaMA are loaded once. Each stage's own tensors sit beside them:

* its LoRA factors as a **named peft adapter** (``pancreas_detection``, ``tumor_classification``,
  ``tumor_detection``) on the shared LLaMA;
* its own ``llama_proj`` (a separate ``nn.Linear`` per stage);
* its own ViT only when its checkpoint carries one (tiny models trained with
  ``model.vision.trainable``; the paper's frozen EVA is shared).

:meth:`StageModels.use` switches the active adapter, projection (and ViT) and returns the one
:class:`~minigpt4.models.minigpt_v2.MiniGPTPancreas`, which then answers exactly as the stage's
checkpoint loaded alone (``tests/test_cascade.py`` checks equal logits and answers on tiny
models). Memory: one base + ≈ 230 MB per stage at full size (LoRA r 64 on q,k: 134 MB fp32;
``llama_proj``: 92 MB fp32).

Built on the model's adapter stack (``add_lora_adapter`` / ``set_active_adapters`` /
``adapter_stack``): every checkpoint is read with the checked loader
:func:`minigpt4.models.checkpoints.load_weights` (into the trainable adapter, then copied into the
stage's named frozen adapter). Frozen adapters a checkpoint stacks (MiniGPT-v2's stage-3 q,v
LoRA, carried by every stage trained from it) are stacked once and shared by the stages that
carry the same tensors; each stage runs with its own adapter plus the frozen ones its checkpoint
activates. Example::

    stages = load_stages(cfg.model, cfg.cascade.stages.configured(), device="cpu")
    model = stages.use("pancreas_detection")
    model.generate(images, ["[refer] Give me the location of the pancreas"])
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from minigpt4.config import CASCADE_STAGES, ConfigError, ModelConfig
from minigpt4.models.minigpt_v2 import MiniGPTPancreas, build_model
from minigpt4.models.checkpoints import load_weights, read_checkpoint
from minigpt4.models.checkpoints import checkpoint_tasks

log = logging.getLogger(__name__)


def missing_stages(checkpoints: Mapping[str, object]) -> list[str]:
    """The cascade stages (in cascade order) that ``{stage: checkpoint}`` leaves unset."""
    return [stage for stage in CASCADE_STAGES if checkpoints.get(stage) is None]


def require_all_stages(checkpoints: Mapping[str, str], where: str) -> dict[str, str]:
    """The rule of the three-stage commands (``scan.py``, ``eval_cascade.py``): all three stages
    configured, and each checkpoint present. Returns ``{stage: checkpoint}`` in cascade order.

    Raises:
        ConfigError: a stage is not set (``where`` names the config file).
        FileNotFoundError: a configured checkpoint does not exist.
    """
    missing = missing_stages(checkpoints)
    if missing:
        raise ConfigError(f"{where}: cascade.stages.{missing[0]} is not set (all three stages are needed)")
    for stage in CASCADE_STAGES:
        if not Path(checkpoints[stage]).exists():
            raise FileNotFoundError(f"cascade.stages.{stage}: checkpoint not found: {checkpoints[stage]}")
    return {stage: checkpoints[stage] for stage in CASCADE_STAGES}


class StageModels:
    """One :class:`MiniGPTPancreas` base with the tensors of several stages; switch with :meth:`use`.

    Args:
        model: the shared model (LoRA attached, base weights loaded).
        sources: ``{stage: checkpoint path}`` (for messages and the demo).
    """

    def __init__(self, model: MiniGPTPancreas, sources: Mapping[str, str]) -> None:
        self.model = model
        self.sources = dict(sources)
        self._proj: dict[str, nn.Linear] = {}
        self._vit: dict[str, nn.Module] = {}
        self._frozen: dict[str, list[str]] = {}
        # the modules checkpoints are loaded into; each stage keeps copies
        self._load_proj = model.llama_proj
        self._load_vit = model.visual_encoder
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._proj)

    @property
    def shares_tower(self) -> bool:
        """True when every stage runs the same ViT (+ ``ln_vision``, never trained): then a slice's
        tower tokens are the same for every stage and the pipeline encodes each slice once.
        False when the stages carry their own ViT (checkpoints trained with ``model.vision.trainable``)."""
        return not self._vit

    def add_stage(self, name: str, path: str) -> None:
        """Load ``path`` (checked, :func:`load_weights`) and keep its tensors as stage ``name``.

        The stage's LoRA becomes the frozen named adapter ``name``; frozen adapters its checkpoint
        stacks (e.g. MiniGPT-v2 stage 3) are shared with the stages that carry the same tensors.
        """
        model = self.model
        if name in self._proj:
            raise ValueError(f"stage {name!r} is already loaded")
        self._activate_loading_slot()
        contents = read_checkpoint(path)
        vit_before = {n: p.detach().clone() for n, p in model.visual_encoder.named_parameters()}
        report = load_weights(model, path)
        # the frozen adapters this stage runs with, as a lone model loading the file would
        frozen, matched = [], set()
        for entry in contents.frozen:
            adapter = self._find_adapter(entry["tensors"], entry["alpha"])
            matched.add(adapter)
            if entry["active"]:
                frozen.append(adapter)
        # a file LoRA that does not fit the configured adapter is stacked (active) by load_weights
        frozen += [a for a in dict.fromkeys(report.stacked_adapters + report.reused_adapters) if a not in matched]
        order = [entry["name"] for entry in model.adapter_stack()]
        self._frozen[name] = sorted(set(frozen), key=order.index)
        # the stage's own LoRA: a copy of what load_weights put into the trainable adapter
        trainable = next(entry for entry in model.adapter_stack() if entry["trainable"])
        tensors = {k: v.clone() for k, v in model.adapter_tensors(trainable["name"]).items()}
        model.add_lora_adapter(name, tensors, alpha=trainable["alpha"], r=trainable["r"], trainable=False,
                               source=str(path), active=False)
        self._proj[name] = copy.deepcopy(model.llama_proj).requires_grad_(False)
        if any(n.startswith("visual_encoder.") for n in report.loaded):
            self._vit[name] = copy.deepcopy(model.visual_encoder).requires_grad_(False)
        elif self._vit:
            raise ValueError(f"{path}: stage {name!r} has no ViT tensors but the stages before carry their own ViT")
        else:  # a shared frozen ViT must not have been changed by the load
            changed = [n for n, p in model.visual_encoder.named_parameters() if not torch.equal(p, vit_before[n])]
            if changed:
                raise ValueError(f"{path}: loading stage {name!r} changed the shared ViT ({changed[:3]})")
        self.sources[name] = str(path)
        self.active = None

    def _find_adapter(self, tensors: Mapping[str, torch.Tensor], alpha: float) -> str:
        """The name of the model's adapter holding exactly ``tensors`` with ``alpha``."""
        for entry in self.model.adapter_stack():
            present = self.model.adapter_tensors(entry["name"])
            if entry["alpha"] == float(alpha) and set(present) == set(tensors) and all(
                torch.equal(present[k], tensors[k].to(present[k].device, present[k].dtype)) for k in tensors
            ):
                return entry["name"]
        raise ValueError("a frozen adapter of the checkpoint was not stacked on the model")

    def _activate_loading_slot(self) -> None:
        """Point the model at its trainable adapter alone and the loading modules, trainable as
        :func:`load_weights` expects them (it loads into the tensors that require grad)."""
        model = self.model
        trainable = next(entry["name"] for entry in model.adapter_stack() if entry["trainable"])
        model.set_active_adapters([trainable])
        model.llama_proj = self._load_proj
        model.visual_encoder = self._load_vit
        model.llama_proj.requires_grad_(True)
        model.visual_encoder.requires_grad_(model.cfg.vision.trainable)
        self.active = None

    def use(self, name: str) -> MiniGPTPancreas:
        """Activate stage ``name`` and return the model (eval mode)."""
        if name not in self._proj:
            raise KeyError(f"stage {name!r} is not loaded; loaded: {', '.join(self._proj) or 'none'}")
        if self.active != name:
            model = self.model
            # the stage's adapter first, then its frozen ones: a lone model sums them in that order
            model.set_active_adapters([name] + self._frozen[name])
            model.llama_proj = self._proj[name]
            if name in self._vit:
                model.visual_encoder = self._vit[name]
            model.train(False)
            self.active = name
        return self.model


class StageTaskError(ValueError):
    """A checkpoint given for a cascade stage was trained for another task."""


def check_stage_tasks(checkpoints: Mapping[str, str]) -> list[str]:
    """Each stage's checkpoint must record its stage's task (read from the header only, no model).

    A checkpoint records the tasks it was trained for (:func:`minigpt4.models.checkpoints.checkpoint_tasks`);
    one recording none (a foreign checkpoint, an older own one) gets a warning, not a refusal.

    Returns:
        The warning lines (also logged).
    Raises:
        StageTaskError: naming every stage whose checkpoint was trained for another task, with both tasks.
        FileNotFoundError: a checkpoint is missing.
    """
    wrong, warnings = [], []
    for stage, path in checkpoints.items():
        tasks = checkpoint_tasks(path)
        if tasks is None:
            warnings.append(f"cascade.stages.{stage}: {path} records no task (a foreign or older checkpoint): "
                            f"cannot check that it is a {stage} model")
        elif stage not in tasks:
            wrong.append(f"cascade.stages.{stage}: {path} was trained for {' + '.join(tasks)}, not {stage}")
    for line in warnings:
        log.warning("%s", line)
    if wrong:
        raise StageTaskError("checkpoint of the wrong task for its cascade stage: " + "; ".join(wrong))
    return warnings


def load_stages(cfg: ModelConfig, checkpoints: Mapping[str, str], device: Union[str, torch.device] = "cpu",
                check_tasks: bool = True) -> StageModels:
    """Build the base described by ``cfg`` (ignoring ``cfg.ckpt``/``init_from``) and add each stage.

    First, before any model is built, each checkpoint's recorded task must be its stage's
    (:func:`check_stage_tasks`; ``check_tasks=False`` when the caller has just checked).

    Args:
        cfg: ``config.model`` (sizes, ``vision.weights``, ``text.path``, LoRA shape of the stages).
        checkpoints: ``{stage: checkpoint}``; stages are the names of
            :data:`minigpt4.config.CASCADE_STAGES`.
        device: where the model lives.

    Raises:
        ValueError: unknown stage name, no stage, or stages that cannot share one base.
        StageTaskError: a checkpoint trained for another task than its stage.
        FileNotFoundError: a checkpoint is missing.
    """
    import dataclasses

    unknown = sorted(set(checkpoints) - set(CASCADE_STAGES))
    if unknown:
        raise ValueError(f"unknown cascade stage(s) {unknown}; expected {list(CASCADE_STAGES)}")
    if not checkpoints:
        raise ValueError("no stage checkpoint configured (cascade.stages)")
    if check_tasks:
        check_stage_tasks(checkpoints)
    base_cfg = dataclasses.replace(cfg, ckpt=None, init_from=None)
    model = build_model(base_cfg, device=device)
    model.eval()
    stages = StageModels(model, {})
    for name, path in checkpoints.items():
        stages.add_stage(name, path)
        log.info("stage %s: %s", name, path)
    return stages
