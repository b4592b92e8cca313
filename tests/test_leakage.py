"""Leakage between datasets (minigpt4/provenance.py): hand-made split.json files where a
test volume of one dataset is a training volume of another, directly or up the checkpoint chain,
checked against the provenance each checkpoint records (not against today's folders)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minigpt4.config import load_config
from minigpt4.provenance import (
    LeakageError,
    ProvenanceError,
    check_checkpoint_against,
    check_evaluation,
    check_training_config,
    split_keys,
    training_provenance,
)
from minigpt4.models.checkpoints import FORMAT, PROVENANCE_KEY, read_metadata


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


def _checkpoint(folder: Path, provenance: dict | None = None, config: Path | None = None) -> Path:
    """A project checkpoint folder: ``model.safetensors`` with this project's header (the guard
    reads only the header) and, when given, the training config beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "lora_alpha": "16.0", "adapter_stack": "[]"}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance)
    save_file({"llama_proj.bias": torch.zeros(2)}, str(folder / "model.safetensors"), metadata=metadata)
    if config is not None:
        shutil.copy(config, folder / "config.yaml")
    return folder


def _trained(tmp_path: Path, name: str, datasets: dict, **model) -> Path:
    """A checkpoint whose provenance is what a training run of ``datasets`` records now."""
    config = _config(tmp_path / f"{name}_config", datasets, **model)
    cfg = load_config(config, [f"run.output_dir={tmp_path / name}"])
    return _checkpoint(tmp_path / name / "checkpoint_best", training_provenance(cfg), config)


def test_evaluation_stops_on_a_volume_the_checkpoint_chain_trained_on(folders, tmp_path):
    stage1 = _trained(tmp_path, "run1", {"msd": (folders["msd"], "pancreas_detection")})
    stage2 = _trained(tmp_path, "run2", {"tc": (folders["tc"], "tumor_classification")}, init_from=stage1)
    cfg = load_config(_config(tmp_path / "eval", {"tc": (folders["tc"], "tumor_classification")}, ckpt=stage2))
    with pytest.raises(LeakageError) as info:
        check_evaluation(cfg, ["tc"], "test", cfg.model.ckpt)
    text = str(info.value)
    # exactly one leak: pancreas_001 (stage 1 train, TC test); PANCREAS_0002 was never trained on
    assert text.startswith("1 test volume(s) were used for training:")
    assert f"MSD pancreas_001 is in datasets.tc test but trained on by datasets.msd of checkpoint {stage1} " \
           f"(an ancestor of checkpoint {stage2}) ({folders['msd']}, train)" in text
    assert "PANCREAS_0002" not in text
    check_evaluation(cfg, ["tc"], "train", cfg.model.ckpt)  # evaluating the train split is not a leak check
    # ABD: the scan shared with MSD's training split is found through the manifest's overlap
    abd_cfg = load_config(_config(tmp_path / "eval_abd", {"abd": (folders["abd"], "organ_detection")}, ckpt=stage1))
    with pytest.raises(LeakageError, match="MSD pancreas_002 is in datasets.abd test"):
        check_evaluation(abd_cfg, ["abd"], "test", abd_cfg.model.ckpt)


def test_checkpoint_records_train_and_val_keys_and_its_ancestors(folders, tmp_path):
    """The record is in the safetensors header: it reads back without a model and survives a copy."""
    stage1 = _trained(tmp_path, "run1", {"msd": (folders["msd"], "pancreas_detection")})
    stage2 = _trained(tmp_path, "run2", {"tc": (folders["tc"], "tumor_classification")}, init_from=stage1)
    copy = tmp_path / "elsewhere" / "checkpoint_best"
    shutil.copytree(stage2, copy)
    kind, _, metadata = read_metadata(copy)
    record = json.loads(metadata[PROVENANCE_KEY])
    assert kind == "project" and [r["run"] for r in record["runs"]] == [str(tmp_path / "run2"), str(tmp_path / "run1")]
    assert record["runs"][1]["checkpoint"] == str(stage1)
    tc = record["runs"][0]["datasets"]["tc"]
    assert tc["train"] == [["MSD", "pancreas_003"], ["NIH", "PANCREAS_0001"]] and tc["val"] == []
    assert record["runs"][1]["datasets"]["msd"]["train"] == [["MSD", "pancreas_001"], ["MSD", "pancreas_002"]]


