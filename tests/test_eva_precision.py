"""EVA ViT-g precision policy of MiniGPT-v2 (LAVIS ``convert_weights_to_fp16``): only Conv/Linear
weights in half precision; LayerNorms, position embedding, CLS token, q/v biases, the residual
stream and ``ln_vision`` in fp32; the forward pass under autocast."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import VisionConfig
from minigpt4.models.eva_vit import EvaViT, cast_vision_weights, interpolate_pos_embed
from tests.tiny import build_tiny_model, tiny_images

torch.set_num_threads(1)

HALF_PARAMS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "attn.qkv.weight", "attn.proj.weight",
               "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def test_policy_halves_only_conv_and_linear_weights():
    tower = cast_vision_weights(EvaViT(VisionConfig(image_size=28, width=32, depth=2, num_heads=4, mlp_hidden=64)), torch.bfloat16)
    dtypes = {name: p.dtype for name, p in tower.named_parameters()}
    half = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert half == {n for n in dtypes if n.endswith(HALF_PARAMS)}
    fp32 = set(dtypes) - half
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.1.norm2.bias", "blocks.0.attn.q_bias",
            "blocks.1.attn.v_bias"} <= fp32
    assert all(not n.endswith(("weight", "bias")) or "norm" in n for n in fp32 if "blocks" in n and "_bias" not in n)
    out = tower(torch.randn(2, 3, 28, 28))
    assert out.dtype == torch.float32 and out.shape == (2, 5, 32)  # the residual stream is fp32
    assert all(p.dtype == torch.float32 for p in cast_vision_weights(tower, torch.float32).parameters())


def test_model_uses_the_policy_and_an_fp32_ln_vision():
    model = build_tiny_model(dtype="bf16")
    assert model.dtype == torch.bfloat16
    tower = model.visual_encoder
    assert tower.patch_embed.proj.weight.dtype == torch.bfloat16 and tower.blocks[0].mlp.fc2.weight.dtype == torch.bfloat16
    assert tower.pos_embed.dtype == tower.cls_token.dtype == tower.blocks[0].attn.q_bias.dtype == torch.float32
    assert tower.blocks[0].norm1.weight.dtype == model.ln_vision.weight.dtype == torch.float32
    visual = model.encode_images(tiny_images())
    assert visual.dtype == torch.bfloat16 and torch.isfinite(visual.float()).all()
    # a trainable tower is all fp32
    trained = build_tiny_model(dtype="bf16", **{"vision.trainable": True}).visual_encoder
    assert all(p.dtype == torch.float32 for p in trained.parameters())


def test_interpolated_position_embedding_is_not_cast_back_to_half():
    torch.manual_seed(0)
    pos = (torch.randn(1, 1 + 16, 8) * 0.02).half()  # eva_vit_g.pth stores fp16
    resized = interpolate_pos_embed(pos, 64)
    assert resized.dtype == torch.float32 and resized.shape == (1, 65, 8)
    grid = pos[:, 1:].float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 8)
    assert torch.equal(resized[:, 1:], expected) and torch.equal(resized[:, :1], pos[:, :1].float())


def _trained_like(tower: EvaViT, seed: int = 0) -> EvaViT:
    """Random weights at the scale of a trained deep ViT: weights std 0.02, the residual
    branches' output projections (``attn.proj``, ``mlp.fc2``) std 0.02/√(2·39) (GPT-2's scaled
    init for EVA-g's 39 blocks: each block changes the residual stream a little), non-zero
    biases, LayerNorm gains around 1, and 8 residual channels with large values (trained ViTs,
    EVA included, carry such outlier features, here |x| ≈ 30 through the position embedding)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                p.copy_(0.02 / (2 * 39) ** 0.5 * noise)
            else:
                p.copy_(0.02 * noise)
        outliers = torch.randperm(tower.cfg.width, generator=generator)[:8]
        tower.pos_embed[..., outliers] += 30.0 + 10.0 * torch.randn(8, generator=generator)
    return tower


def test_full_width_eva_policy_error_is_smaller_than_all_bf16():
    """Full-width EVA (1408 wide, 16 heads, MLP 6144), 2 blocks, 112-pixel images: the policy
    (bf16 Conv/Linear weights, fp32 rest, autocast) against the fp32 reference, versus the
    former all-bf16 tower (every parameter and the residual stream in bf16)."""
    cfg = VisionConfig(image_size=112, width=1408, depth=2, num_heads=16, mlp_hidden=6144)
    with torch.device("meta"):  # skip the random init: _trained_like sets every parameter
        reference = EvaViT(cfg)
    reference = _trained_like(reference.to_empty(device="cpu")).eval()
    policy = cast_vision_weights(copy.deepcopy(reference), torch.bfloat16)
    all_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    ln_vision = nn.LayerNorm(cfg.width)  # identity affine, fp32 (SPEC §2)
    images = tiny_images(1, size=112, seed=1)  # 65 tokens: bf16 matmuls are slow on CPUs

    with torch.no_grad():
        expected = ln_vision(reference(images))
        got_policy = ln_vision(policy(images).float())
        got_bf16 = ln_vision(all_bf16(images.bfloat16()).float())  # the old path: ln_vision in bf16 too

    def relative_error(x: torch.Tensor) -> float:
        return float((x - expected).norm() / expected.norm())

    err_policy, err_bf16 = relative_error(got_policy), relative_error(got_bf16)
    print(f"EVA 1408 wide, 2 blocks, 112 px: relative error vs fp32 — policy {err_policy:.2e}, all-bf16 {err_bf16:.2e}")
    assert torch.isfinite(got_policy).all()
    assert err_policy < 0.5 * err_bf16  # measured here: 7.2e-04 vs 3.9e-03
    assert err_policy < 2e-3
