"""The one config mechanism: YAML + --options into typed dataclasses, unknown keys are errors."""

from pathlib import Path

import pytest

from minigpt4.config import Config, ConfigError, DatasetConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_full_size_model():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.model.vision.depth, cfg.model.vision.width, cfg.model.vision.image_size) == (39, 1408, 448)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (64, 16, ["q_proj", "k_proj"])
    assert cfg.model.num_visual_tokens == 256  # 32x32 patches merged by 4
    assert (cfg.run.init_lr, cfg.run.min_lr, cfg.run.weight_decay, cfg.run.batch_size) == (1e-5, 1e-6, 0.05, 16)


def test_yaml_then_options_override_and_types(tmp_path):
    path = write(
        tmp_path,
        "datasets:\n  msd: {root: data/MSD, task: pancreas_detection}\nrun: {batch_size: 8}\n",
    )
    cfg = load_config(path, ["run.batch_size=2", "datasets.msd.sample_ratio=3", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.run.batch_size == 2
    assert cfg.datasets["msd"] == DatasetConfig(root="data/MSD", task="pancreas_detection", sample_ratio=3.0)
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["run.bacth_size=2"], "bacth_size"),
        (["model.vision.depht=2"], "depht"),
        (["run.batch_size=two"], "batch_size"),
        (["run.batch_size=0"], "batch_size must be positive"),
        (["model.dtype=float8"], "model.dtype"),
        (["run.amp"], "key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, options)


def test_unknown_task_and_missing_root_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="datasets.x.task must be one of .*, got 'segmentation'"):
        load_config(write(tmp_path, "datasets:\n  x: {root: d, task: segmentation}\n"))
    with pytest.raises(ConfigError, match="root"):
        load_config(write(tmp_path, "datasets:\n  x: {task: tumor_detection}\n"))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["run.seed=7", "datasets.tc.root=data/TC", "datasets.tc.task=tumor_classification"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_every_shipped_config_loads():
    paths = sorted((REPO / "train_configs").glob("*.yaml")) + sorted((REPO / "eval_configs").glob("*.yaml"))
    if not paths:
        pytest.skip("no configs shipped yet")
    for path in paths:
        load_config(path)


def test_training_speed_keys_default_off_and_feature_cache_needs_a_frozen_tower():
    cfg = load_config()
    assert (cfg.run.cache_visual_features, cfg.run.feature_cache_dir, cfg.run.compile) == (False, None, False)
    assert cfg.run.compile_pad_to_multiple_of == 64
    with pytest.raises(ConfigError, match="compile_pad_to_multiple_of must be positive"):
        load_config(None, ["run.compile_pad_to_multiple_of=0"])
    cfg = load_config(None, ["run.cache_visual_features=true", "run.compile=true", "run.feature_cache_dir=/tmp/f"])
    assert (cfg.run.cache_visual_features, cfg.run.feature_cache_dir, cfg.run.compile) == (True, "/tmp/f", True)
    with pytest.raises(ConfigError, match="cache_visual_features=true needs a frozen vision tower"):
        load_config(None, ["run.cache_visual_features=true", "model.vision.trainable=true"])
