"""Provenance is bound to the weights it describes, and an own checkpoint cannot pass as foreign
(issue 25, items 1 and 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minigpt4.provenance import (
    PROVENANCE_SCHEMA,
    LeakageError,
    ProvenanceError,
    check_checkpoint_against,
)
from minigpt4.commands.export import main as export_main
from minigpt4.models.checkpoints import save_checkpoint
from minigpt4.models.minigpt_v2 import build_model
from tests.test_eval_entrypoints import detect, synthetic, trained  # noqa: F401 - fixtures
from tests.tiny import tiny_model_config

torch.set_num_threads(1)
LEAKED = ("MSD", "pancreas_001")


def _provenance(*train: tuple) -> dict:
    return {"schema": PROVENANCE_SCHEMA, "runs": [{"run": "/runs/x", "datasets": {"msd": {
        "root": "/data/MSD", "task": "pancreas_detection", "train": [list(k) for k in train], "val": []}}}]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``clean``: trained on nothing; ``leaky``: trained on pancreas_001; ``none``: no provenance."""
    folder = tmp_path_factory.mktemp("ckpts")
    model = build_model(tiny_model_config())
    paths = {}
    for seed, (name, provenance) in enumerate((("clean", _provenance()), ("leaky", _provenance(LEAKED)),
                                               ("none", None))):
        with torch.no_grad():
            for p in model.trainable_parameters().values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        save_checkpoint(model, folder / name, provenance=provenance)
        paths[name] = folder / name
    return paths


def _export(ckpt: Path, out: Path) -> None:
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 0


