"""Helpers for the preprocessing tests: tiny NIfTI pairs with known geometry, DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessing import synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_pair(folder: Path, name: str, hu: np.ndarray, label: np.ndarray, orient: str = "RAS",
               spacing=(1.0, 1.0, 2.0), image_dir: str = "imagesTr", label_dir: str = "labelsTr",
               image_name: str | None = None, label_name: str | None = None) -> tuple[Path, Path]:
    """Write a display-frame (rows=A→P, cols=R→L, slices=I→S) image/label pair as NIfTI files
    stored in orientation ``orient``."""
    img_arr, img_aff = synthetic.stored(hu.astype(np.int16), spacing, orient)
    lab_arr, lab_aff = synthetic.stored(label.astype(np.uint8), spacing, orient)
    ip = folder / image_dir / (image_name or f"{name}.nii.gz")
    lp = folder / label_dir / (label_name or f"{name}.nii.gz")
    synthetic.write_nifti(ip, img_arr, img_aff)
    synthetic.write_nifti(lp, lab_arr, lab_aff)
    return ip, lp


def small_volume(h: int = 16, w: int = 20, s: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A display-frame HU volume with a gradient (so PNGs are not constant) and an empty label."""
    rng = np.random.default_rng(seed)
    hu = (rng.integers(-200, 300, size=(h, w, s))).astype(np.int16)
    return hu, np.zeros((h, w, s), dtype=np.uint8)


def rewrite_dicom_headers(folder: Path, change, rename=None) -> Path:
    """Apply ``change(dataset)`` to every DICOM file under ``folder`` (then ``rename(path)`` → new path)."""
    import pydicom

    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        ds = pydicom.dcmread(str(path))
        change(ds)
        ds.save_as(str(path))
        if rename is not None:
            path.rename(rename(path))
    return Path(folder)
