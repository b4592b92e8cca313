"""Boxes, pixel counts, ratios, selection, normalisation and splits on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import normalize, slices, splits


def _mask():
    """(H=6, W=8, S=3): slice 0 a 2×3 block, slice 1 one pixel, slice 2 empty."""
    m = np.zeros((6, 8, 3), dtype=bool)
    m[1:3, 2:5, 0] = True  # rows 1-2, cols 2-4
    m[3, 5, 1] = True
    return m


def test_slice_boxes_are_inclusive_pixel_indices():
    counts, boxes = slices.slice_boxes(_mask())
    assert counts.tolist() == [6, 1, 0]
    assert boxes.tolist() == [[2, 1, 4, 2], [5, 3, 5, 3], [0, 0, 0, 0]]
    # release area rule (x2-x1)*(y2-y1): the one-pixel box has area 0
    assert slices.box_areas(boxes).tolist() == [2, 0, 0]


def test_box_touching_the_image_border():
    m = np.zeros((6, 8, 1), dtype=bool)
    m[:, 7, 0] = True
    m[5, 0, 0] = True
    assert slices.slice_boxes(m)[1].tolist() == [[0, 0, 7, 5]]


def test_volume_records_keys_ratios_and_maxima():
    m = _mask()
    tumor = np.zeros_like(m)
    tumor[2, 3, 0] = True
    recs = slices.volume_records("MSD", "pancreas_007", {"pancreas": m, "tumor": tumor})
    assert len(recs) == 3
    assert list(recs[0]) == slices.record_keys("MSD")
    assert list(recs[0]) == [
        "dataset", "volume_name", "slice_id", "slice_index", "slice_count",
        "pixels_pancreas", "pancreas_pixels_ratio", "max_pixels_pancreas",
        "pixels_tumor", "tumor_pixels_ratio", "max_pixels_tumor",
        "bbox_pancreas", "pancreas_bbox_ratio", "max_bbox_pancreas",
        "bbox_tumor", "tumor_bbox_ratio", "max_bbox_tumor", "width", "height", "image"]
    r0, r1, r2 = recs
    assert (r0["width"], r0["height"], r0["slice_count"]) == (8, 6, 3)
    assert [r["pixels_pancreas"] for r in recs] == [6, 1, 0]
    assert [r["pancreas_pixels_ratio"] for r in recs] == [1.0, 0.17, 0.0]  # 1/6 rounded to 2 decimals
    assert [r["pancreas_bbox_ratio"] for r in recs] == [1.0, 0.0, 0.0]
    assert r0["max_pixels_pancreas"] == 6 and r0["max_bbox_pancreas"] == 2
    # tumor: one pixel → box area 0 → max area 0 → ratios 0 without dividing by zero
    assert r0["bbox_tumor"] == [3, 2, 3, 2] and r0["max_bbox_tumor"] == 0 and r0["tumor_bbox_ratio"] == 0.0
    assert r0["tumor_pixels_ratio"] == 1.0 and r1["tumor_pixels_ratio"] == 0.0
    assert r2["bbox_pancreas"] == [0, 0, 0, 0]
    assert [r["slice_id"] for r in recs] == ["pancreas_007_slice_0", "pancreas_007_slice_1", "pancreas_007_slice_2"]
    assert all(r["image"] is None for r in recs)


def test_volume_without_target_gives_zero_ratios():
    empty = np.zeros((4, 4, 2), dtype=bool)
    recs = slices.volume_records("NIH", "PANCREAS_0001", {"pancreas": empty})
    assert [r["pancreas_bbox_ratio"] for r in recs] == [0.0, 0.0]
    assert recs[0]["max_pixels_pancreas"] == 0 and list(recs[0]) == slices.record_keys("NIH")


def _info(volume, k, ratio, image=True, **extra):
    rec = {"volume_name": volume, "slice_index": k, "pancreas_bbox_ratio": ratio, "bbox_pancreas": [1, 2, 3, 4],
           "pixels_pancreas": 1 if ratio > 0 else 0, "image": f"slices/{volume}_slice_{k}.png" if image else None}
    rec.update(extra)
    return rec


def test_selection_is_strict_by_volume_and_ordered():
    infos = [_info("b", 0, 0.6), _info("a", 2, 0.61), _info("a", 1, 0.9), _info("c", 0, 1.0), _info("a", 0, 0.0)]
    sel = slices.select_records(infos, ["a", "b"], "pancreas", 0.6)
    assert [(r["volume_name"], r["slice_index"]) for r in sel] == [("a", 1), ("a", 2)]  # 0.6 is not > 0.6
    assert [r["q_id"] for r in sel] == [0, 1]
    assert all(r["target"] == "pancreas" and r["bbox"] == [1, 2, 3, 4] for r in sel)
    assert len(slices.select_records(infos, ["a", "b", "c"], "pancreas", 0.0)) == 4  # ratio 0 never selected
    with pytest.raises(ValueError, match="threshold"):
        slices.select_records(infos, ["a"], "pancreas", 1.0)


def _organ_info(volume, k, present):
    rec = {"volume_name": volume, "slice_index": k, "image": f"slices/{volume}_slice_{k}.png"}
    for o in slices.ORGANS:
        rec[f"{o}_bbox_ratio"] = 0.9 if o in present else 0.0
        rec[f"bbox_{o}"] = [slices.ORGANS.index(o), 0, 5, 5] if o in present else [0, 0, 0, 0]
    return rec


def test_abd_selection_balances_organs_and_keeps_all_organs_of_a_slice():
    # liver on 5 slices, spleen on 3, pancreas on 3, kidney on 2 (slices 0 and 1)
    infos = [_organ_info("v", 0, {"liver", "kidney", "spleen", "pancreas"}),
             _organ_info("v", 1, {"liver", "kidney", "spleen"}),
             _organ_info("v", 2, {"liver", "spleen", "pancreas"}),
             _organ_info("v", 3, {"liver", "pancreas"}),
             _organ_info("v", 4, {"liver"})]
    sel = slices.select_records(infos, ["v"], "organs", 0.6, seed=3)
    targets = [r["target"] for r in sel]
    assert {t: targets.count(t) for t in slices.ORGANS} == {"liver": 2, "kidney": 2, "spleen": 2, "pancreas": 2}
    assert [(r["slice_index"], r["target"]) for r in sel if r["target"] == "kidney"] == [(0, "kidney"), (1, "kidney")]
    assert all(r["bbox"] == r[f"bbox_{r['target']}"] for r in sel)
    assert sel == slices.select_records(infos, ["v"], "organs", 0.6, seed=3)  # seeded
    assert [r["q_id"] for r in sel] == list(range(8))
    only = slices.select_records(infos, ["v"], "organs", 0.6, organs=["liver"])
    assert len(only) == 5 and {r["target"] for r in only} == {"liver"}
    # an organ absent from the split does not empty the others
    no_kidney = [{**r, "kidney_bbox_ratio": 0.0} for r in infos]
    sel = slices.select_records(no_kidney, ["v"], "organs", 0.6, seed=3)
    assert sorted(r["target"] for r in sel) == ["liver"] * 3 + ["pancreas"] * 3 + ["spleen"] * 3
    with pytest.raises(ValueError, match="unknown organs"):
        slices.select_records(infos, ["v"], "organs", 0.6, organs=["heart"])


def test_balanced_selection_adds_empty_boxes():
    infos = [_info("a", 0, 0.9), _info("a", 1, 0.8), _info("a", 2, 0.0), _info("a", 3, 0.0), _info("a", 4, 0.0),
             _info("a", 5, 0.0, image=False)]
    bal = slices.select_balanced(infos, ["a"], "pancreas", 0.5, seed=1)
    assert len(bal) == 4
    negatives = [r for r in bal if r["bbox"] == [0, 0, 0, 0]]
    assert len(negatives) == 2 and all(r["pixels_pancreas"] == 0 and r["image"] for r in negatives)


def test_paper_normalisation_gives_a_flat_histogram():
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 200, size=(256, 256)).astype(np.float32)
    out = normalize.equalize(hu)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    fractions = np.bincount(out.ravel() // 32, minlength=8) / out.size
    assert np.all(np.abs(fractions - 1 / 8) < 0.03), fractions
    assert np.all(normalize.equalize(np.full((8, 8), 40.0)) == 0)  # constant slice, no division by zero


def test_paper_normalisation_is_monotonic_and_clips_tails():
    hu = np.arange(10000, dtype=np.float32).reshape(100, 100)
    out = normalize.equalize(hu).ravel().astype(int)
    assert np.all(np.diff(out) >= 0)
    assert np.all(out[:201] == 0) and np.all(out[-200:] == 255)  # below p2 / above p98 saturate


def test_window_normalisation_matches_the_formula():
    hu = np.array([[-1000, -150, 0, 50, 250, 1000]], dtype=np.float32)
    # round(255 * clip((HU + 150) / 400, 0, 1)): 0 → 95.625 → 96, 50 → 127.5 → 128
    assert normalize.window(hu).tolist() == [[0, 0, 96, 128, 255, 255]]
    assert normalize.window(hu, -1000, 1000).tolist() == [[0, 108, 128, 134, 159, 255]]
    with pytest.raises(ValueError):
        normalize.window(hu, 10, 10)


def test_split_is_seeded_by_volume_and_disjoint():
    names = [f"pancreas_{i:03d}" for i in range(10)]
    a = splits.split_volumes(names, 0.2, 0.1, seed=42)
    assert a == splits.split_volumes(list(reversed(names)), 0.2, 0.1, seed=42)  # order-free
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (7, 1, 2)
    assert sorted(a["train"] + a["val"] + a["test"]) == names
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert a["seed"] == 42
    others = [splits.split_volumes(names, 0.2, 0.1, seed=s)["test"] for s in range(5)]
    assert len({tuple(t) for t in others}) > 1
    assert splits.split_volumes(names, 1.0, 0.1)["test"] == names
    assert splits.split_volumes(names, 0.0, 0.0)["train"] == names
    with pytest.raises(ValueError):
        splits.split_volumes(names, 1.5)
