"""Checked weight loading: the project's safetensors, the MiniGPT-v2 / release .pth layouts, EVA."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minigpt4.config import VisionConfig
from minigpt4.io import file_sha256
from minigpt4.models.checkpoints import load_weights, save_checkpoint
from minigpt4.models.eva_vit import EvaViT, interpolate_pos_embed, load_eva_weights
from minigpt4.models.minigpt_v2 import build_model
from tests.tiny import build_tiny_model, tiny_images, tiny_model_config

torch.set_num_threads(1)

PREFIX = "llama_model.base_model.model.model.layers"
INSTRUCTIONS = ["[refer] Where is the pancreas?", "[vqa] Is a pancreatic tumor visible in the image?"]
ANSWERS = ["{<12><34><56><78>}", "yes"]


def release_state(targets=("q_proj", "v_proj"), r=8, layers=2, hidden=64, seed=0):
    """A ``"model"`` dict with the exact MiniGPT-v2 stage-3 / release key layout (peft 0.2 names)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "llama_proj.weight": torch.randn(hidden, 4 * 64, generator=g) * 0.05,
        "llama_proj.bias": torch.randn(hidden, generator=g) * 0.05,
    }
    for i in range(layers):
        for m in targets:
            state[f"{PREFIX}.{i}.self_attn.{m}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.2
            state[f"{PREFIX}.{i}.self_attn.{m}.lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.2
    return state


def save_release_pth(path, state):
    # what MiniGPT-4's runner saves: model + optimizer + config dict + scaler + epoch
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "config": {"run": {"seed": 42}}, "scaler": None, "epoch": 3}, path)


def base_weights(model) -> dict:
    """The LLaMA base tensors by their plain names (peft's ``.base_layer.`` segment removed), cloned."""
    return {n.replace(".base_layer.", "."): p.detach().clone() for n, p in model.llama.named_parameters()
            if ".lora_" not in n}


def logits(model):
    with torch.no_grad():
        return model(tiny_images(), INSTRUCTIONS, ANSWERS).logits


def test_project_checkpoint_round_trip_is_exact(tmp_path):
    source = build_tiny_model(seed=1)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    path = save_checkpoint(source, tmp_path / "ckpt")
    assert path.name == "model.safetensors" and (tmp_path / "ckpt" / "config.yaml").is_file()
    assert set(load_file(str(path))) == set(source.trainable_state_dict())

    target = build_tiny_model(seed=2)  # different llama_proj/LoRA init, same frozen base
    report = load_weights(target, tmp_path / "ckpt")
    assert report.format == "project" and not report.missing and not report.unexpected
    assert report.loaded == sorted(source.trainable_state_dict())
    for name, tensor in source.trainable_state_dict().items():
        assert torch.equal(target.trainable_state_dict()[name], tensor), name
    # the .safetensors file directly works too
    assert load_weights(build_tiny_model(seed=3), path).loaded == report.loaded


def test_release_layout_with_matching_targets_loads_into_the_adapters(tmp_path):
    model = build_tiny_model(**{"lora.target_modules": ["q_proj", "v_proj"]})
    state = release_state()
    state["visual_encoder.blocks.0.norm1.weight"] = torch.ones(64)  # not trainable: reported
    save_release_pth(tmp_path / "release.pth", state)
    report = load_weights(model, tmp_path / "release.pth")
    assert report.format == "torch_pickle" and not report.stacked_adapters
    assert [e["name"] for e in model.adapter_stack()] == ["default"]
    assert report.unexpected == ["visual_encoder.blocks.0.norm1.weight"]
    assert report.lora_targets_in_file == ["q_proj", "v_proj"]
    trained = model.trainable_state_dict()
    assert set(trained) == set(state) - {"visual_encoder.blocks.0.norm1.weight"}
    for name, value in trained.items():
        assert torch.equal(value, state[name]), name


def test_newer_peft_names_and_ddp_prefix_are_mapped(tmp_path):
    model = build_tiny_model(**{"lora.target_modules": ["q_proj", "v_proj"]})
    state = {("module." + k).replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in release_state().items()}
    save_release_pth(tmp_path / "new.pth", state)
    report = load_weights(model, tmp_path / "new.pth")
    assert len(report.loaded) == 2 + 2 * 2 * 2 and not report.unexpected


