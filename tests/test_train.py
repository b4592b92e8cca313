"""train.py on the tiny model and synthetic phantoms: outputs, exact resume, cascade wiring, bad input.

Each run takes a few seconds on one CPU core (tiny model, 112-px images, 16-sample batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_entry
from minigpt4.config import ConfigError, load_config
from minigpt4.io import write_json_atomic
from minigpt4.models.checkpoints import PROVENANCE_KEY, checkpoint_envelope, read_metadata

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "train_configs" / "quickstart_cpu.yaml"


def make_synthetic(folder: Path, n: int = 10, seed: int = 0) -> Path:
    """Phantom MSD volumes prepared into ``folder / 'prep'`` (≈1 s)."""
    from preprocessing import pipeline, synthetic

    raw = synthetic.generate(folder / "raw", scheme="msd", n=n, n_slices=24, size=128, seed=seed, log=lambda *a: None)
    opts = pipeline.Options(dataset="MSD", images=[raw["images"]], labels=raw["labels"], out=str(folder / "prep"))
    pipeline.prepare(opts, log=lambda *a: None)
    return folder / "prep"


def run_train(data: Path, out: Path, *options: str) -> None:
    """``python train.py --cfg-path quickstart_cpu.yaml`` with test-sized overrides."""
    argv = [
        "--cfg-path", str(QUICKSTART), "--options",
        f"datasets.synthetic.root={data}", f"run.output_dir={out}",
        "run.batch_size=4", "run.log_interval=1", "run.val_max_samples=4", "run.eval_batch_size=4",
        "model.max_new_tokens=6", *options,
    ]
    assert train_entry.main(argv) == 0


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_smoke_run_writes_documented_outputs(data, tmp_path):
    out = tmp_path / "run"
    run_train(data, out, "run.iters_per_epoch=1", "run.max_steps=2")
    names = {p.name for p in out.iterdir()}
    assert names == {"config.yaml", "log.jsonl", "val_metrics.jsonl", "checkpoint_epoch_0", "checkpoint_epoch_1",
                     "checkpoint_best", "checkpoint_latest", "manifest.json"}
    assert json.loads((out / "manifest.json").read_text())["command"] == "train"
    for folder in ("checkpoint_epoch_0", "checkpoint_epoch_1", "checkpoint_best"):
        assert {p.name for p in (out / folder).iterdir()} == {"model.safetensors", "config.yaml", "training_state.pt"}
    assert (out / "checkpoint_latest").read_text().strip() == "checkpoint_epoch_1"
    # the saved config is the resolved one (overrides applied) and loads back
    saved = load_config(out / "config.yaml")
    assert saved.run.batch_size == 4 and saved.datasets["synthetic"].root == str(data)
    # training state loads without unpickling arbitrary objects
    state = torch.load(out / "checkpoint_epoch_1" / "training_state.pt", weights_only=True)
    assert state["step"] == 2 and state["epoch"] == 2 and state["steps_per_epoch"] == 1
    assert set(state) >= {"optimizer", "schedule", "scaler", "rng", "data", "best"}
    assert state["schedule"]["step"] == 2 and state["data"]["consumed"] == [8]
    losses = step_losses(out)
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
    val = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["epoch"] for v in val] == [0, 1]
    assert all(0.0 <= v["score"] <= 1.0 and v["tasks"]["pancreas_detection"]["n"] == 4 for v in val)
    # checkpoint_best is a byte copy of the best epoch's weights
    best_epoch = max(val, key=lambda v: (v["score"], -v["epoch"]))["epoch"]
    assert (out / "checkpoint_best" / "model.safetensors").read_bytes() == (
        out / f"checkpoint_epoch_{best_epoch}" / "model.safetensors").read_bytes()
    # nothing temporary is left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # every checkpoint records the volumes it was trained and validated on (checkpoint_best by its copy)
    split = json.loads((data / "annotations" / "split.json").read_text())
    for folder in ("checkpoint_epoch_0", "checkpoint_best"):
        record = json.loads(read_metadata(out / folder)[2][PROVENANCE_KEY])
        assert [r["run"] for r in record["runs"]] == [str(out)]
        synthetic = record["runs"][0]["datasets"]["synthetic"]
        assert synthetic["train"] == [["MSD", v] for v in split["train"]]
        assert synthetic["val"] == [["MSD", v] for v in split["val"]] and split["val"]
    # ... and the acquisition range of its train volumes (issue 28.2), from the prepared folder's records
    acquisition = json.loads((data / "annotations" / "MSD_acquisition.json").read_text())
    assert set(acquisition) == set(split["train"]) | set(split["val"]) | set(split["test"])
    envelope, note = checkpoint_envelope(out / "checkpoint_best")
    train = [acquisition[v] for v in split["train"]]
    assert envelope["n_volumes"] == envelope["n_recorded"] == len(split["train"]) and note.startswith("recorded")
    assert envelope["slice_thickness_mm"]["min"] == min(r["slice_thickness_mm"] for r in train)
    assert envelope["in_plane_spacing_mm"]["max"] == max(max(r["in_plane_spacing_mm"]) for r in train)
    assert envelope["hu_percentiles"]["p50"]["max"] == max(r["hu_percentiles"]["p50"] for r in train)
    assert envelope["manufacturer"] == {"not recorded": len(train)}  # a NIfTI does not say


def test_resume_is_exact(data, tmp_path):
    """4 steps straight == 2 steps, stop, resume for 2 (crossing an epoch end with validation).

    LoRA dropout is on, so this also checks that RNG states are restored."""
    common = ("run.iters_per_epoch=3", "model.lora.dropout=0.1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(data, straight, *common, "run.max_steps=4")
    run_train(data, split, *common, "run.max_steps=2")
    assert (split / "checkpoint_latest").read_text().strip() == "checkpoint_step_2"
    run_train(data, split, *common, "run.max_steps=4", "run.resume=auto")

    a, b = step_losses(straight), step_losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a == b  # bit-identical losses
    assert len(set(a.values())) == 4  # and they do change from step to step
    wa = load_file(straight / "checkpoint_step_4" / "model.safetensors")
    wb = load_file(split / "checkpoint_step_4" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = load_file(split / "checkpoint_step_2" / "model.safetensors")
    assert not torch.equal(w0["llama_proj.weight"], wa["llama_proj.weight"])  # training did move weights
    sa = torch.load(straight / "checkpoint_step_4" / "training_state.pt", weights_only=True)
    sb = torch.load(split / "checkpoint_step_4" / "training_state.pt", weights_only=True)
    for key, value in sa["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], sb["optimizer"]["state"][key]["exp_avg"])
    val_a = (straight / "val_metrics.jsonl").read_text()
    assert val_a == (split / "val_metrics.jsonl").read_text() and val_a.count("\n") == 1


def test_resume_explicit_path_and_missing(data, tmp_path):
    out = tmp_path / "run"
    run_train(data, out, "run.iters_per_epoch=2", "run.max_steps=1", "run.validate=false")
    with pytest.raises(FileNotFoundError, match="training_state.pt"):
        run_train(data, out, "run.max_steps=2", "run.iters_per_epoch=2", f"run.resume={tmp_path / 'nowhere'}")
    run_train(data, out, "run.iters_per_epoch=2", "run.max_steps=2", "run.validate=false",
              f"run.resume={out / 'checkpoint_step_1'}")
    assert sorted(step_losses(out)) == [1, 2]
    # without validation checkpoint_best follows the latest epoch
    assert (out / "checkpoint_best" / "model.safetensors").read_bytes() == (
        out / "checkpoint_epoch_0" / "model.safetensors").read_bytes()


def test_cascade_configs_chain_best_checkpoints():
    cfgs = {name: load_config(ROOT / "train_configs" / f"{name}.yaml") for name in (
        "stage1_pancreas_detection", "stage2_tumor_classification", "stage3_tumor_detection", "abd_organ_detection")}
    s1, s2, s3 = cfgs["stage1_pancreas_detection"], cfgs["stage2_tumor_classification"], cfgs["stage3_tumor_detection"]
    assert s1.model.init_from == "weights/checkpoint_stage3.pth"
    assert Path(s2.model.init_from) == Path(s1.run.output_dir) / "checkpoint_best"
    assert Path(s3.model.init_from) == Path(s2.run.output_dir) / "checkpoint_best"
    assert [d.task for d in s1.datasets.values()] == ["pancreas_detection"] * 2
    assert [d.threshold for d in s1.datasets.values()] == [0.6, 0.6]
    assert [d.task for d in s2.datasets.values()] == ["tumor_classification"]
    assert [d.task for d in s3.datasets.values()] == ["tumor_detection"]
    assert [d.task for d in cfgs["abd_organ_detection"].datasets.values()] == ["organ_detection"]
    for cfg in cfgs.values():  # the paper's optimisation and the release's batch
        r = cfg.run
        assert (r.init_lr, r.min_lr, r.warmup_lr, r.weight_decay, r.beta1, r.beta2) == (1e-5, 1e-6, 1e-6, 0.05, 0.9, 0.999)
        assert (r.max_epoch, r.iters_per_epoch, r.warmup_steps, r.seed) == (50, 1000, 1000, 42)
        assert r.batch_size * r.grad_accum_steps == 16  # the release's batch 16 (as 8 x 2 to fit 40 GB)
        assert cfg.model.vision.image_size == 448 and cfg.model.lora.r == 64
        assert cfg.model.vision.weights == "weights/eva_vit_g.pth"
        assert cfg.model.text.path == "weights/Llama-2-7b-chat-hf"
        assert len({cfg.run.output_dir for cfg in cfgs.values()}) == 4


def test_stage_starts_from_previous_best(data, tmp_path):
    """A later stage built with init_from=<previous>/checkpoint_best starts from those weights:
    with LR 0 its first checkpoint equals the previous stage's best."""
    s1 = tmp_path / "stage1"
    run_train(data, s1, "run.iters_per_epoch=2", "run.max_steps=2", "run.validate=false")
    s2 = tmp_path / "stage2"
    run_train(data, s2, "run.iters_per_epoch=1", "run.max_steps=1", "run.validate=false",
              "datasets.synthetic.task=tumor_detection", f"model.init_from={s1 / 'checkpoint_best'}",
              "run.init_lr=0", "run.warmup_lr=0", "run.min_lr=0")
    w1 = load_file(s1 / "checkpoint_best" / "model.safetensors")
    w2 = load_file(s2 / "checkpoint_epoch_0" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # stage 2 records stage 1's provenance as read from stage 1's checkpoint
    record1 = json.loads(read_metadata(s1 / "checkpoint_best")[2][PROVENANCE_KEY])
    record2 = json.loads(read_metadata(s2 / "checkpoint_epoch_0")[2][PROVENANCE_KEY])
    assert record2["runs"][1:] == [{**record1["runs"][0], "checkpoint": str(s1 / "checkpoint_best")}]
    # and from a fresh init the weights differ (the test can fail)
    s2b = tmp_path / "stage2b"
    run_train(data, s2b, "run.iters_per_epoch=1", "run.max_steps=1", "run.validate=false",
              "run.init_lr=0", "run.warmup_lr=0", "run.min_lr=0")
    w3 = load_file(s2b / "checkpoint_epoch_0" / "model.safetensors")
    assert not torch.equal(w1["llama_proj.weight"], w3["llama_proj.weight"])


def test_init_from_without_provenance_is_refused_unless_allowed(data, tmp_path):
    """An own checkpoint of the older format (no provenance) as init_from: refused before training;
    with --allow-unknown-provenance the run trains and records that ancestor as not recorded."""
    from minigpt4.provenance import ProvenanceError
    from minigpt4.models.checkpoints import save_checkpoint
    from minigpt4.models.minigpt_v2 import build_model

    s1 = tmp_path / "stage1"
    run_train(data, s1, "run.iters_per_epoch=1", "run.max_steps=1", "run.validate=false")
    old = tmp_path / "old"
    cfg = load_config(s1 / "checkpoint_best" / "config.yaml")
    save_checkpoint(build_model(cfg.model), old, cfg)  # no provenance: the format before it was recorded
    options = ("run.iters_per_epoch=1", "run.max_steps=1", "run.validate=false", f"model.init_from={old}")
    with pytest.raises(ProvenanceError, match=f"{old / 'model.safetensors'}: checkpoint without recorded provenance"):
        run_train(data, tmp_path / "refused", *options)
    assert not (tmp_path / "refused").exists()
    run_train(data, tmp_path / "allowed", *options, "--allow-unknown-provenance")
    record = json.loads(read_metadata(tmp_path / "allowed" / "checkpoint_best")[2][PROVENANCE_KEY])
    assert [(r.get("checkpoint"), r.get("recorded")) for r in record["runs"]] == [(None, None), (str(old), False)]


def test_missing_image_fails_before_training(data, tmp_path):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(data, broken)
    victim = sorted((broken / "slices").iterdir())[0]
    records = json.loads((broken / "annotations" / "MSD_train.json").read_text())
    used = [r["image"] for r in records]
    victim = broken / used[0]
    victim.unlink()
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=victim.name):
        run_train(broken, out)
    assert not out.exists()  # nothing written, nothing trained


