"""The LoRA adapter stack: a foreign LoRA of other targets (MiniGPT-v2 stage 3: q,v; we train q,k)
is a frozen named peft adapter stacked with the trainable one; the base is never modified."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from minigpt4.config import Config
from minigpt4.models.checkpoints import load_weights
from minigpt4.models.llama import llama_config
from minigpt4.models.minigpt_v2 import MiniGPTPancreas, build_model
from minigpt4.tokenizer import tiny_tokenizer_path
from minigpt4.training.trainer import build_optimizer
from tests.test_checkpoints import ANSWERS, INSTRUCTIONS, PREFIX, base_weights, release_state, save_release_pth
from tests.tiny import build_tiny_model, tiny_images, tiny_model_config

torch.set_num_threads(1)

TRAINED = {"llama_proj.weight", "llama_proj.bias"} | {
    f"{PREFIX}.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(2) for m in ("q_proj", "k_proj") for ab in ("A", "B")
}


def forward_logits(model):
    with torch.no_grad():
        return model(tiny_images(), INSTRUCTIONS, ANSWERS).logits.float()


def save_tiny_llama(folder, dtype=torch.float32, seed=3) -> LlamaForCausalLM:
    """A tiny random LLaMA-2 saved like the HF release (``save_pretrained`` + ``tokenizer.model``)."""
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config(tiny_model_config().text, None)).to(dtype)
    llama.save_pretrained(folder)
    shutil.copy(tiny_tokenizer_path(), folder / "tokenizer.model")
    return llama


def test_bf16_stage3_init_keeps_the_base_bit_identical_and_the_adapter_active(tmp_path):
    """Issue 10's done-when: bf16, text.path = a saved LLaMA, init_from = a LAVIS-layout stage-3
    .pth (q,v, peft-0.2 names), q,k configured."""
    source = save_tiny_llama(tmp_path / "llama", torch.bfloat16)
    save_release_pth(tmp_path / "checkpoint_stage3.pth", release_state(("q_proj", "v_proj")))
    cfg = tiny_model_config(dtype="bf16", init_from=str(tmp_path / "checkpoint_stage3.pth"),
                            **{"text.path": str(tmp_path / "llama")})
    model = build_model(cfg)
    assert model.dtype == torch.bfloat16
    loaded = base_weights(model)
    assert loaded.keys() == source.state_dict().keys()
    for name, weight in source.state_dict().items():
        assert weight.dtype == loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], weight), name
    assert [(e["name"], e["targets"], e["trainable"], e["active"]) for e in model.adapter_stack()] == [
        ("default", ["k_proj", "q_proj"], True, True), ("checkpoint_stage3", ["q_proj", "v_proj"], False, True)]
    # the stage-3 factors stay fp32 on the bf16 base (computed beside it, not rounded into it)
    assert {t.dtype for t in model.adapter_tensors("checkpoint_stage3").values()} == {torch.float32}

    with_stage3 = forward_logits(model)
    model.set_active_adapters(["default"])
    without = forward_logits(model)
    model.set_active_adapters(["default", "checkpoint_stage3"])
    assert not torch.allclose(with_stage3, without, atol=1e-2)  # the adapter changes the output ...
    assert torch.equal(forward_logits(model), with_stage3)  # ... and switching back restores it
    # the q,v model that stage-3 is computes the same thing
    qv = {"text.path": str(tmp_path / "llama"), "lora.target_modules": ["q_proj", "v_proj"]}
    reference = build_model(tiny_model_config(dtype="bf16", init_from=str(tmp_path / "checkpoint_stage3.pth"), **qv))
    assert [e["name"] for e in reference.adapter_stack()] == ["default"]
    # exactly: the fresh q,k adapter adds exact zeros, the stage-3 delta is computed the same way
    assert torch.equal(with_stage3, forward_logits(reference))


def test_only_the_trainable_adapter_and_projection_are_trained(tmp_path):
    """requires_grad, gradients, the trainer's optimizer and train mode see the trainable adapter
    and llama_proj only, also after peft calls that toggle adapters (which set requires_grad)."""
    save_release_pth(tmp_path / "checkpoint_stage3.pth", release_state(("q_proj", "v_proj")))
    model = build_model(tiny_model_config(init_from=str(tmp_path / "checkpoint_stage3.pth")))

    def trainable_names():
        return {n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad}

    assert trainable_names() == TRAINED == set(model.trainable_state_dict())
    with model.llama_model.disable_adapter():  # peft's own: all active adapters trainable afterwards
        pass
    assert "checkpoint_stage3" in str([n for n, p in model.named_parameters() if p.requires_grad])
    stacked = forward_logits(model)
    with model.adapters_disabled():  # ours re-freezes
        assert not torch.allclose(forward_logits(model), stacked, atol=1e-3)
    assert trainable_names() == TRAINED and torch.equal(forward_logits(model), stacked)
    model.llama_model.base_model.set_adapter(["default", "checkpoint_stage3"])  # peft: all active trainable
    assert "checkpoint_stage3" in str([n for n, p in model.named_parameters() if p.requires_grad])
    model.set_active_adapters(["checkpoint_stage3", "default"])  # ours re-freezes
    assert trainable_names() == TRAINED
    model.set_active_adapters(["checkpoint_stage3"])  # inactive, still the one trained
    assert trainable_names() == TRAINED
    model.set_active_adapters(["default", "checkpoint_stage3"])

    optimizer = build_optimizer(model, Config())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.trainable_parameters().values()} and len(optimized) == len(TRAINED)

    model.train()
    try:
        dropout = {n for n, m in model.llama_model.named_modules() if m.training}
        assert dropout and all(n.endswith("lora_dropout.default") for n in dropout)
        model(tiny_images(), INSTRUCTIONS, ANSWERS).loss.backward()
    finally:
        model.eval()
    with_grad = {n.replace(".default.", ".") for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == TRAINED
    with pytest.raises(ValueError, match=r"unknown adapters \['stage9'\]"):
        model.set_active_adapters(["stage9"])


def test_add_lora_adapter_api_checks_its_input_and_can_switch_the_trainable_adapter():
    model = build_tiny_model()
    state = {k: v for k, v in release_state(("q_proj", "v_proj")).items() if ".lora_" in k}
    with pytest.raises(ValueError, match="adapter name 'default' is invalid or already used"):
        model.add_lora_adapter("default", state, alpha=16)
    partial = {k: v for k, v in state.items() if not k.endswith("1.self_attn.v_proj.lora_B.weight")}
    with pytest.raises(ValueError, match=r"stage3.pth: LoRA of model.layers.1.self_attn.v_proj has only lora_A"):
        model.add_lora_adapter("stage3", partial, alpha=16, source="stage3.pth")
    with pytest.raises(ValueError, match=r"LoRA targets \['q_proj', 'v_proj'\] in the tensors, but \['q_proj'\] declared"):
        model.add_lora_adapter("stage3", state, alpha=16, targets=["q_proj"])
    wide = dict(state, **{f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 8)})
    with pytest.raises(ValueError, match="do not fit the weight"):
        model.add_lora_adapter("stage3", wide, alpha=16)
    assert [e["name"] for e in model.adapter_stack()] == ["default"]  # nothing half-added

    entry = model.add_lora_adapter("stage3", state, alpha=16, active=False)
    assert entry["active"] is False and model.active_adapters() == ["default"]
    # a new trainable adapter: the former one is frozen (and stays active), trainable_state_dict follows
    fresh = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}
    model.add_lora_adapter("stage2", fresh, alpha=16, trainable=True)
    assert [(e["name"], e["trainable"], e["active"]) for e in model.adapter_stack()] == [
        ("default", False, True), ("stage3", False, False), ("stage2", True, True)]
    assert set(model.trainable_state_dict()) == {"llama_proj.weight", "llama_proj.bias"} | set(state)
    assert all(torch.equal(model.trainable_state_dict()[k], v) for k, v in fresh.items())


class QuantizedLinearStandIn(nn.Linear):
    """An 8-bit Linear like bitsandbytes' (int8 weight + fp32 row scale) whose weight refuses writes.

    The int8 weight is an inference tensor (a buffer: a Parameter would drop that): any in-place
    update outside inference mode raises.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True).float() / 127
        with torch.inference_mode():
            weight = (linear.weight.detach().float() / scale).round().to(torch.int8)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, (self.weight.float() * self.scale).to(x.dtype))