def test_stage3_qv_into_qk_config_stacks_a_frozen_adapter(tmp_path):
    """Stage-3 has LoRA on q,v; the paper trains q,k: stage-3's adapter is stacked, frozen, on the
    unchanged base, and the model computes what stage-3 computed."""
    state = release_state(("q_proj", "v_proj"))
    save_release_pth(tmp_path / "checkpoint_stage3.pth", state)
    reference = build_tiny_model(**{"lora.target_modules": ["q_proj", "v_proj"], "lora.alpha": 16})
    load_weights(reference, tmp_path / "checkpoint_stage3.pth")

    model = build_tiny_model()  # q,k, r 8, alpha 16
    base_before = base_weights(model)
    assert "model.layers.0.self_attn.v_proj.weight" in base_before
    report = load_weights(model, tmp_path / "checkpoint_stage3.pth")
    assert report.stacked_adapters == ["checkpoint_stage3"] and not report.reused_adapters
    assert report.loaded == ["llama_proj.bias", "llama_proj.weight"]
    assert base_weights(model).keys() == base_before.keys()
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, base_before[name]), name  # the base is never modified
    stage3 = model.adapter_stack()[1]
    assert stage3 == {"name": "checkpoint_stage3", "targets": ["q_proj", "v_proj"], "r": 8, "alpha": 16.0,
                      "source": str(tmp_path / "checkpoint_stage3.pth"),
                      "sha256": file_sha256(tmp_path / "checkpoint_stage3.pth"), "trainable": False, "active": True}
    assert {k: torch.equal(v, state[k]) for k, v in model.adapter_tensors("checkpoint_stage3").items()} == {
        k: True for k in state if ".lora_" in k}
    # fresh q,k adapters (B = 0) add nothing: the same function as the q,v model
    assert all(not t.any() for n, t in model.trainable_state_dict().items() if "lora_B" in n)
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)

    # a project checkpoint carries the frozen adapter: it rebuilds itself without the stage-3 file ...
    with torch.no_grad():
        model.llama_proj.bias.add_(0.01)
    save_checkpoint(model, tmp_path / "stage1")
    stored = load_file(str(tmp_path / "stage1" / "model.safetensors"))
    assert set(stored) == set(model.trainable_state_dict()) | {
        f"lora_adapters.checkpoint_stage3.{k}" for k in state if ".lora_" in k}
    fresh = build_tiny_model()
    report = load_weights(fresh, tmp_path / "stage1")
    assert report.stacked_adapters == ["checkpoint_stage3"]
    assert fresh.adapter_stack() == model.adapter_stack()
    assert torch.equal(logits(fresh), logits(model))
    # ... and init_from=stage3 + ckpt=stage1 does not stack the same adapter twice
    both = build_model(tiny_model_config(init_from=str(tmp_path / "checkpoint_stage3.pth"), ckpt=str(tmp_path / "stage1")))
    assert [e["name"] for e in both.adapter_stack()] == ["default", "checkpoint_stage3"]
    assert torch.equal(logits(both), logits(model))


def test_legacy_checkpoint_with_merged_deltas_loads_as_a_frozen_adapter(tmp_path):
    """Format /1 stored foreign deltas as ``merged_lora.<i>.*`` (they were merged into the base);
    they now become a frozen adapter: same function, base untouched."""
    state = release_state(("q_proj", "v_proj"))
    reference = build_tiny_model(**{"lora.target_modules": ["q_proj", "v_proj"]})
    save_release_pth(tmp_path / "checkpoint_stage3.pth", state)
    load_weights(reference, tmp_path / "checkpoint_stage3.pth")
    old = build_tiny_model()
    tensors = {k: v.contiguous() for k, v in old.trainable_state_dict().items()}
    tensors.update({f"merged_lora.0.{k}": v for k, v in state.items() if ".lora_" in k})
    tensors["llama_proj.weight"], tensors["llama_proj.bias"] = state["llama_proj.weight"], state["llama_proj.bias"]
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"), metadata={
        "format": "minigpt-pancreas/1", "lora_alpha": "16", "lora_targets": '["q_proj", "k_proj"]',
        "merged_lora": json.dumps([{"id": "x", "source": "weights/checkpoint_stage3.pth", "alpha": 16.0}])})
    model = build_tiny_model()
    report = load_weights(model, tmp_path / "old")
    assert report.stacked_adapters == ["checkpoint_stage3"] and not report.unexpected
    assert model.adapter_stack()[1]["source"] == "weights/checkpoint_stage3.pth"
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)


def test_missing_trainable_keys_are_an_error(tmp_path):
    state = release_state(("q_proj", "k_proj"))
    del state[f"{PREFIX}.1.self_attn.k_proj.lora_B.weight"]
    save_release_pth(tmp_path / "partial.pth", state)
    # an incomplete adapter set does not fit → a frozen adapter, which needs both factors
    with pytest.raises(ValueError, match="has only lora_A"):
        load_weights(build_tiny_model(), tmp_path / "partial.pth")
    state = release_state(("q_proj", "k_proj"))
    del state["llama_proj.bias"]
    save_release_pth(tmp_path / "noproj.pth", state)
    with pytest.raises(ValueError, match=r"noproj.pth: 1 trainable tensors missing.*llama_proj.bias"):
        load_weights(build_tiny_model(), tmp_path / "noproj.pth")


