"""The clinical cascade (issue 13): three stages on one base answer as each checkpoint alone;
crops from a box equal ``preprocessing tc``'s; patient aggregation, threshold choice and 3-D
boxes hand-computed; ``eval_cascade.py`` end to end on phantoms with random tiny stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from minigpt4.config import ConfigError
import eval_cascade
from minigpt4.evaluation import cascade, operating_points
from minigpt4.inference import pipeline
from minigpt4.evaluation.tables import fmt
from minigpt4.io import read_json, read_jsonl
from tests.tiny import random_checkpoints, tiny_images, tiny_model_config

STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")
QUESTIONS = ["[refer] Give me the location of the pancreas", "[vqa] Does the pancreas in the image present a tumor?"]


def random_stage_checkpoints(folder: Path, cfg) -> dict[str, str]:
    """Three checkpoints of one base with different random trainable tensors."""
    return random_checkpoints(folder, cfg, STAGES)


@pytest.mark.parametrize("vit_trainable", [False, True])
def test_stages_on_one_base_answer_as_each_checkpoint_alone(tmp_path, vit_trainable):
    from minigpt4.models.minigpt_v2 import build_model
    from minigpt4.models.stages import load_stages

    torch.set_num_threads(1)
    cfg = tiny_model_config(**{"vision.trainable": vit_trainable})
    paths = random_stage_checkpoints(tmp_path, cfg)
    stages = load_stages(cfg, paths)
    images = tiny_images(2)
    alone = {s: build_model(dataclasses.replace(cfg, ckpt=p)).eval() for s, p in paths.items()}
    expected = {s: (m.generate(images, QUESTIONS), m.yes_probability(images, QUESTIONS)) for s, m in alone.items()}
    assert len({tuple(a) for a, _ in expected.values()}) == 3  # the stages really differ
    # every order of switching, back and forth
    for stage in ("tumor_detection", "pancreas_detection", "tumor_classification", "pancreas_detection", "tumor_detection"):
        model = stages.use(stage)
        assert model.generate(images, QUESTIONS) == expected[stage][0]
        assert torch.equal(model.yes_probability(images, QUESTIONS), expected[stage][1])
    # one base: EVA (when frozen) and LLaMA weights exist once
    llama_weights = [n for n, _ in stages.model.named_parameters() if "q_proj.base_layer.weight" in n]
    assert len(llama_weights) == cfg.text.num_layers
    assert sorted(stages.names) == sorted(STAGES)


def test_stages_share_the_frozen_minigpt_v2_adapter_their_checkpoints_carry(tmp_path):
    """Stages trained from MiniGPT-v2 stage 3 (q,v LoRA, stacked frozen under q,k) carry that adapter:
    on one base it is stacked once, and each stage still answers as its checkpoint alone."""
    from minigpt4.models.minigpt_v2 import build_model
    from minigpt4.models.stages import load_stages
    from tests.test_checkpoints import release_state, save_release_pth

    torch.set_num_threads(1)
    save_release_pth(tmp_path / "checkpoint_stage3.pth", release_state(("q_proj", "v_proj")))
    trained_cfg = tiny_model_config(init_from=str(tmp_path / "checkpoint_stage3.pth"))
    paths = random_stage_checkpoints(tmp_path / "ckpt", trained_cfg)
    cfg = tiny_model_config()  # the served config names no init_from: the checkpoints carry it
    stages = load_stages(cfg, paths)
    names = [e["name"] for e in stages.model.adapter_stack()]
    assert names == ["default", "checkpoint_stage3", *STAGES]  # stacked once
    images = tiny_images(2)
    for stage in ("tumor_detection", "pancreas_detection", "tumor_classification"):
        alone = build_model(dataclasses.replace(cfg, ckpt=paths[stage])).eval()
        assert [e["name"] for e in alone.adapter_stack() if e["active"]] == ["default", "checkpoint_stage3"]
        model = stages.use(stage)
        assert model.active_adapters() == [stage, "checkpoint_stage3"]
        assert torch.equal(model.yes_probability(images, QUESTIONS), alone.yes_probability(images, QUESTIONS))
        assert model.generate(images, QUESTIONS) == alone.generate(images, QUESTIONS)


def test_stages_refuse_an_unknown_stage(tmp_path):
    from minigpt4.models.stages import load_stages

    with pytest.raises(ValueError, match="unknown cascade stage"):
        load_stages(tiny_model_config(), {"stage4": str(tmp_path)})


# ----------------------------------------------------------------------------- phantoms
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    return prepare_phantoms(tmp_path_factory.mktemp("cascade_data"))


def prepare_phantoms(folder: Path) -> dict[str, Path]:
    """MSD and NIH phantoms prepared with --all-slices, and a TC folder from them (≈2 s)."""
    from preprocessing import pipeline, synthetic
    from preprocessing.tc import build_tc

    out = {}
    for scheme, n in (("msd", 8), ("nih", 6)):
        raw = synthetic.generate(folder / "raw" / scheme, scheme, n, 8, 64, "RAS", 0, "nifti", log=lambda *a: None)
        out[scheme.upper()] = folder / scheme.upper()
        pipeline.prepare(pipeline.Options(dataset=scheme.upper(), images=[raw["images"]], labels=raw["labels"],
                                          out=str(out[scheme.upper()]), all_slices=True, workers=1), log=lambda *a: None)
    out["TC"] = folder / "TC"
    build_tc(out["MSD"], out["NIH"], out["TC"], margin=2)
    return out


def test_all_slices_writes_every_slice(prepared):
    infos = read_json(prepared["MSD"] / "annotations" / "MSD_slices_info.json")
    assert len(infos) == 8 * 8
    assert all(r["image"] and (prepared["MSD"] / r["image"]).is_file() for r in infos)
    assert any(r["pixels_pancreas"] == 0 for r in infos)  # slices without a target are there too


def test_crop_from_a_box_equals_preprocessing_tc(prepared):
    """cut_crop with the ground-truth box and the TC margin = the TC folder's PNG, pixel for pixel."""
    infos = {}
    for ds in ("MSD", "NIH"):
        for r in read_json(prepared[ds] / "annotations" / f"{ds}_slices_info.json"):
            infos[(ds, r["volume_name"], r["slice_index"])] = (prepared[ds], r)
    tc_rows = [r for s in ("train", "val", "test") for r in read_json(prepared["TC"] / "annotations" / f"TC_{s}.json")]
    assert tc_rows
    for row in tc_rows:
        root, info = infos[(row["dataset"], row["volume_name"], row["slice_index"])]
        pixels = np.asarray(Image.open(root / info["image"]))
        crop, box = pipeline.cut_crop(pixels, info["bbox_pancreas"], margin=2)
        assert list(box) == row["crop_box"]
        assert np.array_equal(crop, np.asarray(Image.open(prepared["TC"] / row["image"])))