def test_a_resplit_folder_does_not_hide_what_the_checkpoint_trained_on(tmp_path):
    """Re-preparing with another --seed --overwrite moves volumes from train to test; the checkpoint
    trained on the old split is caught by its recorded keys, naming the volumes and the checkpoint."""
    from preprocessing import pipeline, synthetic

    raw = synthetic.generate(tmp_path / "raw", scheme="msd", n=10, n_slices=24, size=64, seed=0, log=lambda *a: None)

    def prepare(seed: int) -> dict:
        opts = pipeline.Options(dataset="MSD", images=[raw["images"]], labels=raw["labels"], out=str(tmp_path / "prep"),
                                seed=seed, overwrite=True)
        pipeline.prepare(opts, log=lambda *a: None)
        return json.loads((tmp_path / "prep" / "annotations" / "split.json").read_text())

    old = prepare(42)
    ckpt = _trained(tmp_path, "run", {"msd": (str(tmp_path / "prep"), "pancreas_detection")})
    new = prepare(7)
    moved = sorted(set(old["train"]) & set(new["test"]))
    assert moved, "the test needs a volume that moved from train to test"
    cfg = load_config(_config(tmp_path / "eval", {"msd": (str(tmp_path / "prep"), "pancreas_detection")}, ckpt=ckpt))
    with pytest.raises(LeakageError) as info:
        check_evaluation(cfg, ["msd"], "test", cfg.model.ckpt)
    text = str(info.value)
    moved_val = sorted(set(old["val"]) & set(new["test"]))  # selected on: a leak into test too
    assert text.startswith(f"{len(moved) + len(moved_val)} test volume(s) were used for training:")
    for name in moved:
        assert f"MSD {name} is in datasets.msd test but trained on by datasets.msd of checkpoint {ckpt} " in text
    for name in moved_val:
        assert f"MSD {name} is in datasets.msd test but validated on by datasets.msd of checkpoint {ckpt} " in text


def test_own_checkpoint_without_provenance_is_refused_unless_allowed(folders, tmp_path, caplog):
    config = _config(tmp_path / "old_config", {"msd": (folders["msd"], "pancreas_detection")})
    old = _checkpoint(tmp_path / "old" / "checkpoint_best", provenance=None, config=config)
    tc_test = split_keys(folders["tc"], "test")
    with pytest.raises(ProvenanceError) as info:
        check_checkpoint_against(old, tc_test)
    assert str(info.value).startswith(f"{old / 'model.safetensors'}: checkpoint without recorded provenance")
    assert "--allow-unknown-provenance" in str(info.value)
    # allowed: checked against its config.yaml and today's folders (MSD pancreas_001 is in TC test)
    with caplog.at_level(logging.WARNING, logger="minigpt4.provenance"):
        with pytest.raises(LeakageError, match="MSD pancreas_001 is in the evaluated test set but trained on by "
                                               r"datasets.msd of checkpoint .*today's folder"):
            check_checkpoint_against(old, tc_test, allow_unknown=True)
        report = check_checkpoint_against(old, {("NIH", "PANCREAS_0002")}, allow_unknown=True)
    assert report.leaks == [] and report.unknown == [
        f"provenance not recorded: {old} is checked against its config.yaml and today's folders (--allow-unknown-provenance)"]
    # the same through the eval config check, and training from it
    cfg = load_config(_config(tmp_path / "eval", {"tc": (folders["tc"], "tumor_classification")}, ckpt=old))
    with pytest.raises(ProvenanceError):
        check_evaluation(cfg, ["tc"], "test", cfg.model.ckpt)
    train_cfg = load_config(_config(tmp_path / "next", {"msd": (folders["msd"], "pancreas_detection")}, init_from=old))
    with pytest.raises(ProvenanceError):
        training_provenance(train_cfg)
    assert training_provenance(train_cfg, allow_unknown=True)["runs"][1]["recorded"] is False
    # its config.yaml's init_from gone: reported as unknown, the rest still checked
    gone = _config(tmp_path / "gone_config", {"msd": (folders["msd"], "pancreas_detection")}, init_from=tmp_path / "deleted")
    orphan = _checkpoint(tmp_path / "orphan", provenance=None, config=gone)
    assert check_checkpoint_against(orphan, {("NIH", "PANCREAS_0002")}, allow_unknown=True).unknown[1] == (
        f"provenance unknown: {tmp_path / 'deleted'} (named in {orphan}'s config.yaml, not found); the leakage check "
        "cannot tell which volumes it was trained on")
    # a checkpoint folder without config.yaml no longer passes silently
    bare = _checkpoint(tmp_path / "bare", provenance=None)
    with pytest.raises(ProvenanceError):
        check_checkpoint_against(bare, tc_test)
    assert check_checkpoint_against(bare, tc_test, allow_unknown=True).unknown[0].startswith(f"provenance unknown: {bare}")