def test_an_export_binds_its_provenance_to_its_weights_and_lists_it(checkpoints, tmp_path):
    out = tmp_path / "export"
    _export(checkpoints["leaky"], out)
    record = json.loads((out / "provenance.json").read_text())
    assert set(record["weights_sha256"]) == {"adapter_model.safetensors", "llama_proj.safetensors"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert "provenance.json" in manifest["files"]  # every file the export wrote
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    with pytest.raises(LeakageError, match="MSD pancreas_001 is in the evaluated test set but trained on"):
        check_checkpoint_against(out, {LEAKED})


def test_a_stale_provenance_record_never_certifies_other_weights(checkpoints, tmp_path):
    """The reviewers' case: export A (clean record) then B (no record) into one folder, or A's
    record copied beside B's weights: B's weights are never checked against A's record."""
    out = tmp_path / "export"
    _export(checkpoints["clean"], out)
    clean_record = (out / "provenance.json").read_text()
    _export(checkpoints["none"], out)  # an export of weights without provenance into the same folder
    assert not (out / "provenance.json").exists()
    with pytest.raises(ProvenanceError, match="checkpoint without recorded provenance"):
        check_checkpoint_against(out, {LEAKED})
    # A's record put back beside B's weights: refused, naming the file whose hash differs
    (out / "provenance.json").write_text(clean_record)
    with pytest.raises(ProvenanceError) as info:
        check_checkpoint_against(out, {LEAKED})
    assert str(info.value).startswith(f"{out / 'provenance.json'}: this provenance record does not belong to the "
                                      "weights beside it: it describes adapter_model.safetensors with sha256 ")
    report = check_checkpoint_against(out, {LEAKED}, allow_unknown=True)
    assert report.unknown and report.unknown[0].startswith(f"provenance unknown: {out} (provenance.json does not "
                                                           "describe these weights")
    # a record of an older export that names no weights is not trusted either
    (out / "provenance.json").write_text(json.dumps(_provenance()))
    with pytest.raises(ProvenanceError, match="it names no weights"):
        check_checkpoint_against(out, {LEAKED})


def test_an_own_checkpoint_stripped_of_provenance_is_refused_unless_allowed(checkpoints, tmp_path):
    # provenance.json deleted from an export: adapter_stack.json and the manifest say it is ours
    out = tmp_path / "export"
    _export(checkpoints["leaky"], out)
    (out / "provenance.json").unlink()
    with pytest.raises(ProvenanceError) as info:
        check_checkpoint_against(out, {LEAKED})
    assert "adapter_stack.json, manifest.json beside it say this project wrote it, but its provenance.json is " \
           "missing" in str(info.value) and "--allow-unknown-provenance" in str(info.value)
    assert check_checkpoint_against(out, {LEAKED}, allow_unknown=True).unknown == [
        f"provenance unknown: {out} (own checkpoint without recorded provenance or config.yaml); the leakage check "
        "cannot tell which volumes it was trained on"]
    # model.safetensors re-saved without its header next to its config.yaml
    resaved = tmp_path / "resaved"
    shutil.copytree(checkpoints["leaky"], resaved)
    save_file(load_file(str(resaved / "model.safetensors")), str(resaved / "model.safetensors"))
    with pytest.raises(ProvenanceError, match="config.yaml beside it says this project wrote it, but its header "
                                              r"records no provenance \(re-saved\?\)"):
        check_checkpoint_against(resaved, {LEAKED})
    # exporting it does not launder it into a "foreign" export: no record, refused the same way
    _export(resaved, tmp_path / "laundered")
    assert not (tmp_path / "laundered" / "provenance.json").exists()
    with pytest.raises(ProvenanceError, match="its provenance.json is missing"):
        check_checkpoint_against(tmp_path / "laundered", {LEAKED})
    # a foreign file (nothing of ours beside it) stays "provenance unknown", as before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(resaved / "model.safetensors", foreign / "weights.safetensors")
    report = check_checkpoint_against(foreign / "weights.safetensors", {LEAKED})
    assert report.unknown[0].startswith(f"provenance unknown: {foreign / 'weights.safetensors'} (a foreign checkpoint")


@pytest.mark.slow
def test_eval_cascade_states_unknown_provenance_per_stage(tmp_path):
    """An export folder as a stage (sha256 recorded in run.stages) and a stage whose header lost
    its provenance: refused, then with --allow-unknown-provenance metrics.json and tables.md say
    which stage's provenance is unknown."""
    import eval_cascade

    from tests.test_cascade import _cascade_config, prepare_phantoms, random_stage_checkpoints

    prepared = prepare_phantoms(tmp_path / "data")
    cfg = tiny_model_config(max_new_tokens=4)
    paths = random_stage_checkpoints(tmp_path / "ckpt", cfg)
    _export(Path(paths["tumor_detection"]), tmp_path / "stage3_export")
    paths["tumor_detection"] = str(tmp_path / "stage3_export")
    stripped = Path(paths["tumor_classification"]) / "model.safetensors"
    with safe_open(str(stripped), "pt") as reader:  # keep the tasks record (the stage check reads it)
        metadata = {k: v for k, v in (reader.metadata() or {}).items() if k != "provenance"}
    save_file(load_file(str(stripped)), str(stripped), metadata=metadata)
    config = _cascade_config(tmp_path, prepared, paths, cfg, threshold=0.0, slice_threshold=0.0)
    with pytest.raises(ProvenanceError, match="checkpoint without recorded provenance"):
        eval_cascade.main(["--cfg-path", str(config), "--no-figures"])
    metrics = eval_cascade.main(["--cfg-path", str(config), "--no-figures", "--allow-unknown-provenance"])
    stored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    provenance = stored["run"]["provenance"]
    # its config.yaml holds the model only (no datasets to check against): unknown
    assert {s: e["status"] for s, e in provenance.items()} == {
        "pancreas_detection": "recorded", "tumor_classification": "unknown", "tumor_detection": "recorded"}
    assert provenance["tumor_classification"]["lines"] == [
        f"provenance unknown: {Path(paths['tumor_classification'])} (own checkpoint without recorded provenance or "
        "config.yaml); the leakage check cannot tell which volumes it was trained on"]
    assert stored["run"]["stages"]["tumor_detection"]["sha256"] and "exists" not in stored["run"]["stages"]["tumor_detection"]
    tables = (tmp_path / "out" / "tables.md").read_text()
    assert tables.startswith("## Provenance\n") and "- **tumor_classification: provenance unknown**: " in tables
    assert "pancreas_detection: provenance" not in tables and metrics["run"]["provenance"] == provenance


@pytest.mark.slow
def test_eval_detection_states_unknown_provenance_in_metrics_and_tables(synthetic, trained, tmp_path):
    """eval_detection.py with model.ckpt = its own checkpoint whose header lost the provenance:
    refused, then with --allow-unknown-provenance metrics.json and tables.md say so; a checkpoint
    with its record says "recorded" and gets no Provenance section."""
    stripped = tmp_path / "stripped"
    shutil.copytree(trained / "checkpoint_best", stripped)
    weights = stripped / "model.safetensors"
    with safe_open(str(weights), "pt") as reader:
        metadata = {k: v for k, v in (reader.metadata() or {}).items() if k != "provenance"}
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    with pytest.raises(ProvenanceError, match="checkpoint without recorded provenance"):
        detect(synthetic, stripped, tmp_path / "refused", "--no-figures")
    metrics = detect(synthetic, stripped, tmp_path / "allowed", "--no-figures", "--allow-unknown-provenance")
    entry = metrics["run"]["provenance"]["model.ckpt"]
    assert entry["status"] == "not recorded" and entry["lines"][0].startswith(f"provenance not recorded: {stripped}")
    assert json.loads((tmp_path / "allowed" / "metrics.json").read_text())["run"]["provenance"]["model.ckpt"] == entry
    tables = (tmp_path / "allowed" / "tables.md").read_text()
    assert tables.startswith("## Provenance\n") and "- **model.ckpt: provenance not recorded**" in tables
    recorded = detect(synthetic, trained / "checkpoint_best", tmp_path / "recorded", "--no-figures")
    assert recorded["run"]["provenance"] == {"model.ckpt": {"status": "recorded", "lines": []}}
    assert "## Provenance" not in (tmp_path / "recorded" / "tables.md").read_text()