# ----------------------------------------------------------------------------- hand-computed
def test_grid_box_to_the_widest_inclusive_pixel_box():
    from minigpt4.boxes import grid_to_pixel_inclusive, pixel_to_grid

    # 512 px: grid cell g covers pixels ceil(5.12 g) .. ceil(5.12 (g + 1)) - 1
    assert grid_to_pixel_inclusive((25, 50, 74, 99), 512, 512) == (128, 256, 383, 511)
    assert grid_to_pixel_inclusive((10, 10, 10, 10), 512, 512) == (52, 52, 56, 56)  # 51.2 → 52 .. 56.32 → 56
    assert grid_to_pixel_inclusive((0, 0, 100, 100), 64, 48) == (0, 0, 63, 47)  # clipped to the image
    # 600 px: pixel 174 is exactly the first of cell 29 (174 * 100 / 600 = 29, computed exactly)
    assert pixel_to_grid((174, 174, 174, 174), 600, 600)[0] == 29
    assert grid_to_pixel_inclusive((29, 29, 29, 29), 600, 600) == (174, 174, 179, 179)
    rng = np.random.default_rng(0)
    for _ in range(3000):  # the round trip and "widest": one more pixel changes the grid box
        w, h = (int(v) for v in rng.integers(5, 700, size=2))
        x1, x2 = sorted(int(v) for v in rng.integers(0, w, size=2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, h, size=2))
        grid = pixel_to_grid((x1, y1, x2, y2), w, h)
        box = grid_to_pixel_inclusive(grid, w, h)
        assert pixel_to_grid(box, w, h) == grid
        assert box[0] <= x1 and box[1] <= y1 and box[2] >= x2 and box[3] >= y2
        assert box[2] == w - 1 or pixel_to_grid((box[0], box[1], box[2] + 1, box[3]), w, h) != grid
        assert box[0] == 0 or pixel_to_grid((box[0] - 1, box[1], box[2], box[3]), w, h) != grid


