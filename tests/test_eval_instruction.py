"""The evaluation instruction hook (``run.eval_instruction``): the zero-shot MiniGPT-v2 baseline
is asked with the release's exact wording, everything else with the paper's first instruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.config import ConfigError, load_config
from minigpt4.data.datasets import TaskDataset
from minigpt4.data.transforms import ImageTransform
from minigpt4.evaluation.detection import predict_detection
from minigpt4.prompts import CLASSIFICATION_QUESTIONS, DETECTION_TEMPLATES, RELEASE_EVAL_QUESTION, RELEASE_EVAL_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]


class RecordingModel(torch.nn.Module):
    """Test double: records the instructions it is asked, answers one fixed box."""

    def __init__(self) -> None:
        super().__init__()
        self.image_transform = ImageTransform(28)
        self.asked: list[str] = []

    def encode_tower(self, images):
        return images

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        self.asked.extend(instructions)
        return ["{<10><10><50><50>}"] * len(instructions)


def _records(tmp_path: Path) -> list[dict]:
    image = tmp_path / "slice.png"
    Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(image)
    common = {"dataset": "MSD", "volume_name": "pancreas_001.nii.gz", "image": str(image), "width": 40, "height": 40}
    return [{**common, "q_id": 0, "slice_index": 3, "target": "pancreas", "bbox": [4, 4, 20, 20]},
            {**common, "q_id": 1, "slice_index": 4, "target": "tumor", "bbox": [8, 8, 12, 12]}]


def test_baseline_config_uses_the_release_wording_the_others_the_paper():
    from minigpt4.commands.evaluate import eval_prompts

    baseline = load_config(ROOT / "eval_configs" / "minigptv2_baseline.yaml")
    assert baseline.model.prompts.wording == "release" and baseline.run.eval_instruction is None
    assert eval_prompts(baseline) == (RELEASE_EVAL_TEMPLATE, RELEASE_EVAL_QUESTION)
    assert RELEASE_EVAL_TEMPLATE == "[refer] give me the location of the {}"
    for name in ("stage1_pancreas_detection", "stage2_tumor_classification", "stage3_tumor_detection", "abd_organ_detection"):
        cfg = load_config(ROOT / "eval_configs" / f"{name}.yaml")
        assert cfg.run.eval_instruction is None and cfg.model.prompts.wording == "paper", name
        assert eval_prompts(cfg) == (DETECTION_TEMPLATES[0], CLASSIFICATION_QUESTIONS[0]), name
    # run.eval_instruction still overrides the wording's detection instruction
    override = load_config(ROOT / "eval_configs" / "minigptv2_baseline.yaml", ["run.eval_instruction=where is the {}?"])
    assert eval_prompts(override) == ("where is the {}?", RELEASE_EVAL_QUESTION)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(ROOT / "eval_configs" / "minigptv2_baseline.yaml", ["run.eval_instruction=where is the pancreas"])
    with pytest.raises(ConfigError, match="model.prompts.wording must be one of paper, release"):
        load_config(ROOT / "eval_configs" / "minigptv2_baseline.yaml", ["model.prompts.wording=chat"])


def test_classification_asks_the_configured_question(tmp_path):
    from minigpt4.evaluation.classification import predict_classification

    image = tmp_path / "crop.png"
    Image.fromarray(np.full((30, 20), 90, dtype=np.uint8)).save(image)
    records = [{"dataset": "MSD", "volume_name": "pancreas_001", "slice_index": 3, "q_id": 0, "image": str(image),
                "answer": "yes", "width": 20, "height": 30}]
    model = RecordingModel()
    rows = predict_classification(model, records, batch_size=1, with_probability=False, question=RELEASE_EVAL_QUESTION)
    assert model.asked == [RELEASE_EVAL_QUESTION] and rows[0]["question"] == RELEASE_EVAL_QUESTION
    model.asked.clear()
    predict_classification(model, records, batch_size=1, with_probability=False)
    assert model.asked == [CLASSIFICATION_QUESTIONS[0]]


def test_evaluation_asks_with_the_configured_template(tmp_path):
    records = _records(tmp_path)
    model = RecordingModel()
    rows = predict_detection(model, records, "pancreas_detection", batch_size=2, instruction=RELEASE_EVAL_TEMPLATE)
    release = ["[refer] give me the location of the pancreas", "[refer] give me the location of the pancreatic tumor"]
    assert model.asked == release and [r["question"] for r in rows] == release
    model.asked.clear()
    predict_detection(model, records, "pancreas_detection", batch_size=2)
    assert model.asked == ["[refer] Give me the location of the pancreas", "[refer] Give me the location of the pancreatic tumor"]
    assert DETECTION_TEMPLATES[0] == "[refer] Give me the location of the {}"
    # training ignores it: the paper's 8 instructions are drawn
    train = TaskDataset(records, "pancreas_detection", ImageTransform(28), train=True, eval_instruction=RELEASE_EVAL_TEMPLATE)
    drawn = {train.instruction(0, draw=k) for k in range(40)}
    assert drawn == {t.format("pancreas") for t in DETECTION_TEMPLATES}
