"""The input contract of the scan outputs: where the model's slices lie in the input file, and
what the model said about them.

Frames (see :mod:`preprocessing.volumes`):

* **stored frame**: voxel ``[i, j, k]`` of the array as stored in the input (a NIfTI file, or a
  DICOM series stacked ``[column, row, slice]`` by :func:`preprocessing.volumes.read_dicom_series`),
  with the ``affine`` voxel → patient RAS+ mm as nibabel gives it.
* **display frame**: ``(row, col, slice)`` = what the model saw: slice ``k`` of the oriented stack
  is a ``(H, W)`` image, anterior at the top, the patient's right on the image left, axial order
  as stored (:func:`preprocessing.volumes.to_display`). A pixel ``(x, y)`` of slice ``k`` is
  display voxel ``(row=y, col=x, slice=k)``.

:class:`VolumeGeometry` maps the second onto the first (permutations and flips only: the
readers never resample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from minigpt4.inference.pipeline import DECISIONS, IntBox as PixelBox, PatientResult, SliceResult
from preprocessing.volumes import display_transform


@dataclass(frozen=True, eq=False)
class VolumeGeometry:
    """Geometry of one input volume and of the oriented slice stack the model was run on.

    Attributes:
        affine: (4, 4) float64, stored voxel ``[i, j, k, 1]`` → RAS+ mm (nibabel's convention;
            the affine the reader used, e.g. ``preprocessing.volumes.Volume.affine``).
        shape: ``(X, Y, Z)`` stored array shape.
        display_to_voxel: (4, 4) int64, display voxel ``[row, col, slice, 1]`` → stored voxel
            ``[i, j, k, 1]``; a signed permutation plus an offset (flips).

    Build it with :func:`geometry_from_affine`, :func:`geometry_from_image` or
    :func:`geometry_from_volume`, never by hand: they use the readers' own orientation code.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    display_to_voxel: np.ndarray

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        mapping = np.asarray(self.display_to_voxel)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive sizes, got {self.shape}")
        rounded = np.rint(mapping)
        part = np.abs(rounded[:3, :3])
        if (mapping.shape != (4, 4) or not np.array_equal(rounded, mapping)
                or not (np.all(part.sum(axis=0) == 1) and np.all(part.sum(axis=1) == 1))
                or not np.array_equal(rounded[3], [0, 0, 0, 1])):
            raise ValueError(f"display_to_voxel must be a signed permutation with offset, got {mapping.tolist()}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "display_to_voxel", rounded.astype(np.int64))
        corners = self.display_to_voxel @ np.array([[0, 0, 0, 1], [*(s - 1 for s in self.display_shape), 1]]).T
        if corners[:3].min() < 0 or np.any(corners[:3].max(axis=1) != np.array(self.shape) - 1):
            raise ValueError(f"display_to_voxel {mapping.tolist()} does not map onto the stored shape {self.shape}")

    @property
    def display_shape(self) -> tuple[int, int, int]:
        """``(H, W, Z)``: rows, columns and slices of the oriented stack."""
        axes = [int(np.nonzero(self.display_to_voxel[:3, d])[0][0]) for d in range(3)]  # stored axis of each
        return tuple(self.shape[a] for a in axes)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.display_shape[2]

    def voxel_of(self, x: int, y: int, k: int) -> tuple[int, int, int]:
        """Stored voxel ``(i, j, k)`` of pixel ``(x, y)`` (column, row) of display slice ``k``."""
        i, j, kk, _ = self.display_to_voxel @ np.array([y, x, k, 1])
        return int(i), int(j), int(kk)

    def ras_of(self, voxel: Sequence[float]) -> tuple[float, float, float]:
        """RAS+ mm of a stored voxel index (the voxel's centre): ``affine @ [i, j, k, 1]``."""
        point = self.affine @ np.array([*(float(v) for v in voxel), 1.0])
        return float(point[0]), float(point[1]), float(point[2])

    def voxel_box(self, pixel_box: Sequence[int], k: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Inclusive stored-index bounds ``(lo, hi)`` of an inclusive pixel box on display slice ``k``."""
        x1, y1, x2, y2 = pixel_box
        a = np.array(self.voxel_of(x1, y1, k))
        b = np.array(self.voxel_of(x2, y2, k))
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]

    def as_dict(self) -> dict:
        height, width, slices = self.display_shape
        return {"shape": list(self.shape), "affine": self.affine.tolist(),
                "display_shape": {"height": height, "width": width, "slices": slices},
                "display_to_voxel": self.display_to_voxel.tolist()}


def geometry_from_affine(affine: np.ndarray, shape: Sequence[int]) -> VolumeGeometry:
    """Geometry of a stored array of ``shape`` with ``affine``, oriented for display exactly as
    :func:`preprocessing.volumes.to_display` does (its own orientation transform)."""
    from nibabel.orientations import inv_ornt_aff


    shape = tuple(int(v) for v in shape[:3])
    mapping = inv_ornt_aff(display_transform(np.asarray(affine, dtype=np.float64)), shape)
    return VolumeGeometry(affine=np.asarray(affine, dtype=np.float64), shape=shape, display_to_voxel=mapping)


def geometry_from_image(image: Any) -> VolumeGeometry:
    """Geometry of a nibabel image (header only, no voxels read): ``image.affine`` and the first
    three axes of ``image.shape``. A file without orientation (qform_code = sform_code = 0) gets
    nibabel's default affine here, whereas :func:`preprocessing.volumes.load_nifti` refuses it or
    uses ``--assume-orientation``: for those, use :func:`geometry_from_volume` on what it returned."""
    return geometry_from_affine(image.affine, image.shape[:3])


def geometry_from_volume(volume: Any) -> VolumeGeometry:
    """Geometry of a :class:`preprocessing.volumes.Volume` as the readers return it (the affine
    they oriented the slices with, also for DICOM series and assumed orientations)."""
    return geometry_from_affine(volume.affine, volume.array.shape[:3])


# ----------------------------------------------------------------------------- model results
# What the model said comes as the inference pipeline's own classes
# (:class:`minigpt4.inference.pipeline.VolumeResult`: ``SliceResult`` per display slice,
# ``PatientResult``); files mark the inclusive pixel boxes of ``SliceResult.inclusive_boxes``.


def slice_boxes(geometry: VolumeGeometry, row: SliceResult) -> tuple[Optional[PixelBox], Optional[PixelBox]]:
    """``(pancreas, tumor)`` inclusive pixel boxes of a slice result on this geometry's slices."""
    height, width, _ = geometry.display_shape
    return row.inclusive_boxes(width, height)


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def check_results(geometry: VolumeGeometry, patient: Optional[PatientResult], results: Sequence[SliceResult]) -> None:
    """Refuse results that do not fit the geometry or contradict themselves (ValueError naming
    the slice): a slice outside the stack, a P(tumor) outside [0, 1], a slice twice, and a
    ``tumor``/``no tumor`` decision without any pancreas box (nothing is "found" or "not found"
    where the model did not look). ``patient`` None: no patient answer (one checkpoint)."""
    n_slices = geometry.n_slices  # boxes are inside their slice by construction (grid_to_pixel_inclusive)
    seen: set[int] = set()
    for row in results:
        index = int(row.slice_index)
        if not 0 <= index < n_slices:
            raise ValueError(f"slice {index}: outside the stack of {n_slices} slices")
        if index in seen:
            raise ValueError(f"slice {index}: given twice")
        seen.add(index)
        if row.p_tumor is not None and not 0.0 <= _finite(row.p_tumor, f"slice {index}: p_tumor") <= 1.0:
            raise ValueError(f"slice {index}: p_tumor {row.p_tumor} outside [0, 1]")
    if patient is None:
        return
    if patient.decision not in DECISIONS:
        raise ValueError(f"decision {patient.decision!r}: expected one of {DECISIONS}")
    _finite(patient.threshold, "threshold")
    if patient.decision == "inconclusive":
        return
    _finite(patient.score, "score")
    if not any(row.pancreas_grid is not None for row in results):
        raise ValueError(f"decision {patient.decision!r} but no slice has a pancreas box: the model did not "
                         "look, so the answer is 'inconclusive'")