def test_aggregation_and_threshold_by_hand():
    assert pipeline.aggregate([0.2, None, 0.9, 0.5, 0.7], "max", 3) == 0.9
    assert pipeline.aggregate([0.2, None, 0.9, 0.5, 0.7], "top_k_mean", 3) == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert pipeline.aggregate([0.4, 0.8], "top_k_mean", 3) == pytest.approx(0.6)  # fewer than k: all
    assert pipeline.aggregate([None, None], "max", 3) == 0.0  # no crop anywhere
    # volumes: tumor scores 0.9, 0.6, 0.3; healthy 0.5, 0.2. Youden's J by threshold:
    # t=0.9: 1/3+1-1 = 0.333; t=0.6: 2/3+1-1 = 0.667; t=0.5: 2/3+1/2-1 = 0.167; t=0.3: 1+1/2-1 = 0.5
    labels, scores = [True, True, True, False, False], [0.9, 0.6, 0.3, 0.5, 0.2]
    assert operating_points.choose_threshold(labels, scores) == 0.6
    assert operating_points.sensitivity_specificity(np.array(labels), np.array(scores), 0.6) == (pytest.approx(2 / 3), 1.0)
    assert operating_points.choose_threshold([True, True], [0.1, 0.2]) is None  # one class: undefined


def test_patient_level_on_a_small_synthetic_case():
    """Two tumor volumes, one healthy; three slices each."""

    def rows(volume, p, tumor):
        return [{"dataset": "MSD", "volume_name": volume, "p_tumor": v, "has_tumor": t, "pancreas_box": (1, 1, 5, 5)}
                for v, t in zip(p, tumor)]

    val = rows("a", [0.9, 0.1, 0.1], [1, 0, 0]) + rows("b", [0.6, 0.5, 0.4], [0, 1, 1]) + rows("c", [0.7, 0.0, 0.0], [0, 0, 0])
    patients = operating_points.patient_scores(val, top_k=2)
    # logit-space top-2 mean: a: logit 0.9 = 2.197, logit 0.1 = -2.197 → mean 0 → 0.5; b: logit 0.6 = 0.405,
    # logit 0.5 = 0 → sigmoid(0.20273) = 0.550510; c: logit 0.7 = 0.847, P 0 clipped to 1e-7 → logit -16.118 →
    # sigmoid(-7.635) = 4.83e-4. mean of all three: 0.3667, 0.5, 0.2333
    assert patients[("MSD", "a")] == {"dataset": "MSD", "label": True, "n_boxed": 3, "n_dropped": 0, "inconclusive": False,
                                      "scores": {"max": 0.9, "top_k_mean": pytest.approx(0.5),
                                                 "top_k_logit_mean": pytest.approx(0.5), "mean": pytest.approx(1.1 / 3)}}
    assert patients[("MSD", "b")]["scores"] == {"max": 0.6, "top_k_mean": pytest.approx(0.55),
                                                "top_k_logit_mean": pytest.approx(0.550510, abs=1e-6), "mean": pytest.approx(0.5)}
    assert patients[("MSD", "c")]["scores"] == {"max": 0.7, "top_k_mean": pytest.approx(0.35),
                                                "top_k_logit_mean": pytest.approx(4.83e-4, rel=1e-2), "mean": pytest.approx(0.7 / 3)}
    selection = operating_points.select_operating_point(patients, "auto", None)
    # max: tumor 0.9, 0.6 vs healthy 0.7 → AUC 1/2; the three others rank both tumors above c → AUC 1
    assert selection["val_auc"] == {"max": 0.5, "top_k_mean": 1.0, "top_k_logit_mean": 1.0, "mean": 1.0}
    assert selection["aggregation"] == "top_k_mean"  # ties: the first in AGGREGATIONS
    assert selection["threshold"] == pytest.approx(0.5)  # lowest tumor score: sens 1, spec 1
    assert selection["thresholds"]["max"] == 0.9  # J: t=0.9 → 0.5, t=0.7 → −0.5, t=0.6 → 0
    metrics = operating_points.patient_metrics(patients, selection["thresholds"], n_boot=0, seed=0)["inconclusive_excluded"]
    assert metrics["top_k_mean"]["auc"] == 1.0
    assert (metrics["top_k_mean"]["sensitivity"], metrics["top_k_mean"]["specificity"]) == (1.0, 1.0)
    assert (metrics["max"]["sensitivity"], metrics["max"]["specificity"]) == (0.5, 1.0)
    fixed = operating_points.select_operating_point(patients, "max", 0.65)
    assert (fixed["aggregation"], fixed["threshold"]) == ("max", 0.65)


