"""The inference pipeline (issue 20): encode once, the patient decision, the box rule, chunking.

Encode once runs the real tiny stages (random checkpoints); the decision and the box rule use a
scripted double whose answers depend on each slice's brightness, so every number is known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minigpt4.data.transforms import ImageTransform
from minigpt4.inference.pipeline import CascadeSettings, SingleModel, answer_box, run_stages, scan_slices
from tests.test_feature_cache import CountingTower
from tests.tiny import random_checkpoints, tiny_model_config

STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")


@pytest.mark.parametrize("vit_trainable", [False, True])
def test_encode_once_answers_as_encoding_per_stage(tmp_path, vit_trainable):
    """Frozen shared ViT: 2 tower passes per asked slice (slice + crop) instead of 3, same answers.
    Stages with their own ViT (``vision.trainable``) must fall back to one pass per stage."""
    from minigpt4.models.stages import load_stages

    torch.set_num_threads(1)
    cfg = tiny_model_config(max_new_tokens=4, **{"vision.trainable": vit_trainable})
    stages = load_stages(cfg, random_checkpoints(tmp_path, cfg, STAGES))
    assert stages.shares_tower is (not vit_trainable)
    slices = list(np.random.default_rng(0).integers(0, 255, size=(5, 64, 64), dtype=np.uint8))
    # whole-slice fallback and threshold 0: every slice reaches all three stages whatever the random answers
    settings = CascadeSettings(threshold=0.0, batch_size=2, whole_slice_fallback=True)
    gt_tumor = [False, True, False, False, True]  # stage 3 "alone" reads the shared tokens too
    runs = {}
    for encode_once in (False, True):
        with CountingTower(stages.model) as count:
            rows = run_stages(stages, slices, settings, gt_tumor_slices=gt_tumor, encode_once=encode_once)
        runs[encode_once] = ([r.record() for r in rows], count.images)
    assert all(r["tumor_asked"] and r["tumor_answer"] is not None for r in runs[True][0])
    if vit_trainable:  # stage 3 on stage 1's ViT tokens is not stage 3: why the default falls back
        assert [r["tumor_answer"] for r in runs[True][0]] != [r["tumor_answer"] for r in runs[False][0]]
    else:
        assert runs[True][0] == runs[False][0]
    assert runs[False][1] == 5 + 5 + 5 + 2  # stage 1, stage 2, stage 3 (+ 2 "alone" runs)
    assert runs[True][1] == 5 + 5  # stage 1 tokens reused by stage 3; stage 2 encodes its inputs
    with CountingTower(stages.model) as count:
        run_stages(stages, slices, settings)  # the default follows stages.shares_tower
    assert count.images == (15 if vit_trainable else 10)


class BrightnessModel:
    """Scripted double: a pancreas box on bright slices (mean > 0 after CLIP normalisation), a
    tumor box everywhere, P(yes) = sigmoid(mean of channel 0); records every call."""

    image_transform = ImageTransform(16)

    def __init__(self, box: str = "{<25><25><75><75>}") -> None:
        self.box, self.calls = box, []

    def encode_tower(self, images):
        self.calls.append("encode_tower")
        return images

    def generate(self, images, instructions, max_new_tokens=None, tower_tokens=None):
        images = tower_tokens if images is None else images
        self.calls.append("generate")
        if "tumor" in instructions[0]:
            return ["{<40><40><60><60>}"] * len(instructions)
        return [self.box if float(m) > 0 else "no idea" for m in images[:, 0].mean(dim=(1, 2))]

    def yes_probability(self, images, questions):
        self.calls.append("yes_probability")
        return torch.sigmoid(images[:, 0].mean(dim=(1, 2)))


def volume(levels) -> np.ndarray:
    return np.stack([np.full((40, 40), v, np.uint8) for v in levels])


def test_patient_decision_tumor_no_tumor_and_inconclusive():
    stages = SingleModel(BrightnessModel())
    # slice levels 250 and 200 are bright (pancreas box), 10 is dark (no box)
    result = scan_slices(stages, volume([10, 250, 200]), CascadeSettings(threshold=0.5, batch_size=2))
    assert [r.classified_on for r in result.slices] == ["no pancreas box", "pancreas crop", "pancreas crop"]
    assert result.slices[0].p_tumor is None and result.slices[1].crop_box == (10, 10, 30, 30)  # ceil(25·40/100), ceil(76·40/100) − 1
    p = [r.p_tumor for r in result.slices]
    assert p[1] > p[2] > 0.5
    patient = result.patient
    assert (patient.decision, patient.n_slices_boxed, patient.score) == ("tumor", 2, p[1])
    assert [r.tumor_asked for r in result.slices] == [False, True, True]
    assert result.slices[1].tumor_box == (16.0, 16.0, 24.0, 24.0)
    high = scan_slices(stages, volume([10, 250, 200]), CascadeSettings(threshold=0.999, aggregation="top_k_mean", top_k=2))
    assert high.patient.decision == "no tumor" and high.patient.score == pytest.approx((p[1] + p[2]) / 2)
    # no slice gets a pancreas box: inconclusive, not "no tumor"; stages 2 and 3 never run
    model = BrightnessModel()
    dark = scan_slices(SingleModel(model), volume([10, 20, 30]), CascadeSettings(threshold=0.5))
    assert (dark.patient.decision, dark.patient.n_slices_boxed, dark.patient.score) == ("inconclusive", 0, 0.0)
    assert not dark.patient.tumor and "yes_probability" not in model.calls


def test_a_box_needs_a_positive_area():
    assert answer_box("{<10><20><30><40>}", 100, 50) == ((10, 20, 30, 40), (10.0, 10.0, 30.0, 20.0))
    for no_box in ("{<0><0><0><0>}", "{<80><20><10><90>}", "{<40><40><40><90>}", "no idea", None):
        assert answer_box(no_box, 100, 50) is None, no_box
    # reversed corners used to reach the crop as an empty array; now the slice simply has no box
    result = scan_slices(SingleModel(BrightnessModel("{<80><20><10><90>}")), volume([250]), CascadeSettings())
    assert result.slices[0].crop_box is None and result.patient.decision == "inconclusive"


def test_chunks_keep_slice_indices_and_answers():
    levels = [250, 10, 200, 240, 30, 220, 15]
    settings = CascadeSettings(threshold=0.5, batch_size=2)
    seen = []
    chunked = scan_slices(SingleModel(BrightnessModel()), volume(levels), settings, progress=lambda f, d: seen.append(f),
                          chunk=4)
    whole = scan_slices(SingleModel(BrightnessModel()), volume(levels), settings, chunk=100)
    assert [r.slice_index for r in chunked.slices] == list(range(7))
    assert [r.record() for r in chunked.slices] == [r.record() for r in whole.slices]
    assert seen == [0.0, 4 / 7, 1.0] and chunked.patient == whole.patient


def test_stage3_gate_is_the_slice_threshold_not_the_patient_threshold():
    """``slice_threshold`` (chosen on val slices) gates stage 3; the patient threshold (chosen on
    aggregated volume scores) only decides tumor / no tumor (issue 18 item 7)."""
    stages = SingleModel(BrightnessModel())
    base = scan_slices(stages, volume([10, 250, 200]), CascadeSettings(threshold=0.5))
    p = [r.p_tumor for r in base.slices]
    gate = (p[1] + p[2]) / 2  # between the two boxed slices' P(tumor)
    split = scan_slices(stages, volume([10, 250, 200]), CascadeSettings(threshold=0.999, slice_threshold=gate))
    assert [r.tumor_asked for r in split.slices] == [False, True, False]
    assert split.patient.decision == "no tumor" and split.patient.threshold == 0.999  # the patient threshold decides


def test_settings_from_the_cascade_config():
    from minigpt4.config import CascadeConfig

    settings = CascadeSettings.from_config(CascadeConfig(threshold=0.3, slice_threshold=0.2, aggregation="top_k_mean",
                                                         top_k=2, crop_margin=4, min_boxed_slices=3), batch_size=5)
    assert (settings.threshold, settings.stage3_gate, settings.aggregation, settings.top_k, settings.crop_margin,
            settings.min_boxed_slices, settings.batch_size) == (0.3, 0.2, "top_k_mean", 2, 4, 3, 5)
    default = CascadeSettings.from_config(CascadeConfig())
    assert (default.threshold, default.stage3_gate, default.aggregation) == (0.5, 0.5, "max")
    assert settings.describe() == ("patient threshold 0.3 on the top_k_mean of slice P(tumor) (top 2), stage 3 asked "
                                   "where slice P(tumor) >= 0.2; inconclusive when fewer than 3 slice(s) keep a pancreas box")
