"""The inputs of a scan: NIfTI files, DICOM series folders, zips of one series, or folders of
those (:func:`discover`), each named by its output folder (:func:`volume_name`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minigpt4.inference.readers import ITK_SUFFIXES

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ZIP_SUFFIX = ".zip"


@dataclass(frozen=True)
class ScanInput:
    name: str
    """The volume's name: its output folder (``case7.nii.gz`` → ``case7``; a folder's name)."""
    path: Path


def volume_name(path: Path) -> str:
    """The output folder name of an input: without ``.nii.gz`` / ``.nii`` / ``.zip``."""
    lower = path.name.lower()
    for suffix in (".nii.gz", ".nii", *ITK_SUFFIXES, ZIP_SUFFIX):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((*NIFTI_SUFFIXES, *ITK_SUFFIXES, ZIP_SUFFIX))


def is_series_folder(path: Path) -> bool:
    """One DICOM series: a folder holding ``.dcm`` files, or a chain of single subfolders down to
    one (the ``patient/study/series/`` layout of TCIA downloads)."""
    if not path.is_dir():
        return False
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.name.lower().endswith(".dcm") for p in children):
        return True
    folders = [p for p in children if p.is_dir()]
    return len(folders) == 1 and not any(_is_volume_file(p) for p in children) and is_series_folder(folders[0])


def discover(paths: Sequence[str | Path]) -> list[ScanInput]:
    """The volumes of ``--inputs``, sorted by name: a NIfTI or zip file is one volume, a DICOM
    series folder is one, any other folder is expanded one level (its NIfTIs, zips and series
    folders; other files are ignored).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input file of another type, a folder without volumes, two volumes of one name.
    """
    found: list[ScanInput] = []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: --inputs path not found")
        if path.is_file():
            if not _is_volume_file(path):
                raise ValueError(f"{path}: not a CT volume (expected .nii, .nii.gz, .mha, .nrrd, a DICOM .zip or a folder)")
            found.append(ScanInput(volume_name(path), path))
        elif is_series_folder(path):
            found.append(ScanInput(path.name, path))
        else:
            inside = [ScanInput(volume_name(p), p) for p in sorted(path.iterdir()) if not p.name.startswith(".")
                      and (_is_volume_file(p) or is_series_folder(p))]
            if not inside:
                raise ValueError(f"{path}: no NIfTI file, DICOM zip or DICOM series folder in it")
            found += inside
    by_name: dict[str, Path] = {}
    for entry in found:
        if entry.name in by_name:
            raise ValueError(f"{by_name[entry.name]} and {entry.path}: two volumes named {entry.name!r} "
                             "(the name is the output folder); rename one")
        by_name[entry.name] = entry.path
    return sorted(found, key=lambda entry: entry.name)