def test_3d_boxes_by_hand():
    # slices 2 and 3 with boxes (10,10,20,20) and (12,8,22,18): union x 10..22, y 8..20, z [2, 4)
    assert cascade.box_3d([(2, (10, 10, 20, 20)), (3, (12, 8, 22, 18))]) == (10, 8, 2.0, 22, 20, 4.0)
    truth = (10.0, 10.0, 2.0, 20.0, 20.0, 4.0)  # 10 × 10 × 2 = 200
    pred = (15.0, 10.0, 3.0, 25.0, 20.0, 5.0)  # 10 × 10 × 2 = 200; overlap 5 × 10 × 1 = 50
    assert cascade.iou_3d(pred, truth) == pytest.approx(50 / 350)
    assert cascade.iou_3d(None, truth) == 0.0
    records = [{"slice_index": k, "pixels_pancreas": p, "bbox_pancreas": b, "pixels_tumor": t, "bbox_tumor": tb}
               for k, p, b, t, tb in [(0, 0, [0, 0, 0, 0], 0, [0, 0, 0, 0]), (1, 5, [4, 4, 8, 9], 0, [0, 0, 0, 0]),
                                      (2, 9, [3, 5, 9, 9], 2, [5, 6, 6, 7])]]
    assert cascade.volume_truth(records) == {"tumor": True, "pancreas_3d": (3, 4, 1.0, 9, 9, 3.0),
                                             "tumor_3d": (5, 6, 2.0, 6, 7, 3.0)}


# ----------------------------------------------------------------------------- end to end
def cascade_config(tmp_path: Path, folders: dict, paths: dict, cfg, threshold=None, slice_threshold=None,
                   bootstrap: int = 20) -> Path:
    """``tmp_path/cascade.yaml`` for eval_cascade: ``folders`` ``{name: prepared folder}``, the stage
    checkpoints ``paths``, the tiny model ``cfg``; output in ``tmp_path/out``."""
    doc = {
        "model": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "datasets": {name: {"root": str(root), "task": "pancreas_detection"} for name, root in folders.items()},
        "cascade": {"stages": paths, "threshold": threshold, "slice_threshold": slice_threshold, "top_k": 2,
                    "bootstrap": bootstrap, "crop_margin": 2},
        "run": {"output_dir": str(tmp_path / "out"), "device": "cpu", "eval_batch_size": 16},
    }
    path = tmp_path / "cascade.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(doc)))
    return path


def _cascade_config(tmp_path: Path, prepared: dict, paths: dict, cfg, threshold=None, slice_threshold=None) -> Path:
    """:func:`cascade_config` over the prepared MSD and NIH phantoms."""
    return cascade_config(tmp_path, {"msd": prepared["MSD"], "nih": prepared["NIH"]}, paths, cfg, threshold, slice_threshold)


