"""eval_detection.py / eval_classification.py on CPU with the tiny model: documented outputs,
batch-size invariance, re-scoring equal to scoring, --checkpoints (best on val), and bad input
failing before any model is built."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_classification
import eval_detection
import train as train_entry
from minigpt4.config import ConfigError
from minigpt4.io import file_sha256
from minigpt4.io import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_EVAL = ROOT / "eval_configs" / "quickstart_cpu.yaml"
TC_EVAL = ROOT / "eval_configs" / "tc_cpu.yaml"
SHARED_TC = ROOT.parent / "shared" / "data" / "tc_crops"

DETECTION_ROW_KEYS = {"q_id", "dataset", "volume_name", "slice_index", "image", "target", "question", "answer",
                      "parsed", "pred_box", "gt_box", "width", "height", "iou"}
SUMMARY_KEYS = {"n", "n_parsed", "mean_iou", "mean_iou_parsed", "parse_rate", "acc_at_0.5", "grid_ceiling"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Phantom MSD volumes prepared with the project's pipeline (≈1 s)."""
    from preprocessing import pipeline, synthetic as synth

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("synthetic")
    raw = synth.generate(folder / "raw", scheme="msd", n=10, n_slices=24, size=128, seed=0, log=lambda *a: None)
    opts = pipeline.Options(dataset="MSD", images=[raw["images"]], labels=raw["labels"], out=str(folder / "prep"))
    pipeline.prepare(opts, log=lambda *a: None)
    return folder / "prep"


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory) -> Path:
    """A 2-epoch tiny training run (checkpoint_epoch_0, _1, checkpoint_best)."""
    out = tmp_path_factory.mktemp("train")
    argv = ["--cfg-path", str(ROOT / "train_configs" / "quickstart_cpu.yaml"), "--options",
            f"datasets.synthetic.root={synthetic}", f"run.output_dir={out}", "run.max_epoch=2",
            "run.iters_per_epoch=2", "run.batch_size=4", "run.val_max_samples=4", "run.eval_batch_size=4",
            "model.max_new_tokens=6"]
    assert train_entry.main(argv) == 0
    return out


def detect(data: Path, ckpt: Path, out: Path, *extra: str, options: tuple[str, ...] = ()) -> dict:
    argv = ["--cfg-path", str(QUICKSTART_EVAL), "--options", f"datasets.synthetic.root={data}",
            f"model.ckpt={ckpt}", f"run.output_dir={out}", "model.max_new_tokens=6", *options, "--bootstrap", "50", *extra]
    return eval_detection.main(argv)


def test_detection_writes_documented_outputs(synthetic, trained, tmp_path):
    from preprocessing.layout import read_prepared

    ckpt = trained / "checkpoint_best"
    metrics = detect(synthetic, ckpt, tmp_path, options=("run.eval_batch_size=8",))
    expected = read_prepared(synthetic, "pancreas_detection", "test")
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(rows) == len(expected) > 0
    assert [r["q_id"] for r in rows] == [r["q_id"] for r in expected]
    assert all(DETECTION_ROW_KEYS <= set(r) for r in rows)
    assert rows[0]["question"] == "[refer] Give me the location of the pancreas"
    assert [r["gt_box"] for r in rows] == [[float(v) for v in r["bbox"]] for r in expected]

    saved = read_json(tmp_path / "metrics.json")
    assert saved["per_dataset"].keys() == {"MSD"} and set(saved["weighted"]) == SUMMARY_KEYS
    assert saved["weighted"]["n"] == len(rows)
    assert saved["weighted"]["mean_iou"] == pytest.approx(np.mean([r["iou"] for r in rows]))
    run = saved["run"]
    assert run["checkpoint"]["sha256"] == file_sha256(ckpt / "model.safetensors")
    assert run["batch_size"] == 8 and run["split"] == "test"
    assert run["decoding"] == {"strategy": "greedy", "num_beams": 1, "max_new_tokens": 6, "padding_side": "left",
                               "instruction": "[refer] Give me the location of the {}", "prompt_wording": "paper"}
    assert run["model"]["dtype"] == "torch.float32"
    assert metrics["weighted"] == saved["weighted"]
    tables_md = (tmp_path / "tables.md").read_text()
    assert "Table 1 — pancreas detection" in tables_md and "0.574" in tables_md  # paper's number beside ours
    for name in ("examples.png", "box_heatmaps.png", "iou_histogram.png", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name

    # re-scoring the file without a model gives the same metrics
    again = eval_detection.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"run.output_dir={tmp_path / 'rescored'}",
                                 "--predictions", str(tmp_path / "predictions.jsonl"), "--bootstrap", "50", "--no-figures"])
    assert again["per_dataset"] == saved["per_dataset"] and again["weighted"] == saved["weighted"]
    assert again["ci95"] == saved["ci95"]
    assert again["run"]["mode"] == "rescore"
    # every row records how its slice was selected, and re-scoring reads it from the file
    assert {r["selection_threshold"] for r in rows} == {saved["threshold"]} and saved["threshold"] is not None
    assert again["threshold"] == saved["threshold"]