def test_foreign_checkpoint_logs_provenance_unknown(folders, tmp_path, caplog):
    stage3 = tmp_path / "checkpoint_stage3.pth"
    torch.save({"model": {"llama_proj.bias": torch.zeros(2)}}, stage3)
    with caplog.at_level(logging.WARNING, logger="minigpt4.provenance"):
        report = check_checkpoint_against(stage3, split_keys(folders["tc"], "test"), label="stage pancreas_detection")
    line = f"provenance unknown: {stage3} (a foreign checkpoint (checkpoint_stage3.pth)); the leakage check cannot tell " \
           "which volumes it was trained on"
    assert report.unknown == [line] and report.leaks == []
    assert [r.getMessage() for r in caplog.records] == [f"stage pancreas_detection: {line}"]
    # a stage trained from it records the unknown ancestor, and the chain still reports it
    stage1 = _trained(tmp_path, "run1", {"msd": (folders["msd"], "pancreas_detection")}, init_from=stage3)
    assert check_checkpoint_against(stage1, set()).unknown == [line]


def test_chain_ancestor_train_volume_is_caught_from_the_record(folders, tmp_path):
    """Stage 3 ← stage 2 ← stage 1: stage 1's MSD training volume in the evaluated set is found through
    stage 3's own record, even with stage 1's and stage 2's folders gone."""
    stage1 = _trained(tmp_path, "run1", {"msd": (folders["msd"], "pancreas_detection")})
    stage2 = _trained(tmp_path, "run2", {"tc": (folders["tc"], "tumor_classification")}, init_from=stage1)
    stage3 = _trained(tmp_path, "run3", {"tc": (folders["tc"], "tumor_classification")}, init_from=stage2)
    shutil.rmtree(tmp_path / "run1")
    shutil.rmtree(tmp_path / "run2")
    with pytest.raises(LeakageError) as info:
        check_checkpoint_against(stage3, {("MSD", "pancreas_002"): "cascade test", ("NIH", "PANCREAS_0009"): "cascade test"},
                                 label="stage tumor_detection")
    assert str(info.value).splitlines()[:2] == [
        f"stage tumor_detection: checkpoint {stage3}: 1 test volume(s) were used for training:",
        (f"  MSD pancreas_002 is in cascade test but trained on by datasets.msd of checkpoint {stage1} "
         f"(an ancestor of checkpoint {stage3}) ({folders['msd']}, train)")]
    assert check_checkpoint_against(stage3, {("NIH", "PANCREAS_0009")}).leaks == []


def test_eval_parser_has_the_provenance_flag():
    from minigpt4.commands.evaluate import build_parser

    for kind in ("detection", "classification"):
        parser = build_parser(kind)
        assert parser.parse_args(["--cfg-path", "x.yaml", "--allow-unknown-provenance"]).allow_unknown_provenance is True
        assert parser.parse_args(["--cfg-path", "x.yaml"]).allow_unknown_provenance is False


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