def test_eval_cascade_end_to_end(tmp_path, prepared):
    from preprocessing.layout import read_volumes

    torch.set_num_threads(1)
    cfg = tiny_model_config(max_new_tokens=6, **{"vision.trainable": True})
    paths = random_stage_checkpoints(tmp_path / "ckpt", cfg)
    config = _cascade_config(tmp_path, prepared, paths, cfg, threshold=0.0, slice_threshold=0.0)  # stage 3 on every boxed slice
    metrics = eval_cascade.main(["--cfg-path", str(config)])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"predictions.jsonl", "metrics.json", "tables.md", "p_tumor_along_z.png",
                                              "reliability.png", "config.yaml"}
    rows = read_jsonl(out / "predictions.jsonl")
    test_slices = sum(len(v) for ds in ("MSD", "NIH") for v in read_volumes(prepared[ds], "test").values())
    assert len(rows) == test_slices  # every slice of every test volume, also those without pancreas
    assert any(not r["has_pancreas"] for r in rows)
    assert set(metrics["slice"]) == {
        "n_slices", "pancreas_iou", "n_pancreas_slices", "pancreas_box_rate", "false_box_rate",
        "n_slices_without_pancreas", "p_no_box_auc", "slice_threshold", "tc_accuracy_predicted_crops", "tc_accuracy_gt_crops",
        "tc_auc_predicted_crops", "n_tc_slices", "n_tc_tumor_slices", "tc_auc_predicted_crops_boxed", "n_tc_slices_boxed",
        "n_tc_tumor_slices_boxed", "tc_auc_gt_crops", "n_tc_slices_gt_crop",
        "tumor_iou", "tumor_iou_stage3_alone", "n_tumor_slices", "tumor_asked_rate"}
    assert set(metrics["patient"]) == {"n_volumes", "n_tumor", "n_inconclusive", "n_inconclusive_tumor",
                                       "inconclusive_as_positive", "inconclusive_excluded", "operating_points",
                                       "pancreas_iou_3d", "n_pancreas_volumes", "tumor_iou_3d", "n_tumor_volumes"}
    for mode in ("inconclusive_as_positive", "inconclusive_excluded"):
        assert set(metrics["patient"][mode]) == {"n_volumes", "n_tumor", "max", "top_k_mean", "top_k_logit_mean", "mean"}
        assert set(metrics["patient"][mode]["max"]) == {"threshold", "auc", "sensitivity", "specificity", "ci95"}
    assert set(metrics["patient"]["operating_points"]) == {"aggregation", "n_val_negative", "youden", "specificity_95",
                                                           "specificity_99"}
    assert set(metrics["inconclusive"]) == {"val", "test", "rule"}
    # calibration (issue 28.1): chosen on val, Brier / ECE before and after on the conclusive test volumes
    cal = metrics["calibration"]
    assert set(cal) == {"brier", "ece", "n_test_volumes", "test_volumes", "patient", "slice", "map"}
    conclusive = [v for v in metrics["volumes"].values() if not v["inconclusive"]]
    labels = np.array([v["tumor"] for v in conclusive], float)
    raw = np.array([v[metrics["selection"]["aggregation"]] for v in conclusive])
    assert cal["n_test_volumes"] == len(conclusive)
    if conclusive:
        assert cal["brier"]["before"] == pytest.approx(np.mean((raw - labels) ** 2), abs=1e-5)
    else:  # random tiny stages box no pancreas: every test volume is inconclusive, nothing to score
        assert cal["brier"] == {"before": None, "after": None}
    if cal["map"] is None:  # the phantoms' val split is too small to fit one: said, and nothing "after"
        assert cal["brier"]["after"] is None and "needed to choose and fit a map" in cal["patient"]["selection"]["reason"]
    assert (out / "reliability.png").is_file() and "## Calibration" in (out / "tables.md").read_text()
    assert (out / "manifest.json").is_file() and read_json(out / "manifest.json")["command"] == "eval_cascade"
    assert metrics["selection"]["threshold_rule"] == "configured (cascade.threshold)"
    # the scan and the demo prepare a volume as these folders were prepared (the phantoms: the paper's)
    assert read_json(out / "operating_point.json")["normalization"] == {"method": "paper", "window": [-150.0, 250.0]}
    # threshold 0: stage 3 is asked on every slice that got a pancreas box, and only there
    assert all(r["tumor_asked"] == (r["pancreas_box"] is not None) for r in rows)
    # the rows' numbers are the metrics' numbers
    with_pancreas = [r["pancreas_iou"] for r in rows if r["has_pancreas"]]
    assert metrics["slice"]["pancreas_iou"] == pytest.approx(np.mean(with_pancreas))
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["slice"] == pytest.approx(metrics["slice"], nan_ok=True)
    assert "Patient level" in (out / "tables.md").read_text()
    # cascade.max_volumes: evenly spaced subset per folder and split
    from minigpt4.config import load_config

    subset = cascade.load_volumes(load_config(config, ["cascade.max_volumes=1"]), "test")
    assert sorted(d for d, _ in subset) == ["MSD", "NIH"]


