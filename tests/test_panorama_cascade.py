"""``eval_cascade.py`` on a PANORAMA-format folder (issue 27.4): detection maps in each CT's own
geometry (read back with nibabel against the raw CT), recomputed independently from
``predictions.jsonl``; the ``panorama`` section's AUROC recomputed with scikit-learn from the
sheet's labels and the volumes' scores, its AP with picai_eval from the written files; the
anchors in ``tables.md``; the patient truth from the sheet."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from minigpt4.io import read_json, read_jsonl
from tests.test_cascade import cascade_config
from tests.tiny import random_checkpoints, tiny_model_config

STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")


@pytest.fixture(scope="module")
def panorama(tmp_path_factory) -> dict:
    from preprocessing import synthetic_panorama
    from preprocessing.panorama import prepare_panorama
    from preprocessing.pipeline import Options

    folder = tmp_path_factory.mktemp("panorama")
    raw = synthetic_panorama.generate(folder / "raw", n_patients=8, n_slices=8, size=64, orient="LPS", seed=3,
                                      log=lambda *a: None)
    out = folder / "PANORAMA"
    prepare_panorama(Options(dataset="PANORAMA", images=[raw["images"]], labels=[("manual", raw["labels"][0]),
                                                                                ("automatic", raw["labels"][1])],
                             out=str(out), all_slices=True, workers=1, clinical=str(raw["clinical"])),
                     log=lambda *a: None)
    return {"raw": raw, "root": out}


def _config(tmp_path: Path, root: Path, paths: dict, cfg) -> Path:
    """The PANORAMA folder alone; stage 3 asked on every boxed slice (thresholds 0)."""
    return cascade_config(tmp_path, {"panorama": root}, paths, cfg, threshold=0.0, slice_threshold=0.0, bootstrap=50)


def test_eval_cascade_on_panorama(tmp_path, panorama):
    import eval_cascade
    from sklearn.metrics import roc_auc_score

    from minigpt4.boxes import grid_to_pixel_inclusive
    from minigpt4.inference.pipeline import answer_box
    from minigpt4.scan_outputs import geometry_from_image
    from preprocessing.layout import read_volumes

    torch.set_num_threads(1)
    cfg = tiny_model_config(max_new_tokens=6)
    paths = random_checkpoints(tmp_path / "ckpt", cfg, STAGES)
    metrics = eval_cascade.main(["--cfg-path", str(_config(tmp_path, panorama["root"], paths, cfg))])
    out = tmp_path / "out"
    test = read_volumes(panorama["root"], "test")
    assert test
    section = metrics["panorama"]
    assert set(section) >= {"auroc", "ap", "score", "ci95", "n_studies", "n_pdac", "criterion", "patient_truth",
                            "pdac_without_lesion_voxels", "non_pdac_with_lesion_voxels", "detection_maps"}
    assert section["n_studies"] == len(test)
    assert section["criterion"]["min_overlap"] == 0.10 and section["criterion"]["overlap"] == "IoU"
    assert "clinical sheet" in section["patient_truth"]
    assert json.loads((out / "metrics.json").read_text())["panorama"]["n_studies"] == len(test)
    # patient truth from the sheet (records' patient_label); AUROC = scikit-learn's on the volumes' scores
    truth = {name: recs[0]["patient_label"] == "PDAC" for name, recs in test.items()}
    assert section["n_pdac"] == sum(truth.values())
    aggregation = metrics["selection"]["aggregation"]
    scores = {name: metrics["volumes"][f"PANORAMA/{name}"][aggregation] for name in test}
    if 0 < sum(truth.values()) < len(truth):
        assert section["auroc"] == pytest.approx(roc_auc_score([truth[n] for n in test], [scores[n] for n in test]), abs=1e-6)
    rows = read_jsonl(out / "predictions.jsonl")
    images = Path(panorama["raw"]["images"])
    for name, recs in test.items():
        ct = nib.load(images / f"{name}_0000.nii.gz")
        dmap = nib.load(out / "detection_maps" / f"{name}.nii.gz")
        assert dmap.shape == ct.shape and np.allclose(dmap.affine, ct.affine)
        # independent recomputation: every stage-3 box of predictions.jsonl, filled on its stored voxels
        geometry = geometry_from_image(ct)
        h, w, _ = geometry.display_shape
        expected = np.zeros(ct.shape, dtype=bool)
        for row in rows:
            if row["volume_name"] == name and row["tumor_box"] is not None:
                grid, _ = answer_box(row["tumor_answer"], w, h)
                lo, hi = geometry.voxel_box(grid_to_pixel_inclusive(grid, w, h), row["slice_index"])
                expected[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
        assert np.array_equal(np.asarray(dmap.dataobj) > 0, expected)
    # AP: picai_eval itself on the written maps and the label files (label 1 = lesion)
    from minigpt4.evaluation.panorama import MIN_OVERLAP

    from picai_eval import evaluate

    labels = {Path(p).name.replace(".nii.gz", ""): Path(p) for folder in panorama["raw"]["labels"]
              for p in Path(folder).glob("*.nii.gz")}
    names = sorted(test)
    independent = evaluate([np.asarray(nib.load(out / "detection_maps" / f"{n}.nii.gz").dataobj) for n in names],
                           [(np.asarray(nib.load(labels[n]).dataobj) == 1).astype(int) for n in names],
                           subject_list=names, min_overlap=MIN_OVERLAP, num_parallel_calls=1)
    if section["n_reference_lesions"]:
        assert section["ap"] == pytest.approx(independent.AP)
    text = (out / "tables.md").read_text()
    assert "PANORAMA scoring" in text and "0.92 (95 % CI 0.90–0.93)" in text and "hidden test set" in text
    assert (out / "panorama_curves.png").stat().st_size > 1000
    # re-running is safe: the same maps, no stale ones
    eval_cascade.main(["--cfg-path", str(_config(tmp_path, panorama["root"], paths, cfg))])
    assert sorted(p.name for p in (out / "detection_maps").iterdir()) == sorted(f"{n}.nii.gz" for n in test)


def test_missing_ct_is_refused_before_the_model(tmp_path, panorama, capsys):
    import shutil

    import eval_cascade
    from minigpt4.cli import run_main
    from preprocessing.layout import read_volumes

    raw = tmp_path / "raw"
    shutil.copytree(Path(panorama["raw"]["images"]).parent, raw)
    root = tmp_path / "PANORAMA"
    shutil.copytree(panorama["root"], root)
    manifest = read_json(root / "manifest.json")
    old_images = manifest["parameters"]["images"][0]
    manifest["parameters"]["images"] = [str(raw / Path(old_images).name)]
    manifest["parameters"]["labels"] = [[s, str(raw / Path(p).name)] for s, p in manifest["parameters"]["labels"]]
    manifest["parameters"]["clinical"] = str(raw / Path(manifest["parameters"]["clinical"]).name)
    (root / "manifest.json").write_text(json.dumps(manifest))
    name = sorted(read_volumes(root, "test"))[0]
    (raw / Path(old_images).name / f"{name}_0000.nii.gz").unlink()
    cfg = tiny_model_config()
    paths = {s: str(tmp_path / "missing") for s in STAGES}  # never loaded: the data check comes first
    for p in paths.values():
        Path(p).mkdir(exist_ok=True)
    status = run_main(eval_cascade.main, ["--cfg-path", str(_config(tmp_path, root, paths, cfg))], prog="eval_cascade.py")
    assert status == 2
    err = capsys.readouterr().err
    assert f"PANORAMA/{name}" in err and "CT/label files" in err


def test_panorama_section_by_hand(tmp_path, panorama):
    """Hand-made stage-3 answers on four phantom studies (one hit, one miss, one false positive,
    one empty): the maps written where the boxes are, AP 0.5 and AUROC 0.75 as computed by hand."""
    from types import SimpleNamespace

    from minigpt4.boxes import format_box, grid_to_pixel_inclusive, pixel_to_grid
    from minigpt4.evaluation.cascade import panorama_section
    from minigpt4.scan_outputs import geometry_from_image
    from preprocessing.layout import read_volumes

    root = panorama["root"]
    every = {n: r for split in ("train", "val", "test") for n, r in read_volumes(root, split).items()}
    pdac = sorted(n for n, r in every.items() if r[0]["patient_label"] == "PDAC"
                  and any(x["pixels_tumor"] > 0 for x in r))
    other = sorted(n for n, r in every.items() if r[0]["patient_label"] == "non-PDAC")
    a, b, c, d = pdac[0], pdac[1], other[0], other[1]
    volumes = {("PANORAMA", n): every[n] for n in (a, b, c, d)}
    rows = []
    for name, recs in volumes.items():
        for r in recs:
            row = {"dataset": "PANORAMA", "volume_name": name[1], "slice_index": r["slice_index"], "pancreas_answer": "",
                   "p_tumor": 0.05, "tumor_answer": None, "tumor_box": None}
            grid = None
            if name[1] == a and r["pixels_tumor"] > 0:  # the hit: the reference box on every lesion slice
                grid, row["p_tumor"] = pixel_to_grid(r["bbox_tumor"], r["width"], r["height"]), 0.9
            if name[1] == b and r["pixels_tumor"] > 0 and r["slice_index"] == min(
                    x["slice_index"] for x in recs if x["pixels_tumor"] > 0):  # far from the lesion: FP + missed
                grid, row["p_tumor"] = (0, 0, 4, 4), 0.6
            if name[1] == c and r["slice_index"] == 2:
                grid, row["p_tumor"] = (0, 90, 4, 96), 0.7
            if grid is not None:
                row["tumor_answer"], row["tumor_box"] = format_box(grid), [float(v) for v in grid]
            rows.append(row)
    scores = {a: 0.8, b: 0.3, c: 0.5, d: 0.1}
    patients = {key: {"scores": {"max": scores[key[1]]}, "inconclusive": False} for key in volumes}
    cfg = SimpleNamespace(datasets={"panorama": SimpleNamespace(root=str(root))},
                          cascade=SimpleNamespace(bootstrap=0), run=SimpleNamespace(seed=0))
    out = tmp_path / "run"
    section = panorama_section(cfg, volumes, rows, patients, "max", out)
    assert section["ap"] == pytest.approx(0.5) and section["auroc"] == pytest.approx(0.75)
    assert section["score"] == pytest.approx(0.625)
    assert (section["n_true_positive"], section["n_false_positive"], section["n_missed"]) == (1, 2, 1)
    images = Path(panorama["raw"]["images"])
    for (_, name), recs in volumes.items():
        ct = nib.load(images / f"{name}_0000.nii.gz")
        geometry = geometry_from_image(ct)
        h, w, _ = geometry.display_shape
        expected = np.zeros(ct.shape, dtype=np.float32)
        for row in rows:
            if row["volume_name"] == name and row["tumor_answer"]:
                grid = tuple(int(v) for v in row["tumor_box"])  # the grid box the answer says
                lo, hi = geometry.voxel_box(grid_to_pixel_inclusive(grid, w, h), row["slice_index"])
                expected[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = {a: 0.9, b: 0.6, c: 0.7}[name]
        dmap = nib.load(out / "detection_maps" / f"{name}.nii.gz")
        assert np.allclose(dmap.affine, ct.affine) and np.array_equal(np.asarray(dmap.dataobj), expected)
    assert np.count_nonzero(np.asarray(nib.load(out / "detection_maps" / f"{a}.nii.gz").dataobj)) > 0
