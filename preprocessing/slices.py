"""Per-slice statistics, JSON records and THE selection function (SPEC §4 items 1–4, 9, 11).

Everything here is vectorised over a whole volume: one pass of numpy reductions gives pixel
counts and inclusive boxes of every slice, so there is no Python loop over slices except to
build the small JSON dictionaries.

Conventions: a box is ``[x1, y1, x2, y2]`` of *inclusive* pixel indices in the PNG (display)
frame, ``[0, 0, 0, 0]`` when the slice has no target; the box area used for the ratios is
``(x2 - x1) * (y2 - y1)`` (so a one-pixel-thin box has area 0, as in the release); ratios are
``value / per-volume maximum`` rounded to 2 decimals (0 when the volume has no target); a slice
is selected when ``ratio > threshold`` (strictly).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

# Targets per dataset, in record order.
DATASET_TARGETS = {
    "MSD": ("pancreas", "tumor"),
    "NIH": ("pancreas",),
    "ABD": ("liver", "kidney", "spleen", "pancreas"),
    "PANORAMA": ("pancreas", "tumor"),
}
ORGANS = DATASET_TARGETS["ABD"]
# Per-volume keys some datasets add after ``image`` (PANORAMA: the clinical sheet's values,
# preprocessing.clinical.Study.record_fields, and which label folder the label came from).
EXTRA_KEYS = {
    "PANORAMA": ("patient_id", "patient_label", "reference_standard", "study_date", "patient_age", "patient_sex",
                 "scanner", "label_source"),
}


def record_keys(dataset: str) -> list[str]:
    """The exact key list of a ``<DS>_slices_info.json`` record (appendix keys + ``image``)."""
    keys = ["dataset", "volume_name", "slice_id", "slice_index", "slice_count"]
    for t in DATASET_TARGETS[dataset]:
        keys += [f"pixels_{t}", f"{t}_pixels_ratio", f"max_pixels_{t}"]
    for t in DATASET_TARGETS[dataset]:
        keys += [f"bbox_{t}", f"{t}_bbox_ratio", f"max_bbox_{t}"]
    return keys + ["width", "height", "image", *EXTRA_KEYS.get(dataset, ())]


def slice_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts and inclusive boxes of every slice of a display-frame mask.

    Args:
        mask: (H, W, S) boolean, rows = y, columns = x.

    Returns:
        counts (S,) int64 and boxes (S, 4) int64 ``[x1, y1, x2, y2]``, ``[0, 0, 0, 0]`` for
        empty slices.
    """
    h, w, _ = mask.shape
    rows = mask.any(axis=1)  # (H, S): row y has a mask pixel in slice s
    cols = mask.any(axis=0)  # (W, S)
    counts = np.count_nonzero(mask, axis=(0, 1)).astype(np.int64)
    present = counts > 0
    y1 = np.argmax(rows, axis=0)
    y2 = h - 1 - np.argmax(rows[::-1], axis=0)
    x1 = np.argmax(cols, axis=0)
    x2 = w - 1 - np.argmax(cols[::-1], axis=0)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)
    boxes[~present] = 0
    return counts, boxes


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) inclusive boxes → (N,) areas ``(x2-x1)*(y2-y1)`` (release rule)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def ratios(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Values over their maximum, rounded to 2 decimals; all 0 (no division) when max is 0."""
    vmax = int(values.max()) if values.size else 0
    if vmax <= 0:
        return np.zeros(values.shape, dtype=np.float64), 0
    return np.round(values / vmax, 2), vmax


def volume_records(dataset: str, volume_name: str, masks: dict[str, np.ndarray]) -> list[dict]:
    """One appendix record per slice of a volume (``image`` set to None; the caller fills it).

    Args:
        dataset: ``MSD`` | ``NIH`` | ``ABD``.
        volume_name: volume stem.
        masks: target → (H, W, S) boolean display-frame mask, for every target of the dataset.
    """
    targets = DATASET_TARGETS[dataset]
    first = masks[targets[0]]
    h, w, s = first.shape
    per = {}
    for t in targets:
        counts, boxes = slice_boxes(masks[t])
        pix_ratio, pix_max = ratios(counts)
        box_ratio, box_max = ratios(box_areas(boxes))
        per[t] = (counts.tolist(), pix_ratio.tolist(), pix_max, boxes.tolist(), box_ratio.tolist(), box_max)
    records = []
    for k in range(s):
        rec = {"dataset": dataset, "volume_name": volume_name, "slice_id": f"{volume_name}_slice_{k}",
               "slice_index": k, "slice_count": s}
        for t in targets:
            counts, pr, pm, _, _, _ = per[t]
            rec[f"pixels_{t}"] = counts[k]
            rec[f"{t}_pixels_ratio"] = pr[k]
            rec[f"max_pixels_{t}"] = pm
        for t in targets:
            _, _, _, boxes, br, bm = per[t]
            rec[f"bbox_{t}"] = boxes[k]
            rec[f"{t}_bbox_ratio"] = br[k]
            rec[f"max_bbox_{t}"] = bm
        rec["width"] = w
        rec["height"] = h
        rec["image"] = None
        records.append(rec)
    return records


def png_name(volume_name: str, k: int) -> str:
    return f"slices/{volume_name}_slice_{k}.png"


# ----------------------------------------------------------------------------- selection


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return threshold


def select_records(infos: Sequence[dict], volumes: Iterable[str], target: str, threshold: float,
                   organs: Optional[Sequence[str]] = None, seed: int = 42) -> list[dict]:
    """THE selection function: slice-info records → selected records of one split.

    Used by the CLI to write ``<DS>_{split}.json`` and by :func:`preprocessing.layout.read_prepared`
    for the threshold study, so both always agree.

    Args:
        infos: ``<DS>_slices_info.json`` records.
        volumes: volume names of the split.
        target: ``pancreas`` | ``tumor`` for MSD/NIH; ``organs`` for ABD (one record per
            (slice, organ) with ``<organ>_bbox_ratio > threshold``, organs balanced by seeded
            down-sampling to the rarest organ present in the split; all organs of a slice kept).
        threshold: strict lower bound on the target's ``bbox_ratio``, in [0, 1).
        organs: ABD only: restrict to these organs (default all four).
        seed: down-sampling seed (ABD).

    Returns:
        Records (copies) with ``q_id`` (0..n-1, in volume/slice/organ order), ``target`` and
        ``bbox`` added; ``image`` stays relative.
    """
    threshold = _check_threshold(threshold)
    wanted = set(volumes)
    rows = sorted((r for r in infos if r["volume_name"] in wanted and r.get("image")),
                  key=lambda r: (r["volume_name"], r["slice_index"]))
    if target == "organs":
        organs = list(ORGANS if organs is None else organs)
        bad = [o for o in organs if o not in ORGANS]
        if bad or not organs:
            raise ValueError(f"unknown organs {bad or organs}; choose from {list(ORGANS)}")
        per_organ = {o: [i for i, r in enumerate(rows) if r[f"{o}_bbox_ratio"] > threshold] for o in organs}
        # Balance among the organs present: an organ absent from the whole split (e.g. no kidney
        # in the field of view) must not empty the other organs' lists.
        present = [len(v) for v in per_organ.values() if v]
        n_min = min(present) if present else 0
        rng = np.random.default_rng(seed)
        chosen = []
        for o in organs:
            idx = per_organ[o]
            if len(idx) > n_min:
                idx = sorted(rng.choice(idx, size=n_min, replace=False).tolist())
            chosen += [(i, ORGANS.index(o), o) for i in idx]
        chosen.sort()
        pairs = [(rows[i], o) for i, _, o in chosen]
    else:
        pairs = [(r, target) for r in rows if r[f"{target}_bbox_ratio"] > threshold]
    out = []
    for q_id, (r, t) in enumerate(pairs):
        rec = dict(r)
        rec["q_id"] = q_id
        rec["target"] = t
        rec["bbox"] = list(r[f"bbox_{t}"])
        out.append(rec)
    return out


def select_balanced(infos: Sequence[dict], volumes: Iterable[str], target: str, threshold: float,
                    seed: int = 42) -> list[dict]:
    """Selected records plus as many target-free slices (box ``[0, 0, 0, 0]``) as possible up to
    the number of positives, drawn with a seeded generator from the split's negative slices that
    have a PNG (``--balanced``)."""
    positives = select_records(infos, volumes, target, threshold, seed=seed)
    wanted = set(volumes)
    negatives = sorted((r for r in infos if r["volume_name"] in wanted and r.get("image")
                        and r[f"pixels_{target}"] == 0),
                       key=lambda r: (r["volume_name"], r["slice_index"]))
    rng = np.random.default_rng(seed)
    if len(negatives) > len(positives):
        keep = sorted(rng.choice(len(negatives), size=len(positives), replace=False).tolist())
        negatives = [negatives[i] for i in keep]
    rows = [(r["volume_name"], r["slice_index"], r, list(r[f"bbox_{target}"])) for r in positives]
    rows += [(r["volume_name"], r["slice_index"], r, [0, 0, 0, 0]) for r in negatives]
    rows.sort(key=lambda x: (x[0], x[1]))
    out = []
    for q_id, (_, _, r, box) in enumerate(rows):
        rec = {k: v for k, v in r.items() if k not in ("q_id", "target", "bbox")}
        rec.update(q_id=q_id, target=target, bbox=box)
        out.append(rec)
    return out