def test_batch_size_does_not_change_predictions(synthetic, trained, tmp_path):
    ckpt = trained / "checkpoint_best"
    one = detect(synthetic, ckpt, tmp_path / "b1", "--max-samples", "5", "--no-figures", options=("run.eval_batch_size=1",))
    five = detect(synthetic, ckpt, tmp_path / "b5", "--max-samples", "5", "--no-figures", options=("run.eval_batch_size=5",))
    rows1, rows5 = read_jsonl(tmp_path / "b1" / "predictions.jsonl"), read_jsonl(tmp_path / "b5" / "predictions.jsonl")
    assert len(rows1) == 5
    assert [(r["answer"], r["iou"]) for r in rows1] == [(r["answer"], r["iou"]) for r in rows5]
    assert one["weighted"] == five["weighted"]


def test_checkpoints_mode_picks_best_on_val(synthetic, trained, tmp_path):
    summary = eval_detection.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"datasets.synthetic.root={synthetic}",
                                   f"run.output_dir={tmp_path}", "model.max_new_tokens=6", "--checkpoints", str(trained),
                                   "--max-samples", "4", "--bootstrap", "0", "--no-figures"])
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    val = [e["val"]["weighted"]["mean_iou"] for e in epochs]
    assert summary["best_epoch"] == int(np.argmax(val))  # earliest on ties, never chosen on test
    for e in epochs:
        assert (tmp_path / f"epoch_{e['epoch']}" / "test" / "predictions.jsonl").is_file()
    assert read_json(tmp_path / "metrics.json")["best_epoch"] == summary["best_epoch"]
    tables_md = (tmp_path / "tables.md").read_text()
    assert "Table 1 — detection IoU by epoch" in tables_md
    # 4 evenly spaced test slices are not the test set: neither key nor label say "best_test"
    assert "best_test" not in summary and summary["best_test_subset"]["n"] == 4
    assert summary["subset"] == {"max_samples": 4, "q_ids": None}
    assert "subset of 4 test slices (--max-samples/--q-ids), not the test set" in tables_md


def test_checkpoints_mode_encodes_the_images_once_for_every_epoch(synthetic, tmp_path):
    """run.cache_visual_features in --checkpoints mode: epochs of a frozen-EVA run share one cache
    folder (val + test images, each once) and score exactly as without it."""
    train_out = tmp_path / "train"
    assert train_entry.main([
        "--cfg-path", str(ROOT / "train_configs" / "quickstart_cpu.yaml"), "--options",
        f"datasets.synthetic.root={synthetic}", f"run.output_dir={train_out}", "run.max_epoch=2",
        "run.iters_per_epoch=1", "run.batch_size=4", "run.validate=false", "model.vision.trainable=false"]) == 0

    def checkpoints(out: Path, *options: str) -> dict:
        return eval_detection.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"datasets.synthetic.root={synthetic}",
                                    f"run.output_dir={out}", "model.max_new_tokens=6", "model.vision.trainable=false",
                                    *options, "--checkpoints", str(train_out), "--max-samples", "4", "--bootstrap", "0",
                                    "--no-figures"])

    live = checkpoints(tmp_path / "live")
    cache = tmp_path / "features"
    cached = checkpoints(tmp_path / "cached", "run.cache_visual_features=true", f"run.feature_cache_dir={cache}")
    assert [e["epoch"] for e in cached["epochs"]] == [0, 1]
    assert cached["epochs"] == live["epochs"]  # every epoch's val and test metrics
    folders = list(cache.iterdir())
    assert len(folders) == 1  # both epochs: the same frozen EVA, one folder
    images = {r["image"] for split in ("val", "test")
              for r in read_jsonl(tmp_path / "cached" / "epoch_0" / split / "predictions.jsonl")}
    assert len(list(folders[0].glob("*/*.safetensors"))) == len(images) == 8


