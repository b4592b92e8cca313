"""PANORAMA scoring (minigpt4.evaluation.panorama) on hand-made detection maps: one hit, one
miss (a candidate below the IoU 0.10 criterion: a false positive plus a missed lesion), one
false positive on a non-PDAC study, one empty non-PDAC study; AP and AUROC computed by hand.
Plus the detection-map files (NIfTI and MetaImage) read back with independent readers."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from minigpt4.evaluation.panorama import MIN_OVERLAP, PanoramaCase, panorama_figure, panorama_table, score_cases

SHAPE = (20, 20, 10)


def _cube(lo, hi):
    m = np.zeros(SHAPE, dtype=np.int32)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


def _cases():
    lesion = _cube((4, 4, 2), (8, 8, 6))  # 4 x 4 x 4 = 64 voxels
    hit = np.zeros(SHAPE, np.float32)
    hit[4:8, 4:8, 2:4] = 0.9  # 32 voxels inside the lesion: IoU 32 / 64 = 0.5
    graze = np.zeros(SHAPE, np.float32)
    graze[7:11, 7:11, 5] = 0.6  # 16 voxels, 1 x 1 x 1 = 1 inside: IoU 1 / 79 < 0.10 → FP + missed lesion
    fp = np.zeros(SHAPE, np.float32)
    fp[10:12, 10:12, 0:2] = 0.7
    return [
        PanoramaCase("A_hit", hit, lesion, likelihood=0.8, pdac=True),
        PanoramaCase("B_miss", graze, lesion.copy(), likelihood=0.3, pdac=True),
        PanoramaCase("C_false_positive", fp, np.zeros(SHAPE, np.int32), likelihood=0.5, pdac=False),
        PanoramaCase("D_empty", np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.int32), likelihood=0.1, pdac=False),
    ]


def test_hand_computed_ap_auroc_score():
    section, metrics = score_cases(_cases(), n_bootstrap=200, seed=1)
    # lesion list by likelihood: 0.9 hit, 0.7 FP, 0.6 FP, and B's lesion never found.
    # Precision at the one recall step (0 → 1/2) is 1/1, so AP = 1/2 · 1 = 0.5.
    assert section["ap"] == pytest.approx(0.5)
    # patient pairs (PDAC, non-PDAC): A 0.8 > C 0.5 ✓, A > D 0.1 ✓, B 0.3 < C ✗, B > D ✓ → 3/4
    assert section["auroc"] == pytest.approx(0.75)
    assert section["score"] == pytest.approx(0.625)
    assert (section["n_studies"], section["n_pdac"], section["n_reference_lesions"]) == (4, 2, 2)
    assert (section["n_candidates"], section["n_true_positive"], section["n_false_positive"], section["n_missed"]) == (3, 1, 2, 1)
    assert metrics.lesion_results["A_hit"] == [(1, pytest.approx(0.9), pytest.approx(0.5))]
    assert sorted(metrics.lesion_results["B_miss"]) == [(0, pytest.approx(0.6), 0.0), (1, 0.0, 0.0)]
    assert section["criterion"]["overlap"] == "IoU" and section["criterion"]["min_overlap"] == MIN_OVERLAP == 0.10
    ci = section["ci95"]
    assert ci["n_bootstrap"] == 200 and ci["seed"] == 1
    for name in ("auroc", "ap", "score"):
        lo, hi = ci[name]
        assert 0.0 <= lo <= section[name] <= hi <= 1.0
    assert 0 < ci["skipped"]["auroc"] < 200  # P(a resample of 4 studies lacks a class) = 1/8: counted, not scored
    json.dumps(section, allow_nan=False)  # strict JSON


def test_patient_truth_is_the_sheet_not_the_voxels():
    cases = _cases()
    # a PDAC study whose (automatic) label has no lesion voxel; a non-PDAC study with label-1 voxels
    cases[0].lesions = np.zeros(SHAPE, np.int32)
    cases[3].lesions = _cube((0, 0, 0), (2, 2, 2))
    section, _ = score_cases(cases, n_bootstrap=0)
    assert section["pdac_without_lesion_voxels"] == ["A_hit"]
    assert section["non_pdac_with_lesion_voxels"] == ["D_empty"]
    assert section["auroc"] == pytest.approx(0.75)  # unchanged: patient truth from the sheet
    # lesion list: A's candidate 0.9 now a FP, C 0.7 FP, B 0.6 FP, B's and D's lesions missed → AP 0
    assert section["ap"] == pytest.approx(0.0)
    text = panorama_table(section)
    assert "A_hit" in text and "D_empty" in text and "0.92 (95 % CI 0.90–0.93)" in text and "hidden test set" in text


def test_min_overlap_decides_the_hit():
    # at IoU 1/79 ≈ 0.0127 the grazing candidate is below 0.10: the criterion, not the likelihood, makes B a miss
    from picai_eval import evaluate

    c = _cases()[1]
    lenient = evaluate([c.detection_map], [c.lesions], min_overlap=0.01, num_parallel_calls=1)
    assert lenient.lesion_results[0] == [(1, pytest.approx(0.6), pytest.approx(1 / 79))]


def test_bad_inputs_name_the_study():
    cases = _cases()
    cases[2].detection_map = -cases[2].detection_map
    with pytest.raises(ValueError, match="C_false_positive: the detection map holds negative"):
        score_cases(cases, n_bootstrap=0)
    cases = _cases()
    cases[1].lesions = cases[1].lesions[:, :, :5]
    with pytest.raises(ValueError, match="B_miss: detection map"):
        score_cases(cases, n_bootstrap=0)
    with pytest.raises(ValueError, match="no study"):
        score_cases([], n_bootstrap=0)


def test_one_class_gives_none_not_nan(tmp_path):
    cases = [c for c in _cases() if c.pdac]
    section, metrics = score_cases(cases, n_bootstrap=20)
    assert section["auroc"] is None and section["score"] is None and section["ap"] == pytest.approx(0.5)
    assert section["ci95"]["auroc"] is None and section["ci95"]["skipped"]["auroc"] == 20
    assert panorama_figure(metrics, tmp_path / "p.png").stat().st_size > 1000


def test_figure(tmp_path):
    from PIL import Image

    _, metrics = score_cases(_cases(), n_bootstrap=0)
    path = panorama_figure(metrics, tmp_path / "panorama_curves.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height > 100


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_detection_map_files_read_back(tmp_path, suffix):
    import SimpleITK as sitk

    from minigpt4.inference.pipeline import SliceResult
    from minigpt4.scan_outputs import geometry_from_affine
    from minigpt4.scan_outputs.detection_map import volume_detection_map, write_detection_map

    affine = np.array([[-0.7, 0, 0, 12.0], [0, -0.8, 0, -30.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1.0]])  # LPS storage
    geometry = geometry_from_affine(affine, (100, 100, 6))
    rows = [SliceResult(k, "{<0><0><50><50>}", pancreas_grid=(0, 0, 50, 50), p_tumor=p) for k, p in enumerate([.1, .9, .8, .2, .3, .4])]
    for k in (1, 2):
        rows[k].tumor_answer, rows[k].tumor_box = "{<20><30><40><50>}", (20.0, 30.0, 40.0, 50.0)
    dmap, cands = volume_detection_map(geometry, rows)
    assert len(cands) == 1 and cands[0].likelihood == pytest.approx(0.9)
    path = write_detection_map(tmp_path / f"case{suffix}", dmap, affine)
    # every marked voxel: the stored voxel of display pixel (x, y) on slice k
    from minigpt4.boxes import grid_to_pixel_inclusive

    x1, y1, x2, y2 = grid_to_pixel_inclusive((20, 30, 40, 50), 100, 100)
    expected = np.zeros((100, 100, 6), np.float32)
    for k in (1, 2):
        for x in (x1, x2):
            for y in (y1, y2):
                assert dmap[geometry.voxel_of(x, y, k)] == np.float32(0.9)
        lo, hi = geometry.voxel_box((x1, y1, x2, y2), k)
        expected[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = np.float32(0.9)
    assert np.array_equal(dmap, expected)
    if suffix == ".nii.gz":
        img = nib.load(path)
        assert np.allclose(img.affine, affine) and np.array_equal(np.asarray(img.dataobj), expected)
    else:
        img = sitk.ReadImage(str(path))
        back = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        assert np.array_equal(back, expected)
        # ITK's physical point of voxel (i, j, k) is the LPS version of nibabel's RAS point
        ras = affine @ np.array([3, 5, 2, 1.0])
        assert np.allclose(img.TransformIndexToPhysicalPoint((3, 5, 2)), [-ras[0], -ras[1], ras[2]])


def test_matching_inside_the_foreground_box_equals_the_whole_volume():
    from picai_eval.eval import evaluate_case

    from minigpt4.evaluation.panorama import foreground_box

    for case in _cases():
        box = foreground_box(case.detection_map, case.lesions > 0)
        whole, *_ = evaluate_case(case.detection_map, case.lesions)
        cropped, *_ = evaluate_case(case.detection_map[box], case.lesions[box])
        assert sorted(whole) == sorted(cropped)
    a = _cases()[0]
    assert foreground_box(a.detection_map, a.lesions > 0) == (slice(4, 8), slice(4, 8), slice(2, 6))
    empty = np.zeros(SHAPE, np.float32)
    assert foreground_box(empty, empty > 0) == (slice(0, 1),) * 3
