"""Training's early checks on prompts and precision: the release's inference stream is refused for
training, and frozen weights of one half precision under autocast to the other are warned about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from minigpt4.config import ConfigError, load_config
from minigpt4.training.checks import precision_mismatch
from minigpt4.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "train_configs" / "quickstart_cpu.yaml"


@pytest.mark.parametrize("weights, autocast, warned", [
    (torch.float16, torch.bfloat16, True),   # fp16 weights trained under bf16 autocast
    (torch.bfloat16, torch.float16, True),   # and the reverse
    (torch.bfloat16, torch.bfloat16, False),
    (torch.float16, torch.float16, False),   # the release's fp16 + fp16 autocast
    (torch.float32, torch.bfloat16, False),  # fp32 weights: autocast is the point
    (torch.bfloat16, None, False),
])
def test_precision_mismatch_names_both_settings(weights, autocast, warned):
    message = precision_mismatch(weights, autocast)
    assert (message is not None) == warned
    if warned:
        assert "model.dtype" in message and "run.amp" in message


def test_training_warns_about_fp16_weights_under_bf16_autocast_before_anything_heavy(tmp_path, caplog):
    cfg = load_config(QUICKSTART, [f"datasets.synthetic.root={tmp_path / 'absent'}", f"run.output_dir={tmp_path / 'out'}",
                                   "model.dtype=fp16", "run.amp=bf16", "run.device=cpu"])
    with caplog.at_level(logging.WARNING, logger="minigpt4.training.trainer"), pytest.raises(FileNotFoundError):
        train(cfg)  # the records are missing: it stops right after the checks
    assert any("model.dtype gives fp16 weights but run.amp autocasts to bf16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cfg.model.dtype = "bf16"
    with caplog.at_level(logging.WARNING, logger="minigpt4.training.trainer"), pytest.raises(FileNotFoundError):
        train(cfg)
    assert not any("run.amp autocasts" in r.getMessage() for r in caplog.records)


def test_training_refuses_the_release_inference_stream(tmp_path):
    cfg = load_config(QUICKSTART, [f"run.output_dir={tmp_path / 'out'}", "model.prompts.wording=release"])
    with pytest.raises(ConfigError, match="model.prompts.wording=release is the release's inference stream"):
        train(cfg)
    assert not (tmp_path / "out").exists()