class _NoModel(Exception):
    pass


@pytest.fixture
def forbid_model(monkeypatch):
    """Any attempt to build a model fails the test: errors must come before it."""
    import minigpt4.commands.evaluate as evaluate_command
    import minigpt4.models.minigpt_v2 as mv2
    import minigpt4.training.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise _NoModel("build_model was called")

    monkeypatch.setattr(mv2, "build_model", refuse)
    monkeypatch.setattr(evaluate_command, "build_model", refuse)  # bound where they are used
    monkeypatch.setattr(trainer_module, "build_model", refuse)


def test_missing_image_fails_before_the_model_is_loaded(synthetic, trained, tmp_path, forbid_model):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    from preprocessing.layout import read_prepared

    victim = Path(read_prepared(data, "pancreas_detection", "test")[0]["image"])
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        detect(data, trained / "checkpoint_best", tmp_path / "out")


def test_unknown_ids_and_missing_checkpoint_fail_before_the_model(synthetic, trained, tmp_path, forbid_model):
    with pytest.raises(ValueError, match=r"unknown q_id\(s\) \[999999\]"):
        detect(synthetic, trained / "checkpoint_best", tmp_path, "--q-ids", "999999")
    with pytest.raises(FileNotFoundError, match="model.ckpt"):
        detect(synthetic, tmp_path / "no_such_checkpoint", tmp_path)
    with pytest.raises(ConfigError, match="no dataset with a classification task"):
        eval_classification.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"run.output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint_epoch"):
        detect(synthetic, trained / "checkpoint_best", tmp_path, "--checkpoints", str(tmp_path))


@pytest.mark.parametrize("recorded, title", [
    (0.3, "slices with pancreas box ratio > 30 %"),
    (None, "selection threshold unknown"),  # a file written before rows recorded it
])
def test_rescoring_predictions_takes_the_threshold_from_the_file_not_the_config(tmp_path, recorded, title):
    from tests._markdown import markdown_tables

    line = {"dataset": "NIH", "volume_name": "n1", "target": "pancreas", "answer": "{<10><10><30><50>}",
            "gt_box": [20, 10, 59, 49], "width": 200, "height": 100}
    if recorded is not None:
        line["selection_threshold"] = recorded
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(line) + "\n")
    # the config's folder says 60 %: the title must not take it from there
    m = eval_detection.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"run.output_dir={tmp_path / 'out'}",
                             "datasets.synthetic.threshold=0.6", "--predictions", str(path), "--bootstrap", "0", "--no-figures"])
    assert m["threshold"] == recorded
    text = (tmp_path / "out" / "tables.md").read_text()
    assert f"### Table 1 — pancreas detection (IoU), {title}" in text
    assert "60 %" not in text.splitlines()[0]
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl")[0].get("selection_threshold") == recorded
    assert len(markdown_tables(text)) == 2  # Table 1 and the detail table, each with its header row


