"""Find the same CT scan in two datasets by its content (``abd --exclude-overlap-with``).

AbdomenCT-1K re-distributes MSD and NIH scans under its own names (``Case_XXXXX``). Split on its
own, its val/test would hold scans an MSD / NIH stage trained on. A copy need not be exact: it
may be renamed, stored in another axis order or direction, re-quantised (noise of a fraction of a
HU, an offset of 1 HU), have a slice dropped, be mirrored in its voxels with the header unchanged,
or carry a slightly different spacing in its header. So a scan is recognised by **per-slice
signatures**: each slice of the volume in the canonical orientation ``(P, L, S)``
(:func:`preprocessing.volumes.canonical_transform`) is clipped to [-1024, 1500] HU, block-averaged
to 16 × 16 and normalised to zero mean and unit norm (offsets and scale drop out, noise averages
out); two volumes match when, at their best slice offset, at least :data:`MATCH_FRACTION` of the
informative slices of the one have a slice of the other within ±2 positions whose signature
correlates ≥ :data:`SLICE_CORRELATION` with it, under one of the 8 in-plane / axial mirrorings
(mirrored copies). Cheap checks come first: equal in-plane size, slice counts within 5 %, voxel
spacing within 5 %, and the correlation of the whole-volume mean signatures. The thresholds and
the false-match rate measured on phantoms are in the README (preprocessing section) and
``benchmarks/overlap_false_matches.py``.

Matched ABD volumes are kept out of ABD val/test (they go to train) and listed in the manifest's
``overlap`` as ``{abd_volume: {"dataset", "volume", "file"}}``; the leakage check
(:mod:`minigpt4.provenance`) reads that list. Which folders hold the scans is the
pipeline's business (:func:`preprocessing.pipeline.folder_volumes`); this module only compares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from nibabel.orientations import apply_orientation

from preprocessing import splits, volumes
from preprocessing.jobs import run_jobs

GRID = 16
"""Signature size: each slice block-averaged to GRID × GRID."""
HU_RANGE = (-1024.0, 1500.0)
"""Clip before averaging: padding outside the field of view (-2048, -3024) and metal do not dominate."""
SLICE_CORRELATION = 0.99
"""Two slices look alike when their 16 × 16 signatures correlate at least this much ..."""
FINE_CORRELATION = 0.8
"""... and are the same slice when their fine (3 × 3 high-pass) lattices correlate at least this much."""
MATCH_FRACTION = 0.9
"""Two volumes are one scan when this fraction of the informative slices find their slice."""
SEARCH = 2
"""Slices of the other volume searched on each side of the aligned one (dropped / added slices)."""
SHAPE_TOLERANCE = 0.05
"""Relative difference allowed in slice count and voxel spacing (a dropped slice, a rounded header)."""
PRESCREEN = 0.95
"""Mean-signature correlation below which two volumes are not compared slice by slice."""


@dataclass
class Fingerprint:
    """Content fingerprint of one volume in the canonical ``(P, L, S)`` frame.

    Attributes:
        shape: (rows, cols, slices) of the canonical array.
        spacing: voxel size in mm along those axes.
        slices: (slices, GRID, GRID) float16 signatures, each of zero mean and unit norm (all
            zero for a flat slice).
    """

    shape: tuple
    spacing: tuple
    slices: np.ndarray
    fine: np.ndarray
    """(slices, GRID, GRID) float16: the sign of each voxel of a mirror-symmetric GRID × GRID lattice
    minus the mean of its 3 × 3 neighbourhood (the scan's own noise and texture, which a copy keeps
    and another scan of similar anatomy does not), zero mean and unit norm per slice."""
    mean: np.ndarray
    """(GRID, GRID) float32 unit-norm mean of the slice signatures (the cheap first comparison)."""


def _unit(block: np.ndarray) -> np.ndarray:
    """Zero mean and unit norm over the last two axes; flat blocks become zero."""
    centred = block - block.mean(axis=(-2, -1), keepdims=True)
    norm = np.sqrt((centred ** 2).sum(axis=(-2, -1), keepdims=True))
    return np.where(norm > 1e-3, centred / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def _block_means(array: np.ndarray, axis: int) -> np.ndarray:
    """Means of GRID near-equal blocks along ``axis`` (fewer blocks when the axis is shorter)."""
    n = array.shape[axis]
    edges = np.unique((np.arange(min(GRID, n)) * n) // min(GRID, n))
    sums = np.add.reduceat(array, edges, axis=axis)
    counts = np.diff(np.append(edges, n)).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = counts.size
    return sums / counts.reshape(shape)


def _lattice(n: int) -> np.ndarray:
    """GRID positions in 1 .. n-2, symmetric about the middle (position p ↔ n-1-p), so that the
    lattice of a mirrored slice is the mirrored lattice."""
    half = np.clip(np.floor((np.arange(GRID // 2) + 0.5) * n / GRID).astype(int), 1, max(1, n - 2))
    return np.concatenate([half, (n - 1 - half)[::-1]])


def _residuals(chunk: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(rows), len(cols), slices): chunk at the lattice minus its 3 × 3 neighbourhood mean."""
    centre = chunk[rows][:, cols]
    around = sum(chunk[rows + dr][:, cols + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    return centre - around / np.float32(9.0)


def fingerprint_array(hu: np.ndarray, affine: np.ndarray) -> Fingerprint:
    """Fingerprint of a stored-frame HU volume (X, Y, Z) and its (4, 4) RAS affine."""
    transform = volumes.canonical_transform(affine)
    canonical = apply_orientation(np.asarray(hu), transform)
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))[np.argsort(transform[:, 0])]
    rows, cols, count = canonical.shape
    if rows < 3 or cols < 3:
        raise ValueError(f"volume of shape {canonical.shape} is too small to fingerprint")
    thumbs = np.empty((count, min(GRID, rows), min(GRID, cols)), dtype=np.float32)
    fine = np.empty((count, GRID, GRID), dtype=np.float32)
    lattice_rows, lattice_cols = _lattice(rows), _lattice(cols)
    for start in range(0, count, 32):  # 32 slices at a time: memory stays at a few slices of floats
        chunk = np.clip(canonical[:, :, start:start + 32].astype(np.float32), *HU_RANGE)
        stop = start + chunk.shape[2]
        thumbs[start:stop] = np.moveaxis(_block_means(_block_means(chunk, 0), 1), 2, 0)
        # the sign only: organ edges (large residuals, alike in scans of similar anatomy) weigh no
        # more than the noise texture a copy keeps; flat (clipped) regions give 0
        fine[start:stop] = np.moveaxis(np.sign(_residuals(chunk, lattice_rows, lattice_cols)), 2, 0)
    signatures = _unit(thumbs)
    return Fingerprint(tuple(int(v) for v in canonical.shape), tuple(float(v) for v in spacing),
                       signatures.astype(np.float16), _unit(fine).astype(np.float16), _unit(signatures.mean(axis=0)))


