"""Export a checkpoint as a standard PEFT LoRA adapter folder (interop with peft / transformers).

Usage::

    python -m minigpt4.export --ckpt output/stage3_tumor_detection/checkpoint_best --out export/stage3

``--ckpt`` takes every format ``model.ckpt`` takes (project folder / ``.safetensors``, MiniGPT-v2
stage-3 or release ``.pth``). ``--out`` receives:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the trained LoRA with peft's key names
  (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``), loadable with
  ``peft.PeftModel.from_pretrained(llama, DIR)`` on the LLaMA-2 base;
* ``llama_proj.safetensors``: the projection (``llama_proj.weight`` (4096, 5632), ``llama_proj.bias``);
  ``visual_encoder.safetensors`` too when the run trained the ViT (``model.vision.trainable``);
* ``<name>/adapter_config.json`` + ``<name>/adapter_model.safetensors`` for each frozen stacked
  adapter (e.g. MiniGPT-v2's stage-3 q,v LoRA under a q,k run), which must be active too;
* ``adapter_stack.json`` (the stack: names, targets, r, alpha, source, sha256) and ``README.md``;
* ``provenance.json`` when the checkpoint records its training provenance (the volumes it and its
  ancestors were trained and validated on; the leakage guard reads it from the exported folder too),
  bound to the exported weights by their sha256 (``weights_sha256``, checked when it is read:
  :mod:`minigpt4.provenance`); for a foreign checkpoint (a ``.pth``) the record
  says its provenance is unknown; an own checkpoint without provenance gets none (the guard then
  refuses the export as it refuses the checkpoint), and an earlier export's record is removed.
* ``manifest.json``: ``{"command": "export", "status": "complete", "files": {path: bytes}}``,
  written first as ``incomplete`` and last as complete: the loader refuses a partial export.

The folder goes back into this project as ``model.ckpt=DIR`` or ``model.init_from=DIR``. Every
file is written to a temporary name and renamed; ``--out`` follows :mod:`minigpt4.outputs` (only
an export's own folder is replaced; never git-tracked files; one export at a time). Limits: LoRA only (plain LoRA, one rank and
alpha per adapter); the EVA and LLaMA base weights are not copied.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf

from minigpt4.cli import add_debug_argument, run_main
from minigpt4.io import save_safetensors_atomic, to_json, write_json_atomic, write_text_atomic
from minigpt4.models.checkpoints import (
    CONFIG_NAME,
    ENVELOPE_KEY,
    ENVELOPE_NAME,
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_WEIGHTS_NAME,
    PROJECTION_NAME,
    PROVENANCE_KEY,
    PROVENANCE_NAME,
    STACK_NAME,
    VISION_NAME,
    read_checkpoint,
    read_metadata,
)
from minigpt4.models.lora_names import LORA_KEY_PREFIX, split_lora_tensors
from minigpt4.outputs import MANIFEST_NAME, OutputFolder
from minigpt4.prompts import TARGET_NAMES, TRAINING_PROMPT, detection_instruction, token_recipe
from minigpt4.provenance import PROVENANCE_SCHEMA, bind, check_binding, own_checkpoint_marks

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "meta-llama/Llama-2-7b-chat-hf"
EXPORT_IMAGE_TOKENS = 256
"""Visual tokens of the exported model (448² image, 14-px patches → 1024 tower tokens, merged by 4)."""
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(\w+)$")


def _target_modules(modules: Sequence[str], num_layers: Optional[int]) -> list[str]:
    """Short names (``q_proj``) when the adapter covers those modules in every layer (all
    ``num_layers``; unknown: layers 0..n-1), else the exact module paths (a short name would
    attach fresh adapters to the layers not covered)."""
    matches = [_LAYER_RE.match(m) for m in modules]
    if all(matches):
        layers = {int(m[1]) for m in matches}
        names = sorted({m[2] for m in matches})
        every = set(range(num_layers if num_layers is not None else len(layers)))
        if layers == every and len(modules) == len(layers) * len(names):
            return names
    return sorted(modules)


def _write_adapter(
    folder: Path, tensors: dict[str, torch.Tensor], alpha: float, dropout: float, base_model: str, num_layers: Optional[int]
) -> dict:
    """``adapter_config.json`` + ``adapter_model.safetensors`` of one LoRA (peft-0.2 names in ``tensors``).

    The config holds only fields every peft version since 0.5 knows (a full ``LoraConfig.to_dict()``
    of a newer peft carries keys an older one refuses).
    """
    lora, rest = split_lora_tensors(tensors)
    assert not rest, sorted(rest)
    ranks = {pair["A"].shape[0] for pair in lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"{folder}: the adapter has several ranks {sorted(ranks)}; PEFT needs one per adapter here")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": ranks.pop(), "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": _target_modules(list(lora), num_layers), "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True,
    }
    weights = {PEFT_KEY_PREFIX + name[len(LORA_KEY_PREFIX):]: t.contiguous() for name, t in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(folder / PEFT_WEIGHTS_NAME, weights, metadata={"format": "pt"})
    write_json_atomic(folder / PEFT_CONFIG_NAME, config, indent=2)
    return config


EXPORT_COMMAND = "export"
"""``command`` of an export folder's ``manifest.json`` (``files``: {relative path: size in bytes})."""


