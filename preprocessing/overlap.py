"""Find the same CT scan in two datasets by its content (``abd --exclude-overlap-with``).

AbdomenCT-1K re-distributes MSD and NIH scans under its own names (``Case_XXXXX``). Split on its
own, its val/test would hold scans an MSD / NIH stage trained on. A scan is recognised by a
content fingerprint that survives renaming, re-compression and a different storage orientation:
the shape and voxel spacing in the RAS frame, and a hash of every 8th voxel in-plane and every 4th
slice rounded to whole HU. Matched ABD volumes are kept out of ABD val/test (they go to train) and
listed in the manifest's ``overlap`` as ``{abd_volume: {"dataset", "volume", "file"}}``; the
leakage check (:mod:`minigpt4.evaluation.leakage`) reads that list.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from minigpt4.io import read_json
from preprocessing import splits, volumes

_DECIMATE = (8, 8, 4)


def volume_fingerprint(image: str, kind: str) -> str:
    """``"X×Y×Z|sx,sy,sz|hash"`` of a NIfTI file or DICOM series folder (``kind``: nifti | dicom).

    Raises:
        VolumeError: the file cannot be read (names it).
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    vol = volumes.read_dicom_series(image) if kind == "dicom" else volumes.load_nifti(image)
    transform = ornt_transform(io_orientation(vol.affine), axcodes2ornt(("R", "A", "S")))
    array = apply_orientation(np.asarray(vol.array), transform)
    spacing = np.sqrt((np.asarray(vol.affine)[:3, :3] ** 2).sum(axis=0))[np.argsort(transform[:, 0])]
    sample = array[:: _DECIMATE[0], :: _DECIMATE[1], :: _DECIMATE[2]].astype(np.float64) * vol.slope + vol.inter
    digest = hashlib.sha256(np.ascontiguousarray(np.rint(sample).astype(np.int32)).tobytes()).hexdigest()[:20]
    return f"{'x'.join(map(str, array.shape))}|{','.join(f'{s:.2f}' for s in spacing)}|{digest}"


def _fingerprint_job(job: tuple[str, str, str]) -> tuple[str, str]:
    name, image, kind = job
    return name, volume_fingerprint(image, kind)


def _raw_volumes(folder: Path) -> list[tuple[str, str, str]]:
    """``(volume_name, path, kind)`` of every NIfTI file and DICOM series folder under ``folder``."""
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
    return found


def folder_volumes(folder) -> tuple[str, list[tuple[str, str, str]]]:
    """``(dataset, [(volume_name, image, kind), ...])`` of a prepared folder (its raw inputs, from
    the manifest's parameters) or of a raw folder (every NIfTI file / DICOM series below it; the
    dataset is read off the names: ``pancreas_NNN`` = MSD, ``PANCREAS_NNNN`` = NIH)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"--exclude-overlap-with {folder}: not found")
    manifest = folder / "manifest.json"
    if manifest.is_file():
        from preprocessing.pipeline import Options, discover

        params = read_json(manifest).get("parameters", {})
        if not params.get("images") or not params.get("labels"):
            raise ValueError(f"{manifest}: no raw images recorded (a TC folder?); give a prepared MSD/NIH/ABD folder or a raw one")
        opts = Options(dataset=params["dataset"], images=params["images"], labels=params["labels"], out=str(folder),
                       label_map=params.get("label_map"))
        jobs, _ = discover(opts)
        return params["dataset"], [(j.volume_name, j.image, j.kind) for j in jobs]
    found = _raw_volumes(folder)
    if not found:
        raise ValueError(f"--exclude-overlap-with {folder}: no NIfTI files or DICOM series inside")
    names = {n for n, _, _ in found}
    dataset = "MSD" if all(re.match(r"^pancreas_\d+$", n) for n in names) else \
        "NIH" if all(re.match(r"^PANCREAS_\d+$", n) for n in names) else folder.name
    return dataset, found


def find_overlap(own: Sequence[tuple[str, str, str]], folders: Sequence, workers: int = 1) -> dict[str, dict]:
    """Volumes of ``own`` (``(name, image, kind)``) whose content equals a volume of ``folders``.

    Returns:
        ``{own_name: {"dataset", "volume", "file"}}`` (the first match, folders in order).
    """
    from preprocessing.pipeline import run_jobs

    theirs: dict[str, dict] = {}
    for folder in folders:
        dataset, found = folder_volumes(folder)
        for (name, print_), (_, image, _) in zip(run_jobs(found, _fingerprint_job, workers), found):
            theirs.setdefault(print_, {"dataset": dataset, "volume": name, "file": image})
    matches = {}
    for name, print_ in run_jobs(list(own), _fingerprint_job, workers):
        if print_ in theirs:
            matches[name] = theirs[print_]
    return matches


def split_keeping_in_train(volume_names: Sequence[str], keep_in_train: Sequence[str], test_ratio: float,
                           val_ratio: float, seed: int) -> dict:
    """:func:`splits.split_volumes` of the other volumes, then ``keep_in_train`` added to train."""
    kept = set(keep_in_train)
    split = splits.split_volumes([v for v in volume_names if v not in kept], test_ratio, val_ratio, seed)
    split["train"] = sorted(set(split["train"]) | (kept & set(volume_names)))
    split["kept_in_train"] = sorted(kept & set(volume_names))
    return split
