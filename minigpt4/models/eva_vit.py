"""EVA ViT-g/14 in the BLIP-2 / LAVIS layout (SPEC §2), written to be read top to bottom.

Parameter names match ``eva_vit_g.pth`` exactly (``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.q_bias,attn.v_bias,attn.proj,norm2,
mlp.fc1,mlp.fc2}.*``), so the released file loads with a plain, *checked*
``load_state_dict``. There is no final norm: MiniGPT-v2 applies its own ``ln_vision``.

Sizes come from :class:`minigpt4.config.VisionConfig`: full size is width 1408, 39 blocks,
16 heads, MLP 6144, 448-pixel images (32×32 patches); tests use a 2-block, 64-wide version.

Precision follows MiniGPT-v2 (LAVIS ``convert_weights_to_fp16``): :func:`cast_vision_weights`
puts only the Conv/Linear weights and biases in half precision; LayerNorms, ``pos_embed``,
``cls_token`` and the q/v bias vectors stay fp32, the forward pass runs under autocast, and the
residual stream between blocks stays fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import VisionConfig

log = logging.getLogger(__name__)

EVA_SOURCE = (
    "eva_vit_g.pth from the BLIP-2/LAVIS release "
    "(https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth, ~2 GB)"
)


class PatchEmbed(nn.Module):
    """(B, 3, S, S) → (B, (S/P)², C) with a stride-P convolution."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with EVA's bias layout.

    ``qkv`` is one bias-free Linear; q and v have their own bias vectors and k has none (the
    key bias would cancel in the softmax anyway).
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, C/H), scale head_dim**-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale, no drop path: the tower is frozen)."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """EVA ViT-g/14 without head and final norm.

    Input (B, 3, S, S) normalised images; output (B, 1 + (S/P)², C) tokens, CLS first.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.mlp_hidden, cfg.layer_norm_eps) for _ in range(cfg.depth)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # trunc-normal(0.02) like EVA; only matters for random towers (tests, benchmarks)
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the Conv/Linear weights: the autocast dtype of the forward pass."""
        return self.patch_embed.proj.weight.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast(images.device):
            x = self.patch_embed(images)  # (B, N, C), compute dtype
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            # cat promotes to the fp32 of cls_token/pos_embed: the residual stream stays fp32
            x = torch.cat((cls, x), dim=1) + self.pos_embed
            for block in self.blocks:
                x = block(x)
        return x

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        # half-precision weights (cast_vision_weights) run under autocast like MiniGPT-v2's
        # maybe_autocast: matmuls in half, LayerNorm in fp32; an all-fp32 tower keeps any
        # autocast the caller has opened (training with run.amp)
        dtype = self.compute_dtype
        if dtype == torch.float32 or device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)


def cast_vision_weights(tower: nn.Module, dtype: torch.dtype) -> nn.Module:
    """MiniGPT-v2's precision policy: Conv/Linear weights and biases in ``dtype``, the rest fp32.

    LAVIS ``convert_weights_to_fp16`` halves only ``nn.Conv{1,2}d``/``nn.Linear`` parameters;
    LayerNorms, ``pos_embed``, ``cls_token`` and the ``q_bias``/``v_bias`` vectors stay fp32,
    so (with the autocast of :meth:`EvaViT.forward`) normalisation and the residual stream are
    fp32. ``dtype=float32`` makes the whole tower fp32. Returns ``tower`` (changed in place).
    """
    tower.to(torch.float32)
    if dtype != torch.float32:
        for module in tower.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                module.to(dtype)
    return tower


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a (1, 1 + g², C) position embedding to (1, 1 + num_patches, C).

    The CLS embedding is kept; the g×g grid is resized bicubically (align_corners=False), as
    BLIP-2 does to go from the 224-pixel training grid (16×16) to 448 pixels (32×32). A resized
    embedding is fp32 whatever the file's dtype (BLIP-2 resizes into its fp32 parameter).
    """
    old = pos_embed.shape[1] - 1
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side**2 != old or new_side**2 != num_patches:
        raise ValueError(f"position embedding grids must be square, got {old} → {num_patches} patches")
    if old == num_patches:
        return pos_embed
    cls, grid = pos_embed[:, :1].float(), pos_embed[:, 1:]
    grid = grid.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    # kept in fp32 (not cast back to the file's fp16): pos_embed is an fp32 parameter
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, -1)
    return torch.cat((cls, grid), dim=1)


def load_eva_weights(model: EvaViT, path: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> dict:
    """Load ``eva_vit_g.pth`` into ``model``, checked.

    Accepts a plain state dict or one under a ``"model"`` / ``"state_dict"`` key. Blocks with
    an index ≥ ``depth`` (EVA-CLIP-g's 40th block) are ignored and reported; every key of the
    used blocks must be present with the right shape.

    The file is memory-mapped and each tensor is converted once, straight to the dtype of the
    parameter it replaces (``assign``: no second copy of the tower), so ``model`` may have been
    built on the meta device (``MiniGPTPancreas(..., empty_vision=True)``: no 1 B-parameter random
    init). ``device``: where the weights go; default the model's device (CPU for a meta model).

    Returns:
        ``{"ignored": [...], "unexpected": [...], "pos_embed": "16x16->32x32"}``.

    Raises:
        FileNotFoundError: the file is missing (the message says where to get it).
        ValueError: missing keys or shape mismatches, naming the file and the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EVA weights not found: {path}; get {EVA_SOURCE}")
    try:  # mmap: the file's pages stay file-backed (droppable) until each tensor is converted
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (pre-zip) torch.save file cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")

    depth = model.cfg.depth
    expected = model.state_dict()
    used, ignored, unexpected = {}, [], []
    for key, value in state.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= depth:
            ignored.append(key)
        elif key in expected:
            used[key] = value
        else:
            unexpected.append(key)
    grid_note = None
    if "pos_embed" in used and used["pos_embed"].shape != expected["pos_embed"].shape:
        old = used["pos_embed"].shape[1] - 1
        used["pos_embed"] = interpolate_pos_embed(used["pos_embed"], model.cfg.num_patches)
        grid_note = f"{math.isqrt(old)}x{math.isqrt(old)}->{model.cfg.grid_size}x{model.cfg.grid_size}"
    missing = sorted(set(expected) - set(used))
    if missing:
        raise ValueError(f"{path}: {len(missing)} EVA keys missing, e.g. {missing[:5]}")
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in used.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path}: EVA shape mismatch (is model.vision the right size?): {wrong[:5]}")
    if device is None:
        current = next(model.parameters()).device
        device = torch.device("cpu") if current.type == "meta" else current
    # the precision policy of cast_vision_weights is already on the (possibly meta) parameters;
    # copy=True: a tensor already in its dtype must not stay backed by the mapped file
    used = {k: v.to(device=device, dtype=expected[k].dtype, copy=True) for k, v in used.items()}
    model.load_state_dict(used, strict=True, assign=True)
    ignored_blocks = sorted({int(k.split(".")[1]) for k in ignored})
    if ignored_blocks:
        log.info("%s: ignored EVA blocks %s (the model uses %d blocks)", path, ignored_blocks, depth)
    if unexpected:
        log.warning("%s: %d unexpected EVA keys ignored: %s", path, len(unexpected), unexpected[:10])
    if grid_note:
        log.info("%s: position embedding interpolated %s (bicubic)", path, grid_note)
    return {"ignored": ignored, "unexpected": unexpected, "pos_embed": grid_note}
