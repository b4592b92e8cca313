"""``python -m minigpt4.export``: a standard PEFT adapter folder that peft loads on the LLaMA base
and that ``model.ckpt`` accepts back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from minigpt4.provenance import PROVENANCE_SCHEMA, LeakageError, check_checkpoint_against
from minigpt4.commands.export import main as export_main
from minigpt4.io import file_sha256
from minigpt4.models.checkpoints import checkpoint_envelope, load_weights, save_checkpoint
from minigpt4.models.minigpt_v2 import build_model
from tests.test_adapters import forward_logits, save_tiny_llama
from tests.test_checkpoints import PREFIX, release_state, save_release_pth
from tests.tiny import tiny_model_config

torch.set_num_threads(1)


def test_export_round_trip_through_peft_and_back(tmp_path, capsys):
    save_tiny_llama(tmp_path / "llama")
    save_release_pth(tmp_path / "checkpoint_stage3.pth", release_state(("q_proj", "v_proj")))
    cfg = tiny_model_config(init_from=str(tmp_path / "checkpoint_stage3.pth"), **{"text.path": str(tmp_path / "llama")})
    model = build_model(cfg)
    with torch.no_grad():  # a "trained" q,k adapter (B ≠ 0) on top of the frozen stage-3 q,v adapter
        for name, p in model.trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    provenance = {"schema": PROVENANCE_SCHEMA, "runs": [{"run": "/runs/x", "datasets": {"msd": {
        "root": "/data/MSD", "task": "pancreas_detection", "train": [["MSD", "pancreas_001"]], "val": []}}}]}
    envelope = {"schema": 1, "n_volumes": 1, "n_recorded": 1, "slice_thickness_mm": {"min": 2.5, "max": 2.5, "median": 2.5}}
    save_checkpoint(model, tmp_path / "ckpt", provenance=provenance, envelope=envelope)

    assert export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "peft")]) == 0
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "peft"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["k_proj", "q_proj"])
    assert config["base_model_name_or_path"] == str(tmp_path / "llama") and config["peft_type"] == "LORA"
    assert set(load_file(str(out / "adapter_model.safetensors"))) == {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2) for m in ("q_proj", "k_proj") for ab in ("A", "B")}
    stage3 = json.loads((out / "checkpoint_stage3" / "adapter_config.json").read_text())
    assert (stage3["r"], stage3["lora_alpha"], sorted(stage3["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    projection = load_file(str(out / "llama_proj.safetensors"))
    assert torch.equal(projection["llama_proj.weight"], model.llama_proj.weight)
    # the training provenance travels with the export, and the leakage guard reads it there
    record = json.loads((out / "provenance.json").read_text())  # bound to the exported tensor files
    assert record == {**provenance, "weights_sha256": {
        rel: file_sha256(out / rel) for rel in ("adapter_model.safetensors", "checkpoint_stage3/adapter_model.safetensors",
                                                "llama_proj.safetensors")}}
    assert checkpoint_envelope(out) == (envelope, "recorded: 1 of 1 training volumes")  # and the envelope
    assert "envelope.json" in json.loads((out / "manifest.json").read_text())["files"]
    with pytest.raises(LeakageError, match=f"MSD pancreas_001 is in the evaluated test set but trained on by "
                                           f"datasets.msd of checkpoint {out} "):
        check_checkpoint_against(out, {("MSD", "pancreas_001")})
    readme = (out / "README.md").read_text()
    assert 'model.load_adapter("DIR/checkpoint_stage3", adapter_name="checkpoint_stage3")' in readme

    # peft loads the folder on the plain LLaMA and computes what our LLaMA + adapters compute
    ids = torch.tensor([[1, 45, 300, 7, 99, 2], [1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        ours = model.llama_model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "llama"), str(out))
        only_trained = peft_model(input_ids=ids).logits
        peft_model.load_adapter(str(out / "checkpoint_stage3"), adapter_name="checkpoint_stage3")
        peft_model.base_model.set_adapter(["default", "checkpoint_stage3"])
        both = peft_model(input_ids=ids).logits
    assert torch.allclose(both, ours, atol=1e-5)
    assert not torch.allclose(only_trained, ours, atol=1e-3)  # the stacked adapter is needed
    # what peft itself saves (further adapters in subfolders) + llama_proj loads back too
    peft_model.save_pretrained(str(tmp_path / "resaved"))
    shutil.copy(out / "llama_proj.safetensors", tmp_path / "resaved")
    resaved = build_model(tiny_model_config(ckpt=str(tmp_path / "resaved"), **{"text.path": str(tmp_path / "llama")}))
    assert [e["name"] for e in resaved.adapter_stack()] == ["default", "checkpoint_stage3"]
    assert torch.allclose(forward_logits(resaved), forward_logits(model), atol=1e-5)

    # model.ckpt accepts the folder back: same stack, same outputs (same seed: the random tiny ViT)
    back = build_model(tiny_model_config(ckpt=str(out), **{"text.path": str(tmp_path / "llama")}))
    assert [(e["name"], e["targets"], e["trainable"]) for e in back.adapter_stack()] == [
        (e["name"], e["targets"], e["trainable"]) for e in model.adapter_stack()]
    assert back.adapter_stack()[1]["sha256"] == model.adapter_stack()[1]["sha256"]
    assert torch.equal(forward_logits(back), forward_logits(model))


def test_export_of_a_release_pth_and_errors(tmp_path, capsys):
    """A release .pth exports directly (its q,v LoRA as the main adapter, alpha 16)."""
    save_release_pth(tmp_path / "release.pth", release_state(("q_proj", "v_proj")))
    assert export_main(["--ckpt", str(tmp_path / "release.pth"), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == "meta-llama/Llama-2-7b-chat-hf"
    assert json.loads((tmp_path / "out" / "adapter_stack.json").read_text())[0]["name"] == "default"
    # a foreign file records no provenance: its export's record says so (bound to its weights), the guard logs it
    assert json.loads((tmp_path / "out" / "provenance.json").read_text())["unknown"] == \
        "exported from a foreign checkpoint (release.pth)"
    assert check_checkpoint_against(tmp_path / "out", set()).unknown[0].startswith(
        f"provenance unknown: {tmp_path / 'out'} (exported from a foreign checkpoint (release.pth))")
    model = build_model(tiny_model_config(ckpt=str(tmp_path / "out"), **{"lora.target_modules": ["q_proj", "v_proj"]}))
    state = release_state(("q_proj", "v_proj"))
    assert all(torch.equal(model.trainable_state_dict()[k], v) for k, v in state.items())

    # a LoRA missing some layers keeps exact module paths (short names would cover all)
    partial = {k: v for k, v in state.items() if ".0.self_attn." not in k}
    save_release_pth(tmp_path / "partial.pth", partial)
    assert export_main(["--ckpt", str(tmp_path / "partial.pth"), "--out", str(tmp_path / "partial")]) == 0
    config = json.loads((tmp_path / "partial" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

    capsys.readouterr()
    assert export_main(["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    (tmp_path / "out" / "llama_proj.safetensors").unlink()
    with pytest.raises(ValueError, match="llama_proj.safetensors: missing from the export"):
        load_weights(build_model(tiny_model_config()), tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()  # a PEFT folder without our manifest: still checked
    with pytest.raises(FileNotFoundError, match="llama_proj.safetensors missing"):
        load_weights(build_model(tiny_model_config()), tmp_path / "out")
    assert PREFIX.startswith("llama_model.base_model.model.")