def test_rescoring_a_hand_made_organ_file_writes_table4(tmp_path):
    lines = [
        {"dataset": "ABD", "volume_name": "c1", "target": "liver", "answer": "{<0><0><50><50>}", "gt_box": [0, 0, 100, 100], "width": 200, "height": 200},
        {"dataset": "ABD", "volume_name": "c1", "target": "spleen", "answer": "none", "gt_box": [0, 0, 10, 10], "width": 200, "height": 200},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    m = eval_detection.main(["--cfg-path", str(QUICKSTART_EVAL), "--options", f"run.output_dir={tmp_path / 'out'}",
                             "--predictions", str(path), "--bootstrap", "0"])
    assert m["task"] == "organ_detection"  # inferred from the targets
    assert m["per_organ"]["liver"]["mean_iou"] == 1.0 and m["per_organ"]["spleen"]["mean_iou"] == 0.0
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "Table 4" in text and "0.839" in text
    assert (tmp_path / "out" / "box_heatmaps.png").is_file()
    assert not (tmp_path / "out" / "examples.png").exists()  # no images to draw on


# ------------------------------------------------------------------------------ classification
@pytest.fixture(scope="module")
def tc_folder(tmp_path_factory) -> Path:
    """A small TC folder: real crops from ../shared/data when present, else generated ones."""
    from preprocessing.tc import import_tc

    folder = tmp_path_factory.mktemp("tc")
    rows = []
    if SHARED_TC.is_dir():
        with open(SHARED_TC / "labels.csv", newline="") as fh:
            all_rows = list(csv.DictReader(fh))
        for dataset in ("NIH", "MSD"):
            volumes = sorted({r["volume"] for r in all_rows if r["dataset"] == dataset})[:6]
            for v in volumes:
                rows += [r for r in all_rows if r["volume"] == v][:2]
        images = SHARED_TC / "images"
    else:
        images = folder / "crops"
        images.mkdir()
        rng = np.random.default_rng(0)
        for dataset, answer in (("NIH", "no"), ("MSD", "yes")):
            for v in range(6):
                for k in range(2):
                    name = f"{dataset}_{v}_{k}.png"
                    Image.fromarray(rng.integers(0, 255, (30 + v, 40), dtype=np.uint8)).save(images / name)
                    rows.append({"image": name, "dataset": dataset, "volume": f"{dataset}{v}", "slice_index": k, "answer": answer})
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image", "dataset", "volume", "slice_index", "answer"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    import_tc(images, folder / "TC", csv_path=str(folder / "labels.csv"), test_ratio=0.5, val_ratio=0.0, seed=0)
    return folder / "TC"


def test_classification_outputs_and_batch_invariance(tc_folder, tmp_path):
    from preprocessing.layout import read_prepared

    def run(out: Path, batch: int) -> dict:
        return eval_classification.main(["--cfg-path", str(TC_EVAL), "--options", f"datasets.tc.root={tc_folder}",
                                         "model.ckpt=null", f"run.output_dir={out}", f"run.eval_batch_size={batch}",
                                         "--bootstrap", "50"])

    m = run(tmp_path / "b4", 4)
    expected = read_prepared(tc_folder, "tumor_classification", "test")
    rows = read_jsonl(tmp_path / "b4" / "predictions.jsonl")
    assert len(rows) == len(expected) == m["n"]
    assert {"answer", "pred_answer", "p_yes", "gt_answer", "dataset", "volume_name", "correct"} <= set(rows[0])
    assert [r["gt_answer"] for r in rows] == [r["answer"] for r in expected]
    assert all(0.0 <= r["p_yes"] <= 1.0 for r in rows)
    assert {"accuracy", "precision", "recall", "f1", "auc", "invalid", "confusion_matrix", "ci95", "per_dataset"} <= set(m)
    assert sum(map(sum, m["confusion_matrix"]["counts"])) == len(rows)
    assert m["per_dataset"].keys() == {r["dataset"] for r in rows}
    # a random tiny model rarely says yes/no: invalid answers are wrong, never "no"
    invalid = sum(r["pred_answer"] is None for r in rows)
    assert m["invalid"] == invalid
    assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    tables_md = (tmp_path / "b4" / "tables.md").read_text()
    assert "Table 2 — pancreatic tumor classification" in tables_md
    assert (tmp_path / "b4" / "confusion_matrix.png").is_file()
    # the model-free baseline, fitted on the same folder's train split, scored on the same rows
    from minigpt4.evaluation.baselines import histogram_baseline_rows

    train = read_prepared(tc_folder, "tumor_classification", "train")
    base_rows = histogram_baseline_rows(train, expected, seed=42)
    base = m["baseline"]
    assert base["n_train"] == len(train) and base["n"] == len(rows)
    assert base["accuracy"] == pytest.approx(np.mean([r["correct"] for r in base_rows]))
    assert f"| crop size + intensity histogram → gradient boosting (no model), same rows | {base['accuracy']:.3f} |" in tables_md
    assert m["tc_variant"] == {"tc": "paper"}  # tc-import of NIH = no, MSD = yes crops
    # per source: NIH is all no (accuracy = specificity), MSD all yes (= sensitivity); no precision
    assert m["per_dataset"]["NIH"]["measures"] == "specificity" and m["per_dataset"]["MSD"]["measures"] == "sensitivity"
    assert "precision" not in m["per_dataset"]["NIH"] and set(m["ci95"]["per_dataset"]["MSD"]) == {"accuracy"}
    nih = m["per_dataset"]["NIH"]
    low, high = m["ci95"]["per_dataset"]["NIH"]["accuracy"]
    assert f"| NIH | {nih['n']} | 0 | {nih['n_no']} | specificity | {nih['accuracy']:.3f} [{low:.3f}, {high:.3f}] |" in tables_md

    m1 = run(tmp_path / "b1", 1)
    rows1 = read_jsonl(tmp_path / "b1" / "predictions.jsonl")
    assert [r["answer"] for r in rows1] == [r["answer"] for r in rows]
    assert [r["p_yes"] for r in rows1] == pytest.approx([r["p_yes"] for r in rows], abs=1e-5)
    assert m1["accuracy"] == m["accuracy"]

    # re-scoring the file without a model
    again = eval_classification.main(["--cfg-path", str(TC_EVAL), "--options", f"run.output_dir={tmp_path / 'r'}",
                                      "--predictions", str(tmp_path / "b4" / "predictions.jsonl"), "--bootstrap", "50"])
    for key in ("accuracy", "precision", "recall", "f1", "auc", "invalid", "confusion_matrix", "ci95"):
        assert again[key] == m[key], key


def test_msd_only_variant_is_reported_per_folder(tc_folder, tmp_path):
    from preprocessing.tc import import_tc

    # a confound-free folder: both classes from MSD (volume names distinct from the paper set's)
    crops = tmp_path / "crops"
    crops.mkdir()
    rng = np.random.default_rng(1)
    lines = ["image,dataset,volume,slice_index,answer"]
    for v in range(6):
        name = f"m{v}.png"
        Image.fromarray(rng.integers(0, 255, (20 + v, 24), dtype=np.uint8)).save(crops / name)
        lines.append(f"{name},MSD,msd_only_{v},1,{'yes' if v % 2 else 'no'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    import_tc(crops, tmp_path / "TC_msd_only", csv_path=str(tmp_path / "labels.csv"), test_ratio=0.5, val_ratio=0.0, seed=0)
    m = eval_classification.main(["--cfg-path", str(TC_EVAL), "--options", f"datasets.tc.root={tc_folder}",
                                  f"datasets.tc_msd.root={tmp_path / 'TC_msd_only'}", "datasets.tc_msd.task=tumor_classification",
                                  "model.ckpt=null", f"run.output_dir={tmp_path / 'out'}", "--bootstrap", "0", "--no-figures"])
    assert m["tc_variant"] == {"tc": "paper", "tc_msd": "msd-only"}
    folders = m["per_folder"]
    assert folders["tc_msd"]["n"] == 3 and folders["tc"]["n"] + 3 == m["n"]
    assert folders["tc_msd"]["n_yes"] + folders["tc_msd"]["n_no"] == 3
    text = (tmp_path / "out" / "tables.md").read_text()
    assert "#### Per TC folder" in text and f"| tc_msd | msd-only | 3 | {folders['tc_msd']['accuracy']:.3f} |" in text


def test_validation_score_contract(tc_folder, synthetic):
    from minigpt4.evaluation import validation_score
    from preprocessing.layout import read_prepared
    from tests.tiny import build_tiny_model

    model = build_tiny_model(max_new_tokens=4)
    model.train(True)
    records = read_prepared(synthetic, "pancreas_detection", "val")
    score, metrics = validation_score(model, records, "pancreas_detection", batch_size=3, max_samples=4)
    assert model.training  # mode restored
    assert metrics["weighted"]["n"] == 4 and score == metrics["weighted"]["mean_iou"]
    tc = read_prepared(tc_folder, "tumor_classification", "test")
    score, metrics = validation_score(model, tc, "tumor_classification", batch_size=4)
    assert score == metrics["accuracy"] and metrics["n"] == len(tc)
    with pytest.raises(ValueError, match="unknown task"):
        validation_score(model, tc, "segmentation", 4)


def test_eval_configs_name_the_weights_to_evaluate():
    from minigpt4.config import load_config

    expected = {
        "stage1_pancreas_detection": ("output/stage1_pancreas_detection/checkpoint_best", {"pancreas_detection"}),
        "stage2_tumor_classification": ("output/stage2_tumor_classification/checkpoint_best", {"tumor_classification"}),
        "stage3_tumor_detection": ("output/stage3_tumor_detection/checkpoint_best", {"tumor_detection"}),
        "abd_organ_detection": ("output/abd_organ_detection/checkpoint_best", {"organ_detection"}),
        "minigptv2_baseline": ("weights/checkpoint_stage3.pth",
                               {"pancreas_detection", "tumor_detection", "tumor_classification"}),
    }
    for name, (ckpt, tasks) in expected.items():
        cfg = load_config(ROOT / "eval_configs" / f"{name}.yaml")
        assert cfg.model.ckpt == ckpt and cfg.model.init_from is None, name
        assert cfg.model.text.path == "weights/Llama-2-7b-chat-hf" and cfg.model.vision.weights == "weights/eva_vit_g.pth"
        assert cfg.model.generation.max_new_tokens == 20 and cfg.run.eval_split == "test", name
        assert {d.task for d in cfg.datasets.values()} == tasks, name
    stage1 = load_config(ROOT / "eval_configs" / "stage1_pancreas_detection.yaml")
    train1 = load_config(ROOT / "train_configs" / "stage1_pancreas_detection.yaml")
    assert {n: (d.root, d.task, d.threshold) for n, d in stage1.datasets.items()} == \
        {n: (d.root, d.task, d.threshold) for n, d in train1.datasets.items()}  # same slices as training


def test_command_line_logs_the_weight_load_and_a_few_progress_lines(synthetic, trained, tmp_path, capsys, caplog):
    """``eval_detection.py`` through its command-line wrapper with stderr not a terminal: the
    checkpoint's load report is logged at INFO and the per-batch progress is at most 20 whole
    lines, not one ``\\r`` update per batch. (tests/test_cli.py checks that the wrapper's logging
    reaches stderr outside pytest.)"""
    import logging

    from minigpt4.cli import run_main
    from preprocessing.layout import read_prepared

    n = min(24, len(read_prepared(synthetic, "pancreas_detection", "train")))
    assert n > 20  # more batches than progress lines
    ckpt = trained / "checkpoint_best"
    argv = ["--cfg-path", str(QUICKSTART_EVAL), "--options", f"datasets.synthetic.root={synthetic}", f"model.ckpt={ckpt}",
            f"run.output_dir={tmp_path}", "model.max_new_tokens=2", "run.eval_batch_size=1", "--split", "train",
            "--max-samples", "24", "--bootstrap", "0", "--no-figures"]
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="minigpt4"):
        assert run_main(eval_detection.main, argv, prog="eval_detection.py") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert any(r.name == "minigpt4.models.checkpoints" and r.levelno == logging.INFO
               and r.getMessage().startswith(f"{ckpt / 'model.safetensors'}: ") for r in caplog.records)
    progress = [line for line in err.splitlines() if line.startswith("pancreas_detection: ")]
    assert 10 <= len(progress) <= 20 and progress[-1].startswith(f"pancreas_detection: {n}/{n} (100 %)")