def check_lora_alpha(value: float) -> float:
    """``--lora-alpha``: a finite positive number (0 would zero the adapter, NaN poisons it)."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--lora-alpha must be a finite number > 0, got {value:g}")
    return value


def export_peft(
    ckpt: str | Path, out: str | Path, base_model: Optional[str] = None, lora_alpha: Optional[float] = None,
    overwrite: bool = False,
) -> Path:
    """Write the PEFT folder described in the module docstring; returns ``out``.

    The folder follows :mod:`minigpt4.outputs` (an earlier export's own files are replaced, a
    foreign folder is refused unless empty or ``overwrite``, never git-tracked files; locked while
    writing). Its ``manifest.json`` says ``incomplete`` while files are written and lists every
    file with its size at the end; the loader refuses a folder whose manifest does not match.

    Args:
        ckpt: any checkpoint ``model.ckpt`` accepts.
        out: output folder.
        base_model: ``base_model_name_or_path`` of the adapter config; default the checkpoint's
            ``model.text.path`` (its ``config.yaml``), else ``meta-llama/Llama-2-7b-chat-hf``.
        lora_alpha: alpha of a ``.pth`` file's LoRA (default 16, MiniGPT-v2's); a checkpoint that
            records its alpha refuses another value.
        overwrite: write into a non-empty folder another program wrote (its files are kept).
    Raises:
        FileNotFoundError, ValueError: unreadable checkpoint, or one without LoRA / ``llama_proj``,
            a refused output folder or ``lora_alpha``.
    """
    out = Path(out)
    if lora_alpha is not None:
        lora_alpha = check_lora_alpha(lora_alpha)
    legacy = lambda folder: (folder / STACK_NAME).is_file()  # noqa: E731 - an export written before manifests
    with OutputFolder(out, EXPORT_COMMAND, overwrite=overwrite, inputs=[ckpt], legacy=legacy,
                      owner="python -m minigpt4.export") as folder:
        contents = read_checkpoint(ckpt)
        if lora_alpha is not None and lora_alpha != contents.lora_alpha:
            if contents.format != "torch_pickle":
                raise ValueError(f"{contents.path}: the checkpoint records lora_alpha={contents.lora_alpha:g}; "
                                 f"--lora-alpha {lora_alpha:g} would change it (only a .pth file, which records "
                                 "none, takes --lora-alpha)")
            contents.lora_alpha = lora_alpha
        _export_into(folder, contents, base_model)
    return out


def _export_into(folder: OutputFolder, contents, base_model: Optional[str]) -> None:
    out = folder.path
    config_path = contents.path.parent / CONFIG_NAME if contents.format == "project" else None
    model_cfg = OmegaConf.load(config_path) if config_path is not None and config_path.is_file() else None
    if model_cfg is not None and "model" in model_cfg:
        model_cfg = model_cfg.model
    if base_model is None:
        base_model = OmegaConf.select(model_cfg, "text.path") if model_cfg is not None else None
        base_model = base_model or DEFAULT_BASE_MODEL
    dropout = float(OmegaConf.select(model_cfg, "lora.dropout", default=0.05)) if model_cfg is not None else 0.05
    num_layers = OmegaConf.select(model_cfg, "text.num_layers") if model_cfg is not None else None

    lora_tensors = {n: t for n, t in contents.state.items() if n.startswith(LORA_KEY_PREFIX) and ".lora_" in n}
    projection = {n: t.contiguous() for n, t in contents.state.items() if n.startswith("llama_proj.")}
    vision = {n: t.contiguous() for n, t in contents.state.items() if n.startswith("visual_encoder.")}
    other = sorted(set(contents.state) - set(lora_tensors) - set(projection) - set(vision))
    if not lora_tensors or set(projection) != {"llama_proj.weight", "llama_proj.bias"}:
        raise ValueError(f"{contents.path}: needs LoRA factors and llama_proj.{{weight,bias}} to export")
    if other:
        log.warning("%s: %d tensors not exported (neither LoRA, llama_proj nor the ViT): %s",
                    contents.path, len(other), other[:5])

    adapter_files = [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    provenance = _provenance_record(contents.path)
    planned = adapter_files + [PROJECTION_NAME, STACK_NAME, "README.md", MANIFEST_NAME] + ([VISION_NAME] if vision else [])
    planned += [f"{frozen['name']}/{name}" for frozen in contents.frozen for name in adapter_files]
    metadata = read_metadata(contents.path)[2] if contents.format == "project" else {}
    if ENVELOPE_KEY in metadata:  # the training envelope travels with the weights (scan's fitness checks)
        planned.append(ENVELOPE_NAME)
    planned += [PROVENANCE_NAME] if provenance is not None else []
    # an earlier export's provenance.json must never describe these weights: ours to replace or remove
    folder.check_no_foreign(planned + [f["name"] for f in contents.frozen] + [PROVENANCE_NAME])
    (out / PROVENANCE_NAME).unlink(missing_ok=True)
    earlier = dict((folder.manifest or {}).get("files") or {})
    # first: a folder with this manifest is not loadable until the final one replaces it
    folder.write_manifest({"status": "incomplete", "files": {**earlier, **{rel: None for rel in planned}}})

    main = _write_adapter(out, lora_tensors, contents.lora_alpha, dropout, base_model, num_layers)
    save_safetensors_atomic(out / PROJECTION_NAME, projection, metadata={"format": "pt"})
    if vision:
        save_safetensors_atomic(out / VISION_NAME, vision, metadata={"format": "pt"})
    stack = [{"name": "default", "folder": ".", "targets": main["target_modules"], "r": main["r"],
              "alpha": contents.lora_alpha, "source": str(contents.path), "sha256": None, "trainable": True, "active": True}]
    for frozen in contents.frozen:
        sub = _write_adapter(out / frozen["name"], frozen["tensors"], frozen["alpha"], 0.0, base_model, num_layers)
        stack.append({"name": frozen["name"], "folder": frozen["name"], "targets": sub["target_modules"], "r": sub["r"],
                      "alpha": frozen["alpha"], "source": frozen["source"], "sha256": frozen["sha256"],
                      "trainable": False, "active": frozen["active"]})
    write_json_atomic(out / STACK_NAME, stack)
    if provenance is not None:  # bound to the tensor files just written (their sha256)
        weights = [rel for rel in planned if rel.endswith(".safetensors")]
        write_text_atomic(out / PROVENANCE_NAME, bind(provenance, out, weights))
    if ENVELOPE_KEY in metadata:
        write_text_atomic(out / ENVELOPE_NAME, metadata[ENVELOPE_KEY])
    write_text_atomic(out / "README.md", _readme(out, base_model, stack, bool(vision)))
    for rel in sorted(set(earlier) - set(planned)):  # an earlier export's files this one does not write
        (out / rel).unlink(missing_ok=True)
    files = {rel: (out / rel).stat().st_size for rel in planned if rel != MANIFEST_NAME}
    folder.write_manifest({"status": "complete", "files": files})


def _provenance_record(path: Path) -> Optional[str]:
    """What the export's ``provenance.json`` says before it is bound to the written weights: the
    checkpoint's own record; for a foreign checkpoint (MiniGPT-v2, the release) a record that its
    provenance is unknown; None for an own checkpoint without provenance (no record: the leakage
    guard refuses the export as it refuses the checkpoint, unless ``--allow-unknown-provenance``)."""
    kind, weights_file, metadata = read_metadata(path)
    if PROVENANCE_KEY in metadata:
        if kind == "peft" and check_binding(weights_file.parent / PROVENANCE_NAME) is not None:
            return None  # a stale record is never carried into a new binding
        return metadata[PROVENANCE_KEY]
    if kind == "foreign" and not own_checkpoint_marks(weights_file):
        return to_json({"schema": PROVENANCE_SCHEMA, "runs": [],
                        "unknown": f"exported from a foreign checkpoint ({weights_file.name})"})
    return None


def _spaces_before_inst() -> int:
    head = TRAINING_PROMPT.split("[/INST]")[0]
    return len(head) - len(head.rstrip(" "))


def _readme(out: Path, base_model: str, stack: list[dict], vision: bool) -> str:
    frozen = [e for e in stack if not e["trainable"]]
    lines = [
        f"# MiniGPT-Pancreas LoRA export ({out.name})",
        "",
        f"A standard PEFT LoRA adapter for `{base_model}` (r={stack[0]['r']}, alpha={stack[0]['alpha']:g}, "
        f"targets {stack[0]['targets']}), the MiniGPT-v2 projection `llama_proj` (Linear(4 × EVA width → LLaMA hidden))"
        + (", and the trained EVA ViT (`visual_encoder.safetensors`)" if vision else "") + ".",
        "",
        "```python",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "from transformers import LlamaForCausalLM",
        "",
        f'llama = LlamaForCausalLM.from_pretrained("{base_model}")',
        'model = PeftModel.from_pretrained(llama, "DIR")            # this folder',
    ]
    for entry in frozen:
        lines.append(f'model.load_adapter("DIR/{entry["folder"]}", adapter_name="{entry["name"]}")')
    if frozen:
        names = ", ".join(f'"{n}"' for n in ["default"] + [e["name"] for e in frozen if e["active"]])
        lines.append(f"model.base_model.set_adapter([{names}])   # the adapters add up")
    lines += [
        'proj = load_file("DIR/llama_proj.safetensors")            # llama_proj.weight, llama_proj.bias',
        "```",
        "",
    ]
    if frozen:
        lines += [
            "This checkpoint stacks frozen adapters on the base (trained on top of them): "
            + ", ".join(f"`{e['folder']}/` ({e['targets']}, r={e['r']}, alpha={e['alpha']:g}, from {e['source']})"
                        for e in frozen)
            + ". Load them as above: without them the model is not the trained one.",
            "",
        ]
    lines += [
        "Visual tokens: EVA ViT-g features (B, 1024, 1408) without CLS, each run of 4 consecutive tokens "
        f"concatenated (B, {EXPORT_IMAGE_TOKENS}, 5632), then `llama_proj`. The prompt is the token stream the "
        "weights were trained on (MiniGPT-v2's training stream): the text before and after the image encoded "
        "separately, each with SentencePiece's dummy-prefix space and no BOS, one BOS in front, "
        f"{_spaces_before_inst()} spaces before `[/INST]` (with the LLaMA-2 tokenizer an extra `▁`, "
        "id 29871). A prompt written as one string (`<s>[INST] <Img>…</Img> {instruction} [/INST]`) is another "
        "stream and changes the answers. With `tok` a LLaMA-2 SentencePiece tokenizer whose `encode` adds no BOS:",
        "",
        "```python",
        f"instruction = {detection_instruction(TARGET_NAMES['pancreas'])!r}",
        *token_recipe(EXPORT_IMAGE_TOKENS),
        "# embed `ids`, put the projected visual tokens at `image_slots`, and generate",
        "```",
        "",
        "(generated from the project's `minigpt4/prompts.py`, `build_prompt_tokens`).",
        "",
        "Back into the project: `model.ckpt=DIR` (or `model.init_from=DIR`). `adapter_stack.json` lists the adapters.",
        "",
    ]
    return "\n".join(lines)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt4.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint folder / .safetensors / .pth")
    parser.add_argument("--out", required=True, help="output folder (PEFT adapter layout)")
    parser.add_argument("--base-model", default=None, help="base_model_name_or_path to record")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="alpha of a .pth file's LoRA (default 16); checkpoints that record theirs refuse another")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder not written by an export (its files are kept)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    out = export_peft(args.ckpt, args.out, args.base_model, args.lora_alpha, overwrite=args.overwrite)
    print(f"wrote {out} (load with peft.PeftModel.from_pretrained; see {out / 'README.md'})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m minigpt4.export``: bad input → ``error: ...`` on stderr, exit status 2."""
    return run_main(_main, argv, prog="python -m minigpt4.export")
