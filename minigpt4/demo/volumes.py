"""Whole CT volumes for the demo, read and normalised by the preprocessing package.

Nothing here re-implements orientation or normalisation: :func:`preprocessing.volumes.load_nifti`
/ :func:`preprocessing.volumes.read_dicom_series` read the file, :func:`preprocessing.volumes.to_display`
brings it into the display frame of the training PNGs (anterior at the top, the patient's right
on the image left, axial order as stored) and :func:`preprocessing.normalize.normalize_slice`
applies the training normalisation (``paper`` or ``window``) slice by slice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from minigpt4.serving import InputError


def read_display_volume(path: str | os.PathLike, name: Optional[str] = None) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI file or a folder holding one DICOM series → HU slices in the display frame.

    Args:
        path: ``.nii``/``.nii.gz`` file or a DICOM folder.
        name: the file name to show in messages (the upload's, not the temp path).

    Returns:
        ``(hu, spacing)``: hu (Z, H, W) float32, slice k = display-frame slice k (row = PNG row);
        spacing = voxel sizes (mm) of the stored axes.

    Raises:
        InputError: the preprocessing reader refused the file (the message says why).
    """
    from preprocessing.volumes import VolumeError, check_intensities, load_nifti, read_dicom_series, to_display

    path = Path(path)
    name = name or path.name
    try:
        volume = read_dicom_series(path) if path.is_dir() else load_nifti(path, scaled=True)
        check_intensities(volume)  # NaN/Inf or non-HU values: refused like the preprocessing CLI does
    except VolumeError as err:
        raise InputError(f"{name}: {err.problem}.") from None
    if volume.array.ndim != 3 or min(volume.array.shape) == 0:
        raise InputError(f"{name}: expected a 3-D CT volume, got shape {tuple(volume.array.shape)}.")
    display = to_display(np.asarray(volume.array), volume.affine)  # (rows, cols, slices)
    hu = np.ascontiguousarray(np.moveaxis(display, 2, 0), dtype=np.float32)
    if volume.slope != 1.0 or volume.inter != 0.0:
        hu = hu * np.float32(volume.slope) + np.float32(volume.inter)
    spacing = tuple(float(v) for v in np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0)))
    return hu, spacing


def normalise_volume(hu: np.ndarray, method: str) -> np.ndarray:
    """(Z, H, W) HU → (Z, H, W) uint8 with the training normalisation, slice by slice."""
    from preprocessing.normalize import normalize_slice

    out = np.empty(hu.shape, dtype=np.uint8)
    for k in range(hu.shape[0]):
        out[k] = normalize_slice(hu[k], method)
    return out
