"""LoRA tensor names (peft 0.2 layout, as the MiniGPT-v2 and MiniGPT-Pancreas releases store
them): the naming helpers shared by the adapters, the model and the checkpoint reader/writer, in
a module of their own so that ``adapters → checkpoints → minigpt_v2`` is no circle (issue 24).
"""

from __future__ import annotations

import re

import torch

PEFT_ADAPTER = "default"
"""peft's name of the trainable adapter."""


def stable_name(name: str, adapter: str = PEFT_ADAPTER) -> str:
    """A parameter name without peft's adapter segment (``lora_A.default.weight`` → ``lora_A.weight``).

    This is also the naming of peft 0.2, used by the MiniGPT-v2 and MiniGPT-Pancreas releases.
    Only the segment after ``lora_A``/``lora_B`` is removed, whatever the adapter is called.
    """
    return re.sub(rf"\.(lora_[AB])\.{re.escape(adapter)}\.", r".\1.", name)


LORA_KEY_PREFIX = "llama_model.base_model.model."
"""Prefix of LoRA tensor names in the peft-0.2 layout (``<prefix><module>.lora_{A,B}.weight``)."""


LORA_KEY_RE = re.compile(r"^llama_model\.base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def split_lora_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({module path: {"A": A, "B": B}}, other tensors)`` from peft-0.2 names.

    ``llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` goes to
    ``lora["model.layers.0.self_attn.q_proj"]["A"]``; A is (r, in), B is (out, r).
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for name, value in state.items():
        match = LORA_KEY_RE.match(name)
        if match:
            lora.setdefault(match["module"], {})[match["ab"]] = value
        else:
            rest[name] = value
    return lora, rest