def test_empty_dataset_fails_before_training(data, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    write_json_atomic(empty / "annotations" / "MSD_train.json", [])
    with pytest.raises(ValueError, match="empty"):
        run_train(empty, tmp_path / "run")
    with pytest.raises(ConfigError, match="no datasets"):
        no_data = tmp_path / "no_data.yaml"
        no_data.write_text(f"run: {{output_dir: {tmp_path / 'r'}, device: cpu}}\n")
        train_entry.main(["--cfg-path", str(no_data)])
    assert not (tmp_path / "run").exists()


def test_missing_weight_file_and_unknown_key(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.init_from=.*stage1.*train that stage first"):
        run_train(data, tmp_path / "run", "model.init_from=output/stage1_x/checkpoint_best")
    with pytest.raises(FileNotFoundError, match="model.vision.weights"):
        run_train(data, tmp_path / "run", f"model.vision.weights={tmp_path / 'eva_vit_g.pth'}")
    with pytest.raises(ConfigError, match="learning_rate"):
        run_train(data, tmp_path / "run", "run.learning_rate=1")
    assert not (tmp_path / "run").exists()


def test_resume_auto_refuses_a_run_of_another_config(data, tmp_path):
    """``run.resume=auto`` into a folder holding another task's run must not continue that run."""
    out = tmp_path / "run"
    common = ("run.iters_per_epoch=2", "run.validate=false", "run.resume=auto")
    run_train(data, out, *common, "run.max_steps=1")
    saved_config = (out / "config.yaml").read_text()
    with pytest.raises(ValueError) as refused:
        run_train(data, out, *common, "run.max_steps=2", "datasets.synthetic.task=tumor_detection",
                  "model.lora.r=4", "run.init_lr=0.5")
    message = str(refused.value)
    assert str(out / "checkpoint_step_1" / "config.yaml") in message
    for key in ("datasets.synthetic.task", "model.lora.r", "run.init_lr"):
        assert key in message
    differing = message.split("differing keys: ")[1].split(". Use another")[0]
    assert [part.split(":")[0] for part in differing.split("; ")] == [
        "datasets.synthetic.task", "model.lora.r", "run.init_lr"]
    assert "model.lora.r: 16 in the run, 4 now" in differing
    assert (out / "config.yaml").read_text() == saved_config  # the old run's config is untouched
    assert sorted(step_losses(out)) == [1]
    # options that do not change the trained weights may differ: the run continues
    run_train(data, out, *common, "run.max_steps=2", "run.num_workers=0", "run.log_interval=5",
              "run.eval_batch_size=2", "run.validate=true", "run.val_max_samples=2", "model.gradient_checkpointing=true")
    assert sorted(step_losses(out)) == [1, 2]


def test_truncated_training_state_names_the_file(data, tmp_path):
    out = tmp_path / "run"
    run_train(data, out, "run.iters_per_epoch=2", "run.max_steps=1", "run.validate=false")
    state = out / "checkpoint_step_1" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{state}: truncated or unreadable training state"):
        run_train(data, out, "run.iters_per_epoch=2", "run.max_steps=2", "run.validate=false", "run.resume=auto")


def test_missing_weights_say_where_to_get_them(data, tmp_path):
    from minigpt4.models.eva_vit import EVA_SOURCE
    from minigpt4.models.llama import LLAMA_SOURCE

    with pytest.raises(FileNotFoundError) as eva:
        run_train(data, tmp_path / "run", f"model.vision.weights={tmp_path / 'eva_vit_g.pth'}")
    assert f"model.vision.weights={tmp_path / 'eva_vit_g.pth'}: file or folder not found; get {EVA_SOURCE}" in str(eva.value)
    with pytest.raises(FileNotFoundError) as llama:
        run_train(data, tmp_path / "run", f"model.text.path={tmp_path / 'Llama-2-7b-chat-hf'}")
    assert LLAMA_SOURCE in str(llama.value) and "huggingface.co/meta-llama" in str(llama.value)


def test_output_dir_errors_are_one_line_with_exit_status_2(data, tmp_path, capsys):
    """train.py's command line: a file in the way of run.output_dir is one ``error:`` line, status 2."""
    from minigpt4.cli import run_main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["--cfg-path", str(QUICKSTART), "--options", f"datasets.synthetic.root={data}",
            f"run.output_dir={blocker / 'run'}", "run.max_steps=1"]
    assert run_main(train_entry.main, argv, prog="train.py") == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"train.py: error: {blocker / 'run'}: run.output_dir lies under {blocker}, which is a "
                           "file, not a folder; choose another output path")
    from minigpt4.outputs import OutputFolderError

    with pytest.raises(OutputFolderError):
        run_main(train_entry.main, [*argv, "--debug"], prog="train.py")


def test_feature_cache_gives_the_same_losses_and_encodes_each_image_once(data, tmp_path):
    """run.cache_visual_features: same step losses as encoding every step; a second run reuses the files."""
    common = ("model.vision.trainable=false", "run.iters_per_epoch=2", "run.max_steps=2", "run.validate=false")
    cache = tmp_path / "features"
    run_train(data, tmp_path / "live", *common)
    run_train(data, tmp_path / "cached", *common, "run.cache_visual_features=true", f"run.feature_cache_dir={cache}")
    live, cached = step_losses(tmp_path / "live"), step_losses(tmp_path / "cached")
    assert sorted(live) == sorted(cached) == [1, 2]
    for step in live:  # the tower ran in other batches when cached: equal up to fp32 rounding
        assert cached[step] == pytest.approx(live[step], rel=1e-5)
    start = json.loads((tmp_path / "cached" / "log.jsonl").read_text().splitlines()[0])
    folder = Path(start["feature_cache"])
    assert folder.parent == cache and folder.name.endswith("_112px_float32")
    files = sorted(folder.glob("*/*.safetensors"))
    records = json.loads((data / "annotations" / "MSD_train.json").read_text())
    assert len(files) == len({r["image"] for r in records}) > 0  # every distinct training image, once
    assert load_file(files[0])["tower"].shape == (1 + 64, 64)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    run_train(data, tmp_path / "again", *common, "run.cache_visual_features=true", f"run.feature_cache_dir={cache}")
    assert {f: f.stat().st_mtime_ns for f in sorted(folder.glob("*/*.safetensors"))} == stamps  # nothing re-encoded
    assert step_losses(tmp_path / "again") == cached


def test_feature_cache_covers_validation_with_the_same_scores(data, tmp_path):
    """run.cache_visual_features with run.validate: validation images are cached too, scores unchanged."""
    common = ("model.vision.trainable=false", "run.iters_per_epoch=1", "run.max_epoch=2", "run.validate=true")
    cache = tmp_path / "features"
    run_train(data, tmp_path / "live", *common)
    run_train(data, tmp_path / "cached", *common, "run.cache_visual_features=true", f"run.feature_cache_dir={cache}")

    def validations(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]

    live, cached = validations(tmp_path / "live"), validations(tmp_path / "cached")
    assert [v["epoch"] for v in cached] == [0, 1]
    assert [v["tasks"] for v in cached] == [v["tasks"] for v in live]
    # one folder (no autocast on CPU: training and validation store float32): train + val images
    folders = list(cache.iterdir())
    assert len(folders) == 1 and folders[0].name.endswith("_112px_float32")
    records = {split: json.loads((data / "annotations" / f"MSD_{split}.json").read_text()) for split in ("train", "val")}
    from minigpt4.evaluation.common import subsample

    val_images = {r["image"] for r in subsample(records["val"], 4)}  # run.val_max_samples=4
    expected = len({r["image"] for r in records["train"]} | val_images)
    assert len(list(folders[0].glob("*/*.safetensors"))) == expected


def test_a_nan_loss_stops_training_naming_the_step_before_the_update(data, tmp_path, monkeypatch, capsys):
    from minigpt4.cli import run_main
    from minigpt4.models.minigpt_v2 import MiniGPTPancreas

    original, calls = MiniGPTPancreas.forward, []

    def forward(self, *args, **kwargs):  # the loss of the 2nd optimizer step (grad_accum 1) becomes NaN
        out = original(self, *args, **kwargs)
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniGPTPancreas, "forward", forward)
    out = tmp_path / "run"
    argv = ["--cfg-path", str(QUICKSTART), "--options", f"datasets.synthetic.root={data}", f"run.output_dir={out}",
            "run.batch_size=4", "run.log_interval=1", "run.iters_per_epoch=3", "run.max_steps=3"]
    assert run_main(train_entry.main, argv, prog="train.py") == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [  # after the progress line of step 1
        f"train.py: error: {out}: training loss is nan at step 2 (epoch 0); stopped before that update, the "
        "checkpoints already written are unchanged (lower run.init_lr, try run.amp=bf16 or none, or check the data)"]
    assert calls == [1, 2]  # no third step
    assert not out.exists()  # no checkpoint was written: the failed run removes the folder it created


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(data, tmp_path):
    """torch.save / safetensors fail on a full disk with their own error types: the run stops with
    one line naming the file (the kernel's file-size limit stands in for the full disk)."""
    import os
    import subprocess
    import sys

    from tests.test_outputs import _file_size_limit

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", "--cfg-path", str(QUICKSTART), "--options", f"datasets.synthetic.root={data}",
         f"run.output_dir={out}", "run.batch_size=4", "run.iters_per_epoch=1", "run.max_steps=1", "run.validate=false"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_file_size_limit(100_000))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith(f"train.py: error: {out}/checkpoint_epoch_0/") and "file too large" in last, last
    assert not out.exists()  # no checkpoint was completed: the failed run removed its folder
