"""NIfTI writing, beside :mod:`minigpt4.io`'s atomic writers (issue 24: the phantom generator and
the scan's ``boxes.nii.gz`` write through the same function)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from minigpt4.io import write_bytes_atomic


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Atomic ``.nii.gz`` write (gzip level 1: the phantoms are regenerated, not archived; gzip
    header time 0, so the same array gives the same bytes)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
