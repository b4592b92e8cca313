"""benchmarks/full_size_load.py at tiny size: real-format weight files written, loaded as train.py and
demo.py load them, every key accounted for, one trainer step with the exact gradient set (issue 21, item 6).

The full size (≈ 16 GB of files) runs by hand; its figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from benchmarks import full_size_load as fsl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fullsize_tiny")
    out = folder / "result.json"
    code = fsl.main([str(folder / "files"), "--tiny", "--in-process", "--json", str(out)])
    return code, json.loads(out.read_text()), folder / "files"


def test_script_succeeds_and_writes_real_layouts(run):
    code, summary, files = run
    assert code == 0
    llama = files / fsl.LLAMA_DIR
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    # 3 layers × (9 weights + the inv_freq buffer) + embed, norm, lm_head; shards of ≤ 200 kB at tiny size
    assert len(index["weight_map"]) == 33 == summary["files"]["llama_tensors"]
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == summary["files"]["llama_shards"] > 1
    # as the release: 2 bytes per parameter + the fp32 inv_freq buffers (3 × 8 values)
    params = 2 * 512 * 64 + 3 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert index["metadata"]["total_size"] == summary["files"]["llama_bytes"] == 2 * params + 4 * 3 * 8
    with safe_open(str(llama / shards[0]), framework="pt") as f:
        tensor = f.get_tensor("model.embed_tokens.weight")
    assert tensor.dtype == torch.float16 and tensor.shape == (512, 64) and tensor.abs().sum() > 0
    config = json.loads((llama / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["torch_dtype"] == "float16" and config["rms_norm_eps"] == 1e-5
    assert json.loads((llama / "generation_config.json").read_text())["top_p"] == 0.9
    eva = torch.load(files / fsl.EVA_FILE, weights_only=True)
    assert {t.dtype for t in eva.values()} == {torch.float16} and eva["pos_embed"].shape == (1, 17, 64)
    assert len(eva) == 4 + 4 * 13  # cls, pos, patch weight + bias; 13 tensors per block
    stage3 = torch.load(files / fsl.STAGE3_FILE, weights_only=True)
    assert set(stage3) == {"model", "optimizer", "config", "scaler", "epoch"}
    names = set(stage3["model"])
    assert "llama_model.base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight" in names
    assert "llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq" in names
    assert len(names) == 3 * (4 + 1) + 2


@pytest.mark.parametrize("entry", ["train", "demo"])
def test_every_key_loads_to_the_file_values(run, entry):
    _, summary, _ = run
    result = summary[entry]
    keys = result["keys"]
    assert keys["all_matched_or_reported"] is True
    assert keys["llama"] == {"equal": 30, "different": [], "inv_freq_reported": 3, "not_in_file": []}
    # 3 of 4 blocks used: 3 × 13 + cls, patch weight, patch bias equal; pos_embed 4×4 → 8×8; block 3 reported
    assert keys["eva"]["equal"] == 42 and keys["eva"]["interpolated"] == ["pos_embed"]
    assert keys["eva"]["ignored_blocks"] == [3] and keys["eva"]["different"] == []
    assert keys["stage3"]["equal"] == 3 * 4 + 2 and keys["stage3"]["inv_freq_reported"] == 3
    adapter = keys["stage3"]["adapter"]
    assert adapter["targets"] == ["q_proj", "v_proj"] and adapter["active"] and not adapter["trainable"]
    assert result["dtype"] == "bfloat16"
    assert 0 < result["start_rss_anon_gib"] <= result["peak_rss_anon_gib"] <= result["vm_hwm_gib"]
    assert result["ru_maxrss_gib"] > 0 and result["bf16_weights_gib"] > 0


def test_trainer_step_on_the_reduced_model(run):
    _, summary, _ = run
    step = summary["step"]
    assert step["exit_code"] == 0 and len(step["losses"]) == 1 and step["loss_finite"]
    assert step["llama"] == "2 layers × 64" and step["eva"] == "2 blocks × 64"
    assert step["grads_exact"] and step["requires_grad_exact"] and step["grads_finite"]
    assert len(step["grads"]) == 2 * 2 * 2 + 2  # 2 layers × (q, k) × (A, B) + llama_proj weight, bias
    assert step["active_adapters"] == ["default", "checkpoint_stage3"] and step["frozen_qv_adapter_active"]


def test_a_changed_value_is_caught(tmp_path):
    """The key check compares values: a tensor that did not load to the file's value is listed."""
    from tests.tiny import build_tiny_model

    model = build_tiny_model()
    folder = tmp_path / fsl.LLAMA_DIR
    fsl.write_llama(folder, fsl.TINY.__class__(**{**fsl.TINY.__dict__, "layers": 2, "vocab": 512}),
                    fsl.TiledNoise(), fsl.tokenizer_source(True)[0])
    result = fsl.verify_llama(model, folder)  # a random model, not loaded from the files
    assert result["equal"] == 0 and len(result["different"]) == 2 * 9 + 3
    assert result["inv_freq_reported"] == 2  # the true rotary buffers equal the recomputed ones


def test_watchdog_stops_a_phase_over_the_memory_limit(run):
    """A child whose RssAnon passes --abort-gib is killed (protects a 24 GiB machine at full size)."""
    _, _, files = run
    result = fsl.run_phase("train", files, tiny=True, abort_gib=0.05)
    assert result["aborted"] == "RssAnon passed 0.05 GiB (watchdog)" and result["watchdog_peak_gib"] > 0.05


def test_markdown_section_renders_the_json(run, tmp_path, capsys):
    _, summary, _ = run
    path = tmp_path / "full_size_load.json"
    path.write_text(json.dumps(dict(summary, notes="A hand-written note.")))
    assert fsl.main([str(path), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("## Full-size loading from real-format files (CPU)\n")
    train = summary["train"]
    assert (f"| `train.py` | {train['load_s']:.1f} s | {train['peak_rss_anon_gib']:.2f} GiB | {train['ratio']:.2f} |"
            in text)
    assert "A hand-written note." in text and "all matched or reported: True / True" in text
    assert f"loss **{summary['step']['losses'][0]:.3f}**" in text and "before the meta-device ViT" not in text