def test_shape_mismatch_and_bad_files(tmp_path):
    state = release_state(("q_proj", "k_proj"))
    state["llama_proj.weight"] = torch.zeros(64, 128)
    save_release_pth(tmp_path / "shape.pth", state)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(build_tiny_model(), tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth: cannot be read with torch.load"):
        load_weights(build_tiny_model(), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_weights(build_tiny_model(), tmp_path / "nothing.pth")


def test_bad_checkpoint_metadata_names_the_file(tmp_path):
    """The safetensors header's free-text metadata (lora_alpha, merged_lora) is checked."""
    from safetensors.torch import save_file

    path = save_checkpoint(build_tiny_model(seed=1), tmp_path / "ckpt")
    tensors = load_file(str(path))
    for key, value, problem in [("merged_lora", "[{broken", "Expecting property name"),
                                ("merged_lora", '{"a": 1}', "merged_lora is not a list of objects"),
                                ("lora_alpha", "sixteen", "could not convert string to float")]:
        metadata = {"format": "minigpt-pancreas/1", "lora_alpha": "16", "merged_lora": "[]", key: value}
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError) as bad:
            load_weights(build_tiny_model(), tmp_path / "ckpt")
        assert str(bad.value).startswith(f"{path}: bad checkpoint metadata (") and problem in str(bad.value)


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_unsafe_pickles_are_refused(tmp_path):
    torch.save({"model": release_state(("q_proj", "k_proj")), "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(build_tiny_model(), tmp_path / "evil.pth")


# ---------------------------------------------------------------------- EVA
def eva_state(cfg: VisionConfig, grid: int, blocks: int, seed=0) -> dict:
    """BLIP-2 ``eva_vit_g.pth`` layout at tiny size, position grid ``grid``², ``blocks`` blocks."""
    g = torch.Generator().manual_seed(seed)
    C, H = cfg.width, cfg.mlp_hidden
    state = {
        "cls_token": torch.randn(1, 1, C, generator=g),
        "pos_embed": torch.randn(1, 1 + grid * grid, C, generator=g),
        "patch_embed.proj.weight": torch.randn(C, 3, cfg.patch_size, cfg.patch_size, generator=g) * 0.02,
        "patch_embed.proj.bias": torch.randn(C, generator=g),
    }
    shapes = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.q_bias": (C,), "attn.v_bias": (C,),
              "attn.qkv.weight": (3 * C, C), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
              "norm2.weight": (C,), "norm2.bias": (C,), "mlp.fc1.weight": (H, C), "mlp.fc1.bias": (H,),
              "mlp.fc2.weight": (C, H), "mlp.fc2.bias": (C,)}
    for i in range(blocks):
        for name, shape in shapes.items():
            state[f"blocks.{i}.{name}"] = torch.randn(*shape, generator=g) * 0.05
    return state


def test_eva_weights_load_with_pos_embed_interpolation_and_40th_block_ignored(tmp_path):
    cfg = tiny_model_config().vision  # 8×8 grid, 2 blocks
    state = eva_state(cfg, grid=4, blocks=3)  # trained at half the size, one extra block
    torch.save(state, tmp_path / "eva_vit_g.pth")
    vit = EvaViT(cfg)
    report = load_eva_weights(vit, tmp_path / "eva_vit_g.pth")
    assert report["ignored"] and all(k.startswith("blocks.2.") for k in report["ignored"])
    assert report["unexpected"] == [] and report["pos_embed"] == "4x4->8x8"
    assert torch.equal(vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    # CLS position kept; grid resized bicubically, align_corners=False
    assert torch.equal(vit.pos_embed[:, :1], state["pos_embed"][:, :1])
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, -1)
    assert torch.allclose(vit.pos_embed[:, 1:], expected, atol=1e-6)


def test_eva_weights_fill_a_tower_built_on_the_meta_device(tmp_path):
    """build_model's low-memory path: an empty (meta) tower gets the file's tensors by assignment,
    each converted once to the precision policy's dtype (Linear/Conv bf16, the rest fp32)."""
    from minigpt4.models.eva_vit import cast_vision_weights

    cfg = tiny_model_config().vision
    state = eva_state(cfg, grid=4, blocks=3)
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "eva_vit_g.pth")  # the release is fp16
    with torch.device("meta"):
        vit = cast_vision_weights(EvaViT(cfg), torch.bfloat16)
    load_eva_weights(vit, tmp_path / "eva_vit_g.pth")
    assert not any(p.is_meta for p in vit.parameters())
    assert vit.blocks[1].attn.qkv.weight.dtype == torch.bfloat16 and vit.blocks[1].norm1.weight.dtype == torch.float32
    assert torch.equal(vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"].half().bfloat16())
    assert torch.equal(vit.blocks[0].attn.v_bias, state["blocks.0.attn.v_bias"].half().float())
    assert vit.pos_embed.dtype == torch.float32 and vit.pos_embed.shape == (1, 65, 64)
    assert isinstance(vit.blocks[0].mlp.fc1.weight, torch.nn.Parameter)


def test_build_model_never_initialises_a_tower_whose_weights_it_loads(tmp_path, monkeypatch):
    cfg = tiny_model_config()
    torch.save(eva_state(cfg.vision, grid=8, blocks=2, seed=5), tmp_path / "eva_vit_g.pth")
    built_on_meta = []
    original = EvaViT._init_weights
    monkeypatch.setattr(EvaViT, "_init_weights", lambda self: (built_on_meta.append(self.pos_embed.is_meta), original(self)))
    model = build_model(tiny_model_config(**{"vision.weights": str(tmp_path / "eva_vit_g.pth")}))
    assert built_on_meta == [True]
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, eva_state(cfg.vision, 8, 2, seed=5)["blocks.1.mlp.fc2.weight"])
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    build_model(tiny_model_config())  # no weights file: a random tower, initialised
    assert built_on_meta == [True, False]


def test_eva_attention_matches_a_hand_written_reference():
    torch.manual_seed(0)
    cfg = tiny_model_config().vision
    vit = EvaViT(cfg)
    with torch.no_grad():
        vit.blocks[0].attn.q_bias.normal_()
        vit.blocks[0].attn.v_bias.normal_()
    attn, x = vit.blocks[0].attn, torch.randn(2, 5, 64)
    q, k, v = (x @ attn.qkv.weight.T).split(64, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias  # no k bias
    heads = lambda t: t.reshape(2, 5, 4, 16).transpose(1, 2)  # noqa: E731
    weights = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(16)).softmax(-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 64))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_eva_missing_keys_and_wrong_size_are_errors(tmp_path):
    cfg = tiny_model_config().vision
    state = eva_state(cfg, grid=8, blocks=2)
    del state["blocks.1.attn.v_bias"]
    torch.save({"model": state}, tmp_path / "eva_vit_g.pth")
    with pytest.raises(ValueError, match=r"1 EVA keys missing.*blocks.1.attn.v_bias"):
        load_eva_weights(EvaViT(cfg), tmp_path / "eva_vit_g.pth")
    torch.save(eva_state(VisionConfig(image_size=112, width=32, depth=2, num_heads=4, mlp_hidden=64), 8, 2),
               tmp_path / "small.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_eva_weights(EvaViT(cfg), tmp_path / "small.pth")


def test_interpolate_pos_embed_keeps_identity_when_sizes_match():
    pos = torch.randn(1, 17, 8)
    assert interpolate_pos_embed(pos, 16) is pos
    assert interpolate_pos_embed(pos, 64).shape == (1, 65, 8)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pos, 15)


def test_build_model_loads_eva_from_config(tmp_path):
    cfg = tiny_model_config()
    torch.save(eva_state(cfg.vision, grid=8, blocks=2, seed=5), tmp_path / "eva_vit_g.pth")
    model = build_model(tiny_model_config(**{"vision.weights": str(tmp_path / "eva_vit_g.pth")}))
    assert torch.equal(model.visual_encoder.cls_token, eva_state(cfg.vision, 8, 2, seed=5)["cls_token"])


def test_eva_weights_do_not_stay_backed_by_the_mapped_file(tmp_path):
    """Tensors already in the parameter's dtype are copied: rewriting the file cannot change the model."""
    cfg = tiny_model_config().vision
    state = eva_state(cfg, grid=8, blocks=2)
    torch.save(state, tmp_path / "eva_vit_g.pth")
    vit = EvaViT(cfg)  # fp32 tower, fp32 file
    load_eva_weights(vit, tmp_path / "eva_vit_g.pth")
    # its own storage, not a window into the mapped file's
    assert vit.blocks[0].attn.qkv.weight.untyped_storage().nbytes() == vit.blocks[0].attn.qkv.weight.numel() * 4
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "eva_vit_g.pth")
    assert torch.equal(vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
