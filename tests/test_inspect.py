"""python -m minigpt4.inspect: full-size parameter counts on the meta device, no weight files."""

from __future__ import annotations

import json
from pathlib import Path

from minigpt4.commands.inspect import main


def run(capsys, tmp_path: Path, options=()):
    cfg = tmp_path / "full.yaml"
    # full size, with weight paths that do not exist: inspect must never open them
    cfg.write_text("model:\n  vision:\n    weights: weights/eva_vit_g.pth\n  text:\n    path: weights/Llama-2-7b-chat-hf\n"
                   "  init_from: weights/checkpoint_stage3.pth\n")
    assert main(["--cfg-path", str(cfg), *(["--options", *options] if options else [])]) == 0
    return json.loads(capsys.readouterr().out)


def test_full_size_numbers(capsys, tmp_path):
    report = run(capsys, tmp_path)
    assert report["vision_params"] == 986_975_872
    assert report["llm_params"] == 6_738_415_616
    assert report["proj_params"] == 23_072_768
    assert report["lora_params"] == 33_554_432
    assert report["trainable_params"] == 23_072_768 + 33_554_432
    assert report["total_params"] == 986_975_872 + 2 * 1408 + 6_738_415_616 + 23_072_768 + 33_554_432
    assert report["visual_tokens"] == 256 and report["lora_targets"] == ["q_proj", "k_proj"]
    assert report["weights_bf16_gib"] == round(report["total_params"] * 2 / 2**30, 2) == 14.5


def test_release_targets_and_smaller_rank(capsys, tmp_path):
    report = run(capsys, tmp_path, ["model.lora.target_modules=[q_proj,v_proj]", "model.lora.r=16"])
    assert report["lora_targets"] == ["q_proj", "v_proj"] and report["lora_params"] == 32 * 2 * 16 * (4096 + 4096)