def test_eval_cascade_shows_a_compared_stage1_beside_its_own(tmp_path, prepared):
    """``cascade.compare_pancreas_detection``: the other stage 1 through the same stages 2-3; its
    column equals what eval_cascade reports with that stage 1 alone."""
    from tests.tiny import random_checkpoints

    torch.set_num_threads(1)
    cfg = tiny_model_config(max_new_tokens=6, **{"vision.trainable": True})
    paths = random_stage_checkpoints(tmp_path / "ckpt", cfg)
    other = random_checkpoints(tmp_path / "other", cfg, ["pancreas_detection"], seed=7)["pancreas_detection"]
    (tmp_path / "alone").mkdir()
    alone = eval_cascade.main(["--cfg-path", str(_cascade_config(tmp_path / "alone", prepared, {**paths, "pancreas_detection": other}, cfg))])
    config = _cascade_config(tmp_path, prepared, paths, cfg)
    metrics = eval_cascade.main(["--cfg-path", str(config), "--options", f"cascade.compare_pancreas_detection={other}"])
    compared = metrics["stage1_compared"]
    assert compared["baseline"] == cascade._stage1_summary(alone) and compared["this"] == cascade._stage1_summary(metrics)
    assert compared["baseline"]["checkpoint"]["path"] == other and compared["this"]["checkpoint"]["path"] == paths["pancreas_detection"]
    assert compared["baseline"]["false_box_rate"] == alone["slice"]["false_box_rate"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["stage1_compared"] == json.loads(json.dumps(compared))
    table = (tmp_path / "out" / "tables.md").read_text().split("## Stage 1 compared")[1]
    assert "| compared: `other` | this cascade: `ckpt` |" in table.splitlines()[2]
    assert f"| false box rate (slices without pancreas given a box) | {fmt(alone['slice']['false_box_rate'])} " in table
    # the comparison run writes nothing of its own: the predictions are this cascade's, one row per test slice
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(rows) == alone["slice"]["n_slices"] == metrics["slice"]["n_slices"]
    others = read_jsonl(tmp_path / "alone" / "out" / "predictions.jsonl")
    assert [(r["volume_name"], r["slice_index"]) for r in rows] == [(r["volume_name"], r["slice_index"]) for r in others]
    assert [r["p_no_box"] for r in rows] != [r["p_no_box"] for r in others]  # this stage 1's, not the compared one's
    with pytest.raises(FileNotFoundError, match="cascade.yaml: cascade.compare_pancreas_detection .*missing not found; "
                                                "train it, or set cascade.compare_pancreas_detection=null"):
        eval_cascade.main(["--cfg-path", str(config), "--overwrite", "--options",
                           f"cascade.compare_pancreas_detection={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="cascade.compare_pancreas_detection is cascade.stages.pancreas_detection"):
        eval_cascade.main(["--cfg-path", str(config), "--overwrite", "--options",
                           f"cascade.compare_pancreas_detection={paths['pancreas_detection']}"])


def test_eval_cascade_refuses_folders_without_all_slices(tmp_path):
    from preprocessing import pipeline, synthetic

    raw = synthetic.generate(tmp_path / "raw", "msd", 5, 8, 64, "RAS", 0, "nifti", log=lambda *a: None)
    pipeline.prepare(pipeline.Options(dataset="MSD", images=[raw["images"]], labels=raw["labels"],
                                      out=str(tmp_path / "MSD"), workers=1), log=lambda *a: None)
    cfg = tiny_model_config()
    paths = {s: str(tmp_path) for s in STAGES}
    config = _cascade_config(tmp_path, {"MSD": tmp_path / "MSD", "NIH": tmp_path / "MSD"}, paths, cfg)
    with pytest.raises(FileNotFoundError, match="--all-slices"):
        eval_cascade.main(["--cfg-path", str(config)])
    config.write_text(config.read_text().replace("pancreas_detection: " + str(tmp_path), "pancreas_detection: null", 1))
    with pytest.raises(ConfigError, match="cascade.stages.pancreas_detection"):
        eval_cascade.main(["--cfg-path", str(config)])


# ----------------------------------------------------------------------------- demo, three stages
def test_demo_serves_three_stages_routes_tasks_and_scans_with_the_cascade(tmp_path):
    from minigpt4.config import load_config
    from minigpt4.demo.service import load_service
    from minigpt4.inference.pipeline import model_images
    from minigpt4.models.minigpt_v2 import build_model

    torch.set_num_threads(1)
    cfg = tiny_model_config(max_new_tokens=6, **{"vision.trainable": True})
    paths = random_stage_checkpoints(tmp_path / "ckpt", cfg)
    config = tmp_path / "demo.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "model": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "cascade": {"stages": paths, "threshold": 0.3, "slice_threshold": 0.3, "aggregation": "top_k_mean", "top_k": 2,
                    "z_rule": "none", "min_boxed_slices": 1},
        "run": {"device": "cpu"}})))
    service = load_service(load_config(config))
    assert service.stages is not None and service.warning is None
    assert "stage 2 (tumor classification)" in service.description
    assert service.normalization == "paper"  # no operating point file: nothing recorded, the paper's
    # an operating point chosen on windowed folders: the demo offers that normalisation first
    from minigpt4.inference.operating_point import operating_point_record
    from minigpt4.inference.patient import min_assessed_rule

    point = operating_point_record({"aggregation": "max", "threshold": 0.3, "slice_threshold": 0.3}, 2,
                                   min_assessed_rule([2]), "none", {}, 4, "MSD+NIH", {"method": "window", "window": [-150.0, 250.0]})
    (tmp_path / "operating_point.json").write_text(json.dumps(point))
    windowed = load_service(load_config(config, ["cascade.threshold=null", "cascade.slice_threshold=null",
                                                 "cascade.min_boxed_slices=null",
                                                 f"cascade.operating_point={tmp_path / 'operating_point.json'}"]))
    assert windowed.normalization == "window"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(64, 64), dtype=np.uint8)
    pixels = model_images(service.model, [image])
    for instruction, stage in [("[refer] Give me the location of the pancreatic tumor", "tumor_detection"),
                               ("[vqa] Does the pancreas in the image present a tumor?", "tumor_classification"),
                               ("[refer] Give me the location of the pancreas", "pancreas_detection")]:
        answer = service.ask(image, instruction)
        alone = build_model(dataclasses.replace(cfg, ckpt=paths[stage])).eval()
        assert answer.stage == stage
        assert answer.text == alone.generate(pixels, [instruction], max_new_tokens=6)[0]
        assert f"Answered by stage {STAGES.index(stage) + 1}" in answer.message
    volume = rng.integers(0, 255, size=(5, 64, 64), dtype=np.uint8)
    result = service.scan_volume(volume)
    expected = pipeline.run_stages(service.stages, list(volume), pipeline.CascadeSettings(threshold=0.3, batch_size=4))
    assert [r.p_tumor for r in result.rows] == [e.p_tumor for e in expected]
    assert result.patient.score == pytest.approx(pipeline.aggregate([e.p_tumor for e in expected], "top_k_mean", 2))
    boxed = sum(e.pancreas_box is not None for e in expected)
    assert result.patient.n_slices_boxed == boxed
    assert result.patient.decision == ("inconclusive" if boxed == 0 else "tumor" if result.patient.score >= 0.3 else "no tumor")
    assert "Patient-level answer" in result.patient_text()
