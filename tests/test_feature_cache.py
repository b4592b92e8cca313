"""The frozen-ViT feature cache: one file per distinct image, exact tower tokens, keyed by content + weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.data.datasets import TaskDataset, collate_samples
from minigpt4.data.feature_cache import VisualFeatureCache
from minigpt4.io import file_sha256
from tests.tiny import build_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def write_pngs(folder, n):
    """n distinct 8-bit grayscale slices; returns their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"slice_{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_fill_stores_exact_tower_tokens_once_per_distinct_image(model, tmp_path):
    paths = write_pngs(tmp_path, 3)
    duplicate = tmp_path / "copy_of_0.png"
    duplicate.write_bytes(open(paths[0], "rb").read())
    cache = VisualFeatureCache(tmp_path / "cache", model)
    lookup = cache.fill(paths + [str(duplicate)], batch_size=2)
    assert lookup.keys[3] == lookup.keys[0] == file_sha256(paths[0])  # same bytes, same entry
    files = sorted(cache.folder.glob("*/*.safetensors"))
    assert len(files) == 3 and (cache.folder / "info.json").is_file()
    assert cache.folder.name.endswith("_112px_float32")
    images = torch.stack([model.image_transform(Image.open(p)) for p in paths])
    with torch.no_grad():
        expected = model.encode_tower(images)
    for i in range(3):
        assert lookup[i].dtype == torch.float32 and lookup[i].shape == (65, 64)
        assert torch.allclose(lookup[i], expected[i], atol=1e-6)
    assert torch.equal(lookup[3], lookup[0])
    # bf16 autocast: stored in bf16, the dtype llama_proj would cast its input to
    bf16 = VisualFeatureCache(tmp_path / "cache", model, autocast_dtype=torch.bfloat16)
    assert bf16.folder != cache.folder and bf16.fill(paths[:1], batch_size=1)[0].dtype == torch.bfloat16


def test_other_tower_weights_use_another_folder_and_trainable_towers_are_refused(model, tmp_path):
    other = build_tiny_model(seed=1)
    assert VisualFeatureCache(tmp_path, other).folder != VisualFeatureCache(tmp_path, model).folder
    assert VisualFeatureCache(tmp_path, build_tiny_model()).folder == VisualFeatureCache(tmp_path, model).folder
    with pytest.raises(ValueError, match="frozen vision tower"):
        VisualFeatureCache(tmp_path, build_tiny_model(**{"vision.trainable": True}))


def test_dataset_delivers_cached_tokens_and_bad_files_are_named(model, tmp_path):
    paths = write_pngs(tmp_path, 2)
    records = [{"image": p, "target": "pancreas", "bbox": [1, 2, 10, 20], "width": 48, "height": 40} for p in paths]
    dataset = TaskDataset(records, "pancreas_detection", model.image_transform, train=False)
    dataset.tower_features = VisualFeatureCache(tmp_path / "cache", model).fill(paths, batch_size=4)
    batch = collate_samples([dataset[0], dataset[1]])
    assert "images" not in batch and batch["tower_tokens"].shape == (2, 65, 64)
    assert batch["answers"][0] == "{<2><5><20><50>}"
    damaged = dataset.tower_features.path(1)
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match=f"feature cache file {damaged} is unreadable"):
        dataset[1]
    damaged.unlink()
    with pytest.raises(FileNotFoundError, match="feature cache file missing"):
        dataset[1]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(OSError, match="cannot read image .*bad.png"):
        VisualFeatureCache(tmp_path / "cache", model).fill([str(bad)], batch_size=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bf16_autocast_cached_tokens_give_a_bit_identical_loss(tmp_path, dtype):
    """Stored in the autocast dtype, the cached tokens are exactly what llama_proj would see live."""
    model = build_tiny_model(dtype=dtype)
    paths = write_pngs(tmp_path, 2)
    lookup = VisualFeatureCache(tmp_path / "cache", model, autocast_dtype=torch.bfloat16).fill(paths, batch_size=2)
    images = torch.stack([model.image_transform(Image.open(p)) for p in paths])
    instructions, answers = ["[refer] Where is the pancreas?"] * 2, ["{<12><34><56><78>}", "{<1><2><3><4>}"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        live = model(images, instructions, answers).loss
        cached = model(None, instructions, answers, tower_tokens=torch.stack([lookup[0], lookup[1]])).loss
    assert torch.equal(live, cached)


def test_ranks_split_the_missing_images_by_key_whatever_the_timing(model, tmp_path):
    paths = write_pngs(tmp_path, 6)
    cache = VisualFeatureCache(tmp_path / "cache", model)
    lookup = cache.fill(paths, batch_size=4, rank=1, world_size=2)  # rank 1 first: the order must not matter

    def written():
        return {p.stem for p in cache.folder.glob("*/*.safetensors")}

    assert written() == {k for k in lookup.keys if int(k[:8], 16) % 2 == 1} and 0 < len(written()) < 6
    cache.fill(paths, batch_size=4, rank=0, world_size=2)
    assert written() == set(lookup.keys)


class CountingTower:
    """Counts the images that go through ``model.encode_tower`` while active."""

    def __init__(self, model) -> None:
        self.model, self.images = model, 0

    def __enter__(self):
        original = type(self.model).encode_tower

        def counted(images):
            self.images += images.shape[0]
            return original(self.model, images)

        self.model.encode_tower = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.model.encode_tower


def test_validation_and_evaluation_encode_each_image_once_and_answer_the_same(model, tmp_path):
    """Evaluation reads the tower tokens from the cache from the second call on; answers and P(yes) unchanged."""
    from minigpt4.evaluation import predict_classification, predict_detection, validation_score

    paths = write_pngs(tmp_path, 5)
    det = [{"image": p, "target": "pancreas", "bbox": [1, 2, 10, 20], "width": 48, "height": 40, "dataset": "MSD",
            "volume_name": f"v{i}.nii.gz", "slice_index": i, "q_id": i} for i, p in enumerate(paths)]
    tc = [{**r, "answer": "yes" if i % 2 else "no"} for i, r in enumerate(det)]
    with CountingTower(model) as live_count:
        live_score, live_metrics = validation_score(model, det, "pancreas_detection", batch_size=2)
        live_tc = predict_classification(model, tc, batch_size=2, with_probability=True)
    # generate and yes_probability share one tower pass per batch
    assert live_count.images == 5 + 5

    cache = VisualFeatureCache(tmp_path / "cache", model)  # no autocast, like validation
    with CountingTower(model) as first:
        score, metrics = validation_score(model, det, "pancreas_detection", batch_size=2, feature_cache=cache)
    assert first.images == 5  # encoded while filling the cache
    with CountingTower(model) as again:
        score_again, _ = validation_score(model, det, "pancreas_detection", batch_size=2, feature_cache=cache)
        cached_tc = predict_classification(model, tc, batch_size=3, with_probability=True, feature_cache=cache)
        cached_det = predict_detection(model, det[::-1], "pancreas_detection", batch_size=4, feature_cache=cache)
    assert again.images == 0  # the same files: nothing goes through the tower
    assert score == score_again == live_score and metrics == live_metrics
    assert [r["answer"] for r in cached_tc] == [r["answer"] for r in live_tc]
    assert [r["p_yes"] for r in cached_tc] == pytest.approx([r["p_yes"] for r in live_tc], rel=1e-5)
    assert [r["answer"] for r in cached_det[::-1]] == [r["answer"] for r in predict_detection(model, det, "pancreas_detection", 5)]
