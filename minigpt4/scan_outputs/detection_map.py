"""The PANORAMA detection map of one volume (issue 27): the stage-3 tumor boxes as 3-D lesion
candidates (:mod:`minigpt4.inference.lesions`), one constant likelihood per candidate, in the
stored voxel order and geometry of the input CT, written as NIfTI (``.nii.gz``, the run folder's
``detection_maps/<volume>.nii.gz``) or MetaImage (``.mha``, grand-challenge's format).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from minigpt4.inference.lesions import LesionCandidate, detection_map, lesion_candidates, to_stored, tumor_boxes
from minigpt4.inference.pipeline import SliceResult
from minigpt4.inference.geometry import VolumeGeometry, check_results
from minigpt4.nifti_io import write_nifti
from preprocessing.synthetic_panorama import write_mha  # the one RAS → LPS .mha writer (the phantoms' too)

MAP_SUFFIXES = (".nii.gz", ".mha")


def volume_detection_map(geometry: VolumeGeometry, results: Sequence[SliceResult]) -> tuple[np.ndarray, list[LesionCandidate]]:
    """``(map, candidates)``: the float32 detection map in the stored voxel order ``geometry.shape``
    (0 background, each candidate its likelihood) and the candidates (display-frame boxes)."""
    check_results(geometry, None, results)
    height, width, _ = geometry.display_shape
    candidates = lesion_candidates(tumor_boxes(results, width, height))
    stored = to_stored(detection_map(candidates, geometry.display_shape), geometry.display_to_voxel, geometry.shape)
    return stored, candidates


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in MAP_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: a detection map is written as {', '.join(MAP_SUFFIXES)}")


def write_detection_map(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> Path:
    """Write a stored-order float32 map with the input's affine (voxel → RAS+ mm), atomically.

    ``.nii.gz``: qform and sform = ``affine`` (code 1). ``.mha``: SimpleITK with the
    same geometry in ITK's LPS convention (origin, spacing, direction from ``affine``), array
    axes ``(i, j, k)`` = ITK's ``(x, y, z)``, so ITK-based readers (picai_eval, grand-challenge)
    put every voxel where nibabel puts it.
    """
    path = Path(path)
    suffix = _suffix(path)
    array = np.asarray(volume, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if suffix == ".nii.gz":
        write_nifti(path, array, affine)  # qform = sform = affine, code 1
        return path
    write_mha(path, array, affine)
    return path
