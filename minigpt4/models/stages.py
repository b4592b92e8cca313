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

Every checkpoint is read with the checked loader :func:`minigpt4.models.checkpoints.load_weights`
(into the model's ``default`` adapter, then copied into the stage's named adapter). Foreign LoRA
deltas merged into the base (MiniGPT-v2 stage 3, carried by every stage trained from it) must be
the same for all stages, since they share one base: a stage that would change the base is an
error naming it.

Only public peft calls are used (``add_adapter``, ``set_adapter``). Example::

    stages = load_stages(cfg.model, cfg.cascade.stages.configured(), device="cpu")
    model = stages.use("pancreas_detection")
    model.generate(images, ["[refer] Give me the location of the pancreas"])
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Mapping, Union

import torch
from peft import LoraConfig as PeftLoraConfig
from torch import nn

from minigpt4.config import CASCADE_STAGES, ModelConfig
from minigpt4.models.minigpt_v2 import _PEFT_ADAPTER, MiniGPTPancreas, build_model

log = logging.getLogger(__name__)


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
        # the modules checkpoints are loaded into; each stage keeps copies
        self._load_proj = model.llama_proj
        self._load_vit = model.visual_encoder
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._proj)

    def add_stage(self, name: str, path: str) -> None:
        """Load ``path`` (checked) and keep its tensors as stage ``name``."""
        from minigpt4.models.checkpoints import load_weights

        model = self.model
        if name in self._proj:
            raise ValueError(f"stage {name!r} is already loaded")
        self._activate_loading_slot()
        known = {entry["id"] for entry in model.merged_lora}
        vit_before = {n: p.detach().clone() for n, p in model.visual_encoder.named_parameters()}
        report = load_weights(model, path)
        added = [entry["source"] for entry in model.merged_lora if entry["id"] not in known]
        if added and self._proj:
            raise ValueError(
                f"{path}: stage {name!r} merges LoRA deltas into the base ({added}) that the stages loaded "
                f"before ({', '.join(self._proj)}) do not have; stages served on one base must share it"
            )
        # the stage's LoRA: a named adapter holding a copy of what load_weights put in 'default'
        lora = model.cfg.lora
        adapter = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model.llama_model.add_adapter(name, adapter)
        params = dict(model.llama_model.named_parameters())
        with torch.no_grad():
            for pname, value in list(params.items()):
                if f".{_PEFT_ADAPTER}." in pname:
                    target = params[pname.replace(f".{_PEFT_ADAPTER}.", f".{name}.")]
                    target.data = value.detach().clone()  # fp32 like the trained factors
                    target.requires_grad_(False)
        self._proj[name] = copy.deepcopy(model.llama_proj).requires_grad_(False)
        loaded_vit = any(n.startswith("visual_encoder.") for n in report.loaded)
        if loaded_vit:
            self._vit[name] = copy.deepcopy(model.visual_encoder).requires_grad_(False)
        elif self._vit:
            raise ValueError(f"{path}: stage {name!r} has no ViT tensors but the stages before carry their own ViT")
        else:  # a shared frozen ViT must not have been changed by the load
            changed = [n for n, p in model.visual_encoder.named_parameters() if not torch.equal(p, vit_before[n])]
            if changed:
                raise ValueError(f"{path}: loading stage {name!r} changed the shared ViT ({changed[:3]})")
        self.sources[name] = str(path)
        self.active = None

    def _activate_loading_slot(self) -> None:
        """Point the model at the ``default`` adapter and the loading modules, trainable as
        :func:`load_weights` expects them (it loads into the tensors that require grad)."""
        model = self.model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.llama_model.set_adapter(_PEFT_ADAPTER)
        model.llama_proj = self._load_proj
        model.visual_encoder = self._load_vit
        for pname, param in model.named_parameters():
            param.requires_grad_(
                (".lora_" in pname and f".{_PEFT_ADAPTER}." in pname)
                or pname.startswith("llama_proj.")
                or (model.cfg.vision.trainable and pname.startswith("visual_encoder."))
            )
        self.active = None

    def use(self, name: str) -> MiniGPTPancreas:
        """Activate stage ``name`` and return the model (eval mode, no trainable tensors)."""
        if name not in self._proj:
            raise KeyError(f"stage {name!r} is not loaded; loaded: {', '.join(self._proj) or 'none'}")
        if self.active != name:
            model = self.model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.llama_model.set_adapter(name)
            model.llama_proj = self._proj[name]
            if name in self._vit:
                model.visual_encoder = self._vit[name]
            model.requires_grad_(False)  # serving only; set_adapter marks the adapter trainable
            model.train(False)  # add_adapter creates its LoRA dropout modules in training mode
            self.active = name
        return self.model


def load_stages(cfg: ModelConfig, checkpoints: Mapping[str, str], device: Union[str, torch.device] = "cpu") -> StageModels:
    """Build the base described by ``cfg`` (ignoring ``cfg.ckpt``/``init_from``) and add each stage.

    Args:
        cfg: ``config.model`` (sizes, ``vision.weights``, ``text.path``, LoRA shape of the stages).
        checkpoints: ``{stage: checkpoint}``; stages are the names of
            :data:`minigpt4.config.CASCADE_STAGES`.
        device: where the model lives.

    Raises:
        ValueError: unknown stage name, no stage, or stages that cannot share one base.
        FileNotFoundError: a checkpoint is missing.
    """
    import dataclasses

    unknown = sorted(set(checkpoints) - set(CASCADE_STAGES))
    if unknown:
        raise ValueError(f"unknown cascade stage(s) {unknown}; expected {list(CASCADE_STAGES)}")
    if not checkpoints:
        raise ValueError("no stage checkpoint configured (cascade.stages)")
    base_cfg = dataclasses.replace(cfg, ckpt=None, init_from=None)
    model = build_model(base_cfg, device=device)
    model.eval()
    stages = StageModels(model, {})
    for name, path in checkpoints.items():
        stages.add_stage(name, path)
        log.info("stage %s: %s", name, path)
    return stages
