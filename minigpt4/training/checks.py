"""Checks run before a training run builds anything heavy (SPEC §5), used by :func:`minigpt4.training.train`.

Bad input fails in seconds, not after loading 7 B parameters: the prompt wording
(:func:`check_prompt_wording`), a half-precision mismatch between ``model.dtype`` and ``run.amp``
(:func:`precision_mismatch`, a warning), every weight file the config names
(:func:`check_weight_files`) and, when resuming, that the run's saved config
trains the same thing (:func:`check_resume_config`). Every dataset's records and images are
checked by :func:`minigpt4.data.datasets.load_split_records`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from minigpt4.config import Config, ConfigError
from minigpt4.utils import dtype_name
from minigpt4.models.checkpoints import STAGE3_SOURCE
from minigpt4.models.eva_vit import EVA_SOURCE
from minigpt4.models.llama import LLAMA_SOURCE

__all__ = [
    "check_prompt_wording",
    "precision_mismatch",
    "check_weight_files",
    "resume_config_differences",
    "check_resume_config",
    "RESUME_COMPARED_RUN_KEYS",
    "RESUME_IGNORED_MODEL_KEYS",
]


def check_prompt_wording(cfg: Config) -> None:
    """Training uses MiniGPT-v2's training stream: ``model.prompts.wording: release`` (the release's
    inference stream and evaluation wording) is for the zero-shot baseline only."""
    if cfg.model.prompts.wording != "paper":
        raise ConfigError(
            f"model.prompts.wording={cfg.model.prompts.wording} is the release's inference stream for the zero-shot "
            "MiniGPT-v2 baseline; training uses MiniGPT-v2's training stream (model.prompts.wording=paper)"
        )


def precision_mismatch(weights: torch.dtype, autocast: Optional[torch.dtype]) -> Optional[str]:
    """Why frozen ``weights`` of one half precision under ``autocast`` to the other are a problem
    (``model.dtype`` vs ``run.amp``), None when they agree (fp32 weights or no autocast included)."""
    halves = (torch.float16, torch.bfloat16)
    if weights not in halves or autocast not in halves or weights == autocast:
        return None
    return (f"model.dtype gives {dtype_name(weights)} weights but run.amp autocasts to {dtype_name(autocast)}: "
            "every matmul re-rounds the frozen weights to the other half precision (fp16 → bf16 loses 3 mantissa "
            "bits; bf16 → fp16 can overflow past 65504); set both to the same precision (or both to auto)")


def check_weight_files(cfg: Config) -> None:
    """Every weight file the config names must exist before anything is built.

    Raises:
        FileNotFoundError: naming the config key and the path.
    """
    model = cfg.model
    named = {
        "model.vision.weights": model.vision.weights,
        "model.text.path": model.text.path,
        "model.text.tokenizer": model.text.tokenizer,
        "model.init_from": model.init_from,
        "model.ckpt": model.ckpt,
    }
    for key, value in named.items():
        if value and not Path(value).exists():
            hint = ""
            if key == "model.init_from" and "checkpoint_best" in str(value):
                hint = " (a cascade stage starts from the previous stage's checkpoint_best: train that stage first)"
            elif key != "model.init_from" or "stage3" in Path(value).name:
                hint = _weights_source(key)
            raise FileNotFoundError(f"{key}={value}: file or folder not found{hint}")


def _weights_source(key: str) -> str:
    """``"; get <where the README says>"`` for a config key naming downloadable weights, else ``""``."""
    sources = {"model.vision.weights": EVA_SOURCE, "model.text.path": LLAMA_SOURCE,
               "model.text.tokenizer": f"tokenizer.model from {LLAMA_SOURCE}", "model.init_from": STAGE3_SOURCE}
    return f"; get {sources[key]} (README, 'Weights')" if key in sources else ""


RESUME_COMPARED_RUN_KEYS = (
    "seed", "max_epoch", "iters_per_epoch", "batch_size", "grad_accum_steps", "init_lr", "min_lr",
    "warmup_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "amp",
)
"""``run`` keys that change the trained weights (data order, optimisation, schedule: max_epoch
sets the cosine length). The other run keys may differ on resume: where and when to stop
(max_steps, resume), where and how to log or validate (output_dir, log_interval, validate,
val_max_samples, eval_*), and speed/memory options (device, num_workers, cache_images, ...)."""
RESUME_IGNORED_MODEL_KEYS = ("model.ckpt", "model.gradient_checkpointing", "model.checkpoint_every")
"""``model`` keys that do not change training: the weights to *evaluate*, and recomputation
for memory (the same numbers). Every other model and datasets key must match."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def resume_config_differences(cfg: Config, saved: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, this config's value)}`` for the result-changing keys that differ.

    Compared: every ``model`` key except :data:`RESUME_IGNORED_MODEL_KEYS`, every ``datasets``
    key (a dataset added or removed counts), and :data:`RESUME_COMPARED_RUN_KEYS`. A model or run
    key missing from the saved file (written by an older version) is not compared.
    """
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(now, dict)
    before, current = _flatten(saved), _flatten(now)
    keys = {k for k in current if k.startswith("model.")} | {f"run.{k}" for k in RESUME_COMPARED_RUN_KEYS}
    keys = {k for k in keys if k in before} - set(RESUME_IGNORED_MODEL_KEYS)
    keys |= {k for k in set(before) | set(current) if k.startswith("datasets")}
    missing = object()
    return {k: (before.get(k, "(absent)"), current.get(k, "(absent)")) for k in sorted(keys)
            if before.get(k, missing) != current.get(k, missing)}


def check_resume_config(cfg: Config, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with a config that would train something else.

    The checkpoint's ``config.yaml`` (the resolved config of the run that wrote it) is compared
    with ``cfg`` by :func:`resume_config_differences`.

    Raises:
        ValueError: naming the saved config file and every differing key, with both values.
    """
    from omegaconf import OmegaConf

    saved_path = checkpoint / "config.yaml"
    if not saved_path.is_file():  # a checkpoint of an older version: nothing to compare
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    except Exception as err:  # omegaconf/yaml raise many types
        raise ValueError(f"{saved_path}: unreadable config of the run to resume ({err})") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise ValueError(f"{saved_path}: not a training config (no 'model' section)")
    diff = resume_config_differences(cfg, saved)
    if diff:
        shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in list(diff.items())[:10])
        more = f" (and {len(diff) - 10} more)" if len(diff) > 10 else ""
        raise ValueError(
            f"run.resume={cfg.run.resume}: {checkpoint} belongs to a run of another config ({saved_path}); "
            f"differing keys: {shown}{more}. Use another run.output_dir for the new run, set these keys "
            f"back to continue the old one, or run.resume=null to start over in this folder"
        )
