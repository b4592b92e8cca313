"""Stage-3 tumor boxes per slice → 3-D lesion candidates and a detection map (PANORAMA, issue 27).

PANORAMA scores a lesion detection as a 3-D *detection map*: a volume in the CT's own geometry
whose connected components are the lesion candidates, each of ONE constant likelihood, 0
elsewhere (``picai_eval``'s contract: it labels the map's components with a 3×3×3 structuring
element and takes each component's likelihood).

A candidate here is a set of stage-3 tumor boxes (inclusive pixel boxes on display slices)
connected across adjacent slices: two boxes belong to one candidate when their slices are the
same or adjacent and their rectangles overlap **or touch** in-plane (a gap of 0 pixels, diagonal
corners included). That is exactly 26-connectivity of the filled boxes, the connectivity the
scorer relabels the map with, so every candidate is one component in the scorer's eyes and two
candidates are never merged behind our back. The candidate's likelihood is the largest
likelihood of its boxes (the slice P(tumor) of stage 2 where stage 3 drew the box).

Frames: boxes and :func:`candidate_labels` are in the display frame ``(row, col, slice)`` (what
the model saw, :mod:`preprocessing.volumes`); :func:`to_stored` puts a display volume back in
the stored voxel order of the input file with a ``display_to_voxel`` matrix (a signed
permutation plus offset, e.g. ``VolumeGeometry.display_to_voxel``), so the map can be written
with the input's own affine. Pure numpy: no model, no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

Box = tuple[int, int, int, int]
"""Inclusive pixel box ``(x1, y1, x2, y2)`` on one display slice (x: column, y: row)."""

MIN_LIKELIHOOD = float(np.finfo(np.float32).tiny)
"""A drawn box with likelihood 0 would be background in the map (invisible to the scorer); it gets
the smallest positive float32 instead, so it still counts (as the least likely candidate)."""


@dataclass(frozen=True)
class SliceBox:
    """One stage-3 tumor box: display slice ``slice_index``, inclusive ``box``, its ``likelihood`` in [0, 1]."""

    slice_index: int
    box: Box
    likelihood: float

    def __post_init__(self) -> None:
        x1, y1, x2, y2 = (int(v) for v in self.box)
        if x2 < x1 or y2 < y1 or min(x1, y1) < 0:
            raise ValueError(f"slice {self.slice_index}: box {list(self.box)} is not an inclusive box "
                             "(x1 <= x2, y1 <= y2, non-negative)")
        value = float(self.likelihood)
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"slice {self.slice_index}: likelihood {self.likelihood!r} outside [0, 1]")
        object.__setattr__(self, "box", (x1, y1, x2, y2))
        object.__setattr__(self, "slice_index", int(self.slice_index))
        object.__setattr__(self, "likelihood", value)


@dataclass(frozen=True)
class LesionCandidate:
    """A 3-D lesion candidate: ``label`` (1, 2, ... in order of first slice, then box), its boxes
    and its one ``likelihood`` (the largest of its boxes', at least :data:`MIN_LIKELIHOOD`)."""

    label: int
    boxes: tuple[SliceBox, ...]
    likelihood: float

    @property
    def slices(self) -> tuple[int, int]:
        """First and last display slice (inclusive)."""
        ks = [b.slice_index for b in self.boxes]
        return min(ks), max(ks)

    def as_dict(self) -> dict:
        first, last = self.slices
        return {"label": self.label, "likelihood": self.likelihood, "slices": [first, last],
                "boxes": [{"slice": b.slice_index, "box": list(b.box), "likelihood": b.likelihood} for b in self.boxes]}


def _touch(a: SliceBox, b: SliceBox) -> bool:
    """26-connected: slices at most 1 apart and the rectangles overlap or touch (gap 0) in-plane."""
    if abs(a.slice_index - b.slice_index) > 1:
        return False
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return bx1 <= ax2 + 1 and ax1 <= bx2 + 1 and by1 <= ay2 + 1 and ay1 <= by2 + 1


def lesion_candidates(boxes: Iterable[SliceBox]) -> list[LesionCandidate]:
    """Group boxes into 3-D candidates (connected components of :func:`_touch`), labelled 1, 2, ...
    in the order of each candidate's first box (by slice, then x1, y1)."""
    items = sorted(boxes, key=lambda b: (b.slice_index, b.box))
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(items):  # boxes are sorted by slice: only look ahead while within one slice
        for j in range(i + 1, len(items)):
            if items[j].slice_index > a.slice_index + 1:
                break
            if _touch(a, items[j]):
                ri, rj = root(i), root(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[SliceBox]] = {}
    for i, item in enumerate(items):
        groups.setdefault(root(i), []).append(item)
    return [LesionCandidate(label=n, boxes=tuple(members),
                            likelihood=max(MIN_LIKELIHOOD, max(b.likelihood for b in members)))
            for n, members in enumerate(groups.values(), start=1)]


def tumor_boxes(results: Sequence[Any], width: int, height: int) -> list[SliceBox]:
    """The stage-3 tumor boxes of a volume's slice results (``minigpt4.inference.pipeline.SliceResult``:
    ``inclusive_boxes(width, height)``, ``p_tumor``, ``slice_index``), each with its slice's P(tumor)."""
    out = []
    for row in results:
        _, tumor = row.inclusive_boxes(width, height)
        if tumor is not None:
            out.append(SliceBox(row.slice_index, tumor, 0.0 if row.p_tumor is None else row.p_tumor))
    return out


def candidate_labels(candidates: Sequence[LesionCandidate], display_shape: Sequence[int]) -> np.ndarray:
    """``(H, W, Z)`` int32 display-frame volume: candidate ``label`` on its boxes' pixels, 0 elsewhere.

    Raises:
        ValueError: a box outside the ``(H, W, Z)`` stack (boxes of another volume?).
    """
    height, width, depth = (int(v) for v in display_shape)
    out = np.zeros((height, width, depth), dtype=np.int32)
    for cand in candidates:
        for b in cand.boxes:
            x1, y1, x2, y2 = b.box
            if not (0 <= b.slice_index < depth and x2 < width and y2 < height):
                raise ValueError(f"slice {b.slice_index}: box {list(b.box)} outside the stack of "
                                 f"{depth} slices of {width}x{height} pixels")
            out[y1:y2 + 1, x1:x2 + 1, b.slice_index] = cand.label
    return out


def detection_map(candidates: Sequence[LesionCandidate], display_shape: Sequence[int]) -> np.ndarray:
    """``(H, W, Z)`` float32 display-frame detection map: each candidate's likelihood on its voxels."""
    labels = candidate_labels(candidates, display_shape)
    values = np.zeros(len(candidates) + 1, dtype=np.float32)
    for cand in candidates:
        values[cand.label] = cand.likelihood
    return values[labels]


def to_stored(volume: np.ndarray, display_to_voxel: np.ndarray, stored_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """A display-frame ``(H, W, Z)`` volume in the stored voxel order ``(X, Y, Z)`` of its input.

    Args:
        display_to_voxel: (4, 4) display voxel ``[row, col, slice, 1]`` → stored voxel ``[i, j, k, 1]``
            (a signed permutation plus offset: ``VolumeGeometry.display_to_voxel``).
        stored_shape: checked against the result when given.
    Raises:
        ValueError: a matrix that is not a signed permutation onto the volume's own index range.
    """
    m = np.rint(np.asarray(display_to_voxel, dtype=np.float64)).astype(np.int64)
    part = m[:3, :3]
    if m.shape != (4, 4) or not (np.all(np.abs(part).sum(axis=0) == 1) and np.all(np.abs(part).sum(axis=1) == 1)):
        raise ValueError(f"display_to_voxel must be a signed permutation with offset, got {m.tolist()}")
    perm = [int(np.nonzero(part[a])[0][0]) for a in range(3)]  # display axis feeding stored axis a
    out = np.transpose(volume, perm)
    for a in range(3):
        size = out.shape[a]
        sign, offset = part[a, perm[a]], m[a, 3]
        if (sign, offset) not in ((1, 0), (-1, size - 1)):
            raise ValueError(f"display_to_voxel {m.tolist()} does not map a volume of shape {volume.shape} onto itself")
        if sign < 0:
            out = np.flip(out, axis=a)
    if stored_shape is not None and tuple(out.shape) != tuple(int(v) for v in stored_shape):
        raise ValueError(f"display volume {volume.shape} maps to {out.shape}, not the stored shape {tuple(stored_shape)}")
    return np.ascontiguousarray(out)
