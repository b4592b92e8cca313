"""Leakage between datasets (minigpt4/evaluation/leakage.py): hand-made split.json files where a
test volume of one dataset is a training volume of another, directly or up the checkpoint chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigpt4.config import load_config
from minigpt4.evaluation.leakage import LeakageError, check_evaluation, check_training_config, split_keys


def _folder(path: Path, dataset: str, split: dict, overlap: dict | None = None) -> str:
    (path / "annotations").mkdir(parents=True)
    manifest = {"dataset": dataset, "status": "complete", **({"overlap": overlap} if overlap else {})}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "annotations" / "split.json").write_text(json.dumps({"val": [], **split}))
    return str(path)


def _config(path: Path, datasets: dict, **model) -> Path:
    lines = ["datasets:"] + [f"  {n}: {{root: {root}, task: {task}}}" for n, (root, task) in datasets.items()]
    if model:
        lines += ["model:"] + [f"  {k}: {v}" for k, v in model.items()]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("\n".join(lines) + "\n")
    return path / "config.yaml"


@pytest.fixture
def folders(tmp_path):
    msd = _folder(tmp_path / "MSD", "MSD", {"train": ["pancreas_001", "pancreas_002"], "test": ["pancreas_003"]})
    # a TC folder split on its own: its test holds MSD training volume pancreas_001
    tc = _folder(tmp_path / "TC", "TC", {"train": ["pancreas_003", "PANCREAS_0001"], "test": ["pancreas_001", "PANCREAS_0002"]})
    # ABD case 7 is MSD pancreas_002 (found by content), in ABD test
    abd = _folder(tmp_path / "ABD", "ABD", {"train": ["Case_00001"], "test": ["Case_00007", "Case_00009"]},
                  overlap={"Case_00007": {"dataset": "MSD", "volume": "pancreas_002"}})
    return {"msd": msd, "tc": tc, "abd": abd}


def test_split_keys_name_volumes_by_their_source(folders):
    assert split_keys(folders["tc"], "test") == {("MSD", "pancreas_001"), ("NIH", "PANCREAS_0002")}
    assert split_keys(folders["abd"], "test") == {("MSD", "pancreas_002"), ("ABD", "Case_00009")}


def test_evaluation_stops_on_a_volume_the_checkpoint_chain_trained_on(folders, tmp_path):
    stage1 = _config(tmp_path / "run1" / "checkpoint_best", {"msd": (folders["msd"], "pancreas_detection")})
    stage2 = _config(tmp_path / "run2" / "checkpoint_best", {"tc": (folders["tc"], "tumor_classification")},
                     init_from=stage1.parent)
    cfg = load_config(_config(tmp_path / "eval", {"tc": (folders["tc"], "tumor_classification")}, ckpt=stage2.parent))
    with pytest.raises(LeakageError) as info:
        check_evaluation(cfg, ["tc"], "test", cfg.model.ckpt)
    text = str(info.value)
    # exactly one leak: pancreas_001 (stage 1 train, TC test); PANCREAS_0002 was never trained on
    assert text.startswith("1 test volume(s) were used for training:")
    assert f"MSD pancreas_001 is in datasets.tc test but trained on by datasets.msd of checkpoint {stage1.parent} " \
           f"({folders['msd']}, train)" in text
    assert "PANCREAS_0002" not in text
    check_evaluation(cfg, ["tc"], "train", cfg.model.ckpt)  # evaluating the train split is not a leak check
    # ABD: the scan shared with MSD's training split is found through the manifest's overlap
    abd_cfg = load_config(_config(tmp_path / "eval_abd", {"abd": (folders["abd"], "organ_detection")}, ckpt=stage1.parent))
    with pytest.raises(LeakageError, match="MSD pancreas_002 is in datasets.abd test"):
        check_evaluation(abd_cfg, ["abd"], "test", abd_cfg.model.ckpt)


def test_training_config_stops_on_crossed_splits(folders, tmp_path):
    cfg = load_config(_config(tmp_path / "train", {"msd": (folders["msd"], "pancreas_detection"),
                                                   "tc": (folders["tc"], "tumor_classification")}))
    with pytest.raises(LeakageError) as info:
        check_training_config(cfg)
    text = str(info.value)
    assert text.startswith("2 test volume(s) were used for training:")
    assert "MSD pancreas_003 is in datasets.msd test but trained on by datasets.tc of this config" in text
    assert "MSD pancreas_001 is in datasets.tc test but trained on by datasets.msd of this config" in text
    # one dataset alone never leaks into itself
    check_training_config(load_config(_config(tmp_path / "alone", {"msd": (folders["msd"], "pancreas_detection")})))