def test_a_quantized_base_takes_a_stacked_adapter_without_writes(tmp_path):
    save_release_pth(tmp_path / "checkpoint_stage3.pth", release_state(("q_proj", "v_proj")))
    cfg = tiny_model_config()
    full = build_tiny_model()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config(cfg.text, full.tokenizer))
    for layer in llama.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(layer.self_attn, name, QuantizedLinearStandIn(getattr(layer.self_attn, name)))
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        llama.model.layers[0].self_attn.v_proj.weight.add_(1)  # the stand-in really refuses writes
    model = MiniGPTPancreas(cfg, llama, full.tokenizer)
    before = {n.replace(".base_layer.", "."): b.clone() for n, b in model.llama.named_buffers() if n.endswith(".weight")}
    assert len(before) == 2 * 3

    report = load_weights(model, tmp_path / "checkpoint_stage3.pth")
    assert report.stacked_adapters == ["checkpoint_stage3"]
    after = {n.replace(".base_layer.", "."): b for n, b in model.llama.named_buffers() if n.endswith(".weight")}
    assert after.keys() == before.keys() and all(torch.equal(after[n], w) for n, w in before.items())
    assert model.llama.model.layers[0].self_attn.v_proj.base_layer.weight.dtype == torch.int8
    with_stage3 = forward_logits(model)
    model.set_active_adapters(["default"])
    assert not torch.allclose(with_stage3, forward_logits(model), atol=1e-3)
    model.set_active_adapters(["default", "checkpoint_stage3"])
    model(tiny_images(), INSTRUCTIONS, ANSWERS).loss.backward()
    assert {n.replace(".default.", ".") for n, p in model.named_parameters() if p.grad is not None} == TRAINED


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 8-bit needs a CUDA GPU")
def test_bitsandbytes_8bit_base_takes_the_stage3_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    save_tiny_llama(tmp_path / "llama", torch.float16)
    save_release_pth(tmp_path / "checkpoint_stage3.pth", release_state(("q_proj", "v_proj")))
    cfg = tiny_model_config(dtype="fp16", init_from=str(tmp_path / "checkpoint_stage3.pth"),
                            **{"text.path": str(tmp_path / "llama"), "text.quantization": "8bit"})
    model = build_model(cfg, device="cuda")
    assert [e["name"] for e in model.adapter_stack()] == ["default", "checkpoint_stage3"]
    logits = model(tiny_images().cuda(), INSTRUCTIONS, ANSWERS).logits
    assert torch.isfinite(logits).all()