def volume_fingerprint(image: str, kind: str) -> Fingerprint:
    """Fingerprint of a NIfTI / MHA file or DICOM series folder (``kind``: nifti | dicom | mha).

    Raises:
        VolumeError: the file cannot be read (names it).
    """
    vol = volumes.read_dicom_series(image) if kind == "dicom" else volumes.load_mha(image) if kind == "mha" \
        else volumes.load_nifti(image)
    array = np.asarray(vol.array)
    if vol.slope != 1.0 or vol.inter != 0.0:  # signatures clip in HU
        array = array.astype(np.float32) * np.float32(vol.slope) + np.float32(vol.inter)
    return fingerprint_array(array, vol.affine)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= SHAPE_TOLERANCE * max(abs(a), abs(b))


def _mirrorings(slices: np.ndarray, fine: np.ndarray, mean: np.ndarray):
    """``(signatures, fine, mean)`` under the 8 in-plane / axial mirrorings of (slices, rows, cols)
    arrays (the mean over slices does not change with the axial order)."""
    for flip_rows, flip_cols, flip_axial in np.ndindex(2, 2, 2):
        index = (slice(None, None, -1 if flip_axial else 1), slice(None, None, -1 if flip_rows else 1),
                 slice(None, None, -1 if flip_cols else 1))
        yield slices[index], fine[index], mean[index[1:]]


