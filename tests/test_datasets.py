"""TaskDataset / collate_samples / MixPlan: answers, instructions, batching, bad input."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.data.datasets import MixedDataset, TaskDataset, check_records, collate_samples
from minigpt4.data.transforms import ImageTransform
from minigpt4.prompts import CLASSIFICATION_QUESTIONS, DETECTION_TEMPLATES
from minigpt4.training.sampler import MixPlan


def _png(path, width=64, height=32, value=100):
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def det_records(tmp_path):
    records = []
    for k in range(6):
        image = _png(tmp_path / f"vol_slice_{k}.png", value=20 * k)
        records.append({"image": image, "target": "pancreas", "bbox": [16, 8, 47, 23], "width": 64, "height": 32, "q_id": k})
    records[5]["target"] = "tumor"
    return records


def test_detection_sample_answer_and_fixed_eval_instruction(det_records):
    ds = TaskDataset(det_records, "pancreas_detection", ImageTransform(28), train=False)
    sample = ds[0]
    assert set(sample) == {"image", "instruction", "answer", "record"}
    assert sample["image"].shape == (3, 28, 28)
    # x: floor(16/64*100)=25, floor(47/64*100)=73; y: floor(8/32*100)=25, floor(23/32*100)=71
    assert sample["answer"] == "{<25><25><73><71>}"
    assert sample["instruction"] == "[refer] Give me the location of the pancreas"
    assert ds[5]["instruction"] == "[refer] Give me the location of the pancreatic tumor"
    assert sample["record"] is det_records[0]


def test_train_instructions_are_random_but_reproducible(det_records):
    ds = TaskDataset(det_records * 20, "pancreas_detection", ImageTransform(14), train=True, seed=3)
    again = TaskDataset(det_records * 20, "pancreas_detection", ImageTransform(14), train=True, seed=3)
    first = [ds.instruction(i) for i in range(100)]
    assert first == [again.instruction(i) for i in range(100)]
    templates = {t.format("pancreas") for t in DETECTION_TEMPLATES} | {t.format("pancreatic tumor") for t in DETECTION_TEMPLATES}
    assert set(first) <= templates
    assert len(set(first)) >= 6  # all 8 templates are in play, not one fixed string
    ds.set_epoch(1)
    assert [ds.instruction(i) for i in range(100)] != first
    # explicit draw keys (what the trainer uses) ignore the epoch attribute
    assert ds[(2, 17)]["instruction"] == again[(2, 17)]["instruction"]


def test_classification_sample(tmp_path):
    records = [{"image": _png(tmp_path / "c.png"), "answer": "yes", "target": "tumor"}]
    ds = TaskDataset(records, "tumor_classification", ImageTransform(14), train=False)
    assert ds[0]["answer"] == "yes"
    assert ds[0]["instruction"] == CLASSIFICATION_QUESTIONS[0]
    train = TaskDataset(records, "tumor_classification", ImageTransform(14), train=True)
    assert train[0]["instruction"] in CLASSIFICATION_QUESTIONS


def test_collate(det_records):
    ds = TaskDataset(det_records, "pancreas_detection", ImageTransform(14), train=False)
    batch = collate_samples([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, 14, 14)
    assert batch["answers"] == ["{<25><25><73><71>}"] * 3
    assert len(batch["instructions"]) == 3 and [r["q_id"] for r in batch["records"]] == [0, 1, 2]
    # different pixel values → different image tensors, in order
    assert not torch.equal(batch["images"][0], batch["images"][1])


def test_missing_image_is_named_up_front(det_records, tmp_path):
    det_records[3]["image"] = str(tmp_path / "gone_slice_9.png")
    with pytest.raises(FileNotFoundError, match="gone_slice_9.png"):
        TaskDataset(det_records, "pancreas_detection", ImageTransform(14))


def test_bad_records():
    with pytest.raises(ValueError, match="empty"):
        check_records([], "pancreas_detection", source="data/MSD")
    with pytest.raises(ValueError, match="lacks keys"):
        check_records([{"image": "x.png", "target": "pancreas"}], "pancreas_detection")
    with pytest.raises(ValueError, match="unknown task"):
        check_records([{"image": "x.png"}], "segmentation")


def test_mix_plan_whole_batches_from_one_dataset_by_ratio():
    plan = MixPlan([10, 7], [3.0, 1.0], micro_batch=2, accum=1, world=1, seed=0, iters_per_epoch=400)
    choices = [plan.dataset_of_step(t) for t in range(400)]
    share = choices.count(0) / 400
    assert 0.68 < share < 0.82  # 3:1 ratio → 0.75
    for t in (0, 1, 57):
        (batch,) = plan.micro_batches(t, rank=0)
        assert len({d for d, _, _ in batch}) == 1 and batch[0][0] == choices[t]


def test_mix_plan_passes_cover_each_dataset_once():
    plan = MixPlan([5], [1.0], micro_batch=5, seed=1)
    assert plan.steps_per_epoch == 1
    seen = collections.Counter()
    for t in range(4):
        (batch,) = plan.micro_batches(t, rank=0)
        assert sorted(i for _, i, _ in batch) == [0, 1, 2, 3, 4]  # one pass per step
        seen.update(p for _, _, p in batch)
    assert max(seen.values()) == 1  # stream positions (instruction draw keys) never repeat


def test_mix_plan_ddp_layout_equals_accumulation():
    single = MixPlan([9, 4], [1.0, 1.0], micro_batch=2, accum=2, world=1, seed=5)
    ddp = MixPlan([9, 4], [1.0, 1.0], micro_batch=2, accum=1, world=2, seed=5)
    for step in range(6):
        micro = single.micro_batches(step, 0)
        assert micro == [ddp.micro_batches(step, 0)[0], ddp.micro_batches(step, 1)[0]]
    # the batch sampler resumed mid-way yields exactly the tail of the full sequence
    full = list(single.batches(0, 6, 0))
    assert list(single.batches(3, 6, 0)) == full[6:] and len(single.batches(3, 6, 0)) == 6


def test_mixed_dataset_routes(det_records):
    a = TaskDataset(det_records[:3], "pancreas_detection", ImageTransform(14), train=True, seed=0)
    b = TaskDataset(det_records[3:], "pancreas_detection", ImageTransform(14), train=True, seed=0)
    mixed = MixedDataset([a, b])
    assert len(mixed) == 6
    assert mixed[(1, 0, 4)]["record"]["q_id"] == 3