def match_fraction(a: Fingerprint, b: Fingerprint) -> float:
    """Fraction of ``a``'s informative slices that find their slice in ``b`` (best mirroring and
    offset); 0 when the shapes, spacings or mean signatures already rule a match out.

    A slice of ``a`` finds slice ``j`` of ``b`` when both its coarse and its fine signature
    correlate above their thresholds with ``j``'s; the offset ``j - i`` most such pairs share aligns
    the volumes, and slice ``i`` counts as found when it has such a ``j`` within ±SEARCH of
    ``i + offset``. Three probe slices of ``a`` are tried first, so that other scans cost little.
    """
    if a.shape[:2] != b.shape[:2] or not _close(a.shape[2], b.shape[2]):
        return 0.0
    if not all(_close(x, y) for x, y in zip(a.spacing, b.spacing)):
        return 0.0
    theirs = b.slices.astype(np.float32).reshape(b.shape[2], -1)
    theirs_fine = b.fine.astype(np.float32).reshape(b.shape[2], -1)
    best = 0.0
    for mirrored, mirrored_fine, mean in _mirrorings(a.slices.astype(np.float32), a.fine.astype(np.float32), a.mean):
        if float((mean * b.mean).sum()) < PRESCREEN:
            continue
        ours = mirrored.reshape(mirrored.shape[0], -1)
        ours_fine = mirrored_fine.reshape(mirrored_fine.shape[0], -1)
        informative = np.nonzero(np.abs(ours).sum(axis=1) > 0)[0]
        if informative.size == 0:
            continue
        probes = informative[np.linspace(0, informative.size - 1, min(3, informative.size)).round().astype(int)]
        if not (ours_fine[probes] @ theirs_fine.T >= FINE_CORRELATION).any():
            continue  # not even one of three slices has its noise texture in b
        same = (ours @ theirs.T >= SLICE_CORRELATION) & (ours_fine @ theirs_fine.T >= FINE_CORRELATION)
        rows, cols = np.nonzero(same[informative])
        if rows.size == 0:
            continue
        n_a, n_b = same.shape
        offset = int(np.bincount(cols - informative[rows] + n_a).argmax()) - n_a  # j = i + offset
        found = np.zeros(informative.size, dtype=bool)
        for step in range(-SEARCH, SEARCH + 1):
            j = informative + offset + step
            inside = (j >= 0) & (j < n_b)
            found[inside] |= same[informative[inside], j[inside]]
        best = max(best, float(found.mean()))
    return best


def same_scan(a: Fingerprint, b: Fingerprint) -> bool:
    """True when ``a`` and ``b`` are one scan (:data:`MATCH_FRACTION` of the slices of each find theirs)."""
    return match_fraction(a, b) >= MATCH_FRACTION and match_fraction(b, a) >= MATCH_FRACTION


def _fingerprint_job(job: tuple[str, str, str]) -> tuple[str, Fingerprint]:
    name, image, kind = job
    return name, volume_fingerprint(image, kind)


def raw_folder_volumes(folder) -> tuple[str, list[tuple[str, str, str]]]:
    """``(dataset, [(volume_name, image, kind), ...])``: every NIfTI file and DICOM series folder under
    a raw folder; the dataset is read off the names (``pancreas_NNN`` = MSD, ``PANCREAS_NNNN`` = NIH,
    else the folder's name)."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and volumes.is_nifti(path):
            stem = volumes.nifti_stem(path)
            found.append((stem[: -len("_0000")] if stem.endswith("_0000") else stem, str(path), "nifti"))
    # a DICOM series: a folder holding files none of which is NIfTI, and no sub-folder
    for path in sorted(p for p in [folder, *folder.rglob("*")] if p.is_dir()):
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if entries and all(p.is_file() and not volumes.is_nifti(p) for p in entries):
            named = next((a.name for a in [path, *path.parents] if re.match(r"^PANCREAS_\d+$", a.name)), path.name)
            found.append((named, str(path), "dicom"))
    if not found:
        raise ValueError(f"--exclude-overlap-with {folder}: no NIfTI files or DICOM series inside")
    names = {n for n, _, _ in found}
    dataset = "MSD" if all(re.match(r"^pancreas_\d+$", n) for n in names) else \
        "NIH" if all(re.match(r"^PANCREAS_\d+$", n) for n in names) else folder.name
    return dataset, found


def find_overlap(own: Sequence[tuple[str, str, str]], sources: Sequence[tuple[str, Sequence[tuple[str, str, str]]]],
                 workers: int = 1) -> dict[str, dict]:
    """Volumes of ``own`` (``(name, image, kind)``) that are the same scan as a volume of ``sources``.

    Args:
        own: this dataset's volumes.
        sources: ``[(dataset, [(name, image, kind), ...]), ...]`` of the other datasets
            (:func:`preprocessing.pipeline.folder_volumes`), in priority order.
    Returns:
        ``{own_name: {"dataset", "volume", "file"}}`` (the first match, sources in order).
    """
    theirs = []
    for dataset, found in sources:
        for (name, print_), (_, image, _) in zip(run_jobs(list(found), _fingerprint_job, workers), found):
            theirs.append((print_, {"dataset": dataset, "volume": name, "file": image}))
    matches = {}
    for name, print_ in run_jobs(list(own), _fingerprint_job, workers):
        hit = next((where for other, where in theirs if same_scan(print_, other)), None)
        if hit is not None:
            matches[name] = hit
    return matches


def split_keeping_in_train(volume_names: Sequence[str], keep_in_train: Sequence[str], test_ratio: float,
                           val_ratio: float, seed: int) -> dict:
    """:func:`splits.split_volumes` of the other volumes, then ``keep_in_train`` added to train."""
    kept = set(keep_in_train)
    split = splits.split_volumes([v for v in volume_names if v not in kept], test_ratio, val_ratio, seed)
    split["train"] = sorted(set(split["train"]) | (kept & set(volume_names)))
    split["kept_in_train"] = sorted(kept & set(volume_names))
    return split
