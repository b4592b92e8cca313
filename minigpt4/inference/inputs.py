"""What a scan reads: the CT volumes under ``--inputs``, found by content, named safely.

:func:`find_volumes` walks the inputs and returns the volumes it found and the entries it
skipped, each with its reason, so a command can say both:

* a NIfTI file (``.nii`` / ``.nii.gz``) or a zip (one DICOM series) is one volume;
* DICOM files are found by **content** (the ``DICM`` marker after the 128-byte preamble, or a
  ``.dcm`` name pydicom can read), whatever their extension, anywhere under a folder; they are
  grouped into **one volume per SeriesInstanceUID**. A single image (a scout) and non-image
  objects (dose reports, DICOMDIR) are skipped with the reason; a series of another modality
  than CT is scanned and flagged by the fitness checks (:mod:`minigpt4.inference.fitness`);
* hidden files and folders (``.name``) and other files are skipped, and said so.

Each volume gets an output folder name (:func:`safe_name`) that is never empty, ``.`` or
``..``, holds no path separator or control character, is none of the names a scan writes at
its output's top level (:data:`RESERVED_NAMES`), and is unique (``name-2``, ``name-3`` ...), so
``<out>/<name>`` always lies directly inside ``<out>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from minigpt4.inference.readers import ITK_SUFFIXES
from minigpt4.io import file_sha256, to_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ZIP_SUFFIX = ".zip"
RESERVED_NAMES = frozenset({"summary.csv", "scan.json", "manifest.json", "index.html", "report.html"})
"""Names a scan writes at its output folder's top level: never a volume folder's name."""
MAX_NAME_CHARS = 120
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:]+")


@dataclass(frozen=True)
class VolumeInput:
    """One volume to scan."""

    name: str
    """Its output folder's name (:func:`safe_name`, unique among the inputs)."""
    path: Path
    """The NIfTI or zip file, or the folder holding the DICOM series' files."""
    kind: str
    """``nifti``, ``itk`` (``.mha`` / ``.nrrd``, read with SimpleITK), ``zip`` or ``dicom``."""
    files: tuple[Path, ...] = ()
    """DICOM: exactly the series' files (the reader reads these and nothing else)."""
    series_uid: Optional[str] = None
    modality: Optional[str] = None

    @property
    def label(self) -> str:
        """How messages name it: the path, plus the series when its folder holds several."""
        return str(self.path)

    def content_sha256(self) -> str:
        """SHA-256 of what the reader reads: the file's bytes, or the series' files (their paths
        relative to :attr:`path` and their bytes), so adding, removing or changing one changes it."""
        if self.kind != "dicom":
            return file_sha256(self.path)
        listing = sorted([os.path.relpath(p, self.path), file_sha256(p)] for p in self.files)
        return hashlib.sha256(to_json(listing).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Skipped:
    """An entry under ``--inputs`` that is not scanned, and why."""

    path: Path
    reason: str

    def as_dict(self) -> dict:
        return {"path": str(self.path), "reason": self.reason}


@dataclass
class Found:
    """:func:`find_volumes`' answer."""

    volumes: list[VolumeInput] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many volumes of each kind, how many entries skipped and the first reasons."""
        kinds = defaultdict(int)
        for v in self.volumes:
            kinds[v.kind] += 1
        words = {"nifti": "NIfTI file", "itk": "MHA/NRRD file", "zip": "DICOM zip", "dicom": "DICOM series"}
        found = ", ".join(f"{n} {words[k]}{'s' if n > 1 else ''}" for k, n in sorted(kinds.items())) or "nothing"
        text = f"found {len(self.volumes)} volume(s): {found}"
        if self.skipped:
            shown = "; ".join(f"{s.path} ({s.reason})" for s in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more (listed in scan.json)" if len(self.skipped) > 5 else ""
            text += f"; skipped {len(self.skipped)}: {shown}{more}"
        return text


def strip_volume_suffix(name: str) -> str:
    """``case7.nii.gz`` → ``case7`` (also ``.nii``, ``.mha``, ``.nrrd`` and ``.zip``, any case)."""
    lower = name.lower()
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES, ZIP_SUFFIX):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def safe_name(text: str, fallback: str = "volume") -> str:
    """A folder name made from ``text``: path separators and control characters become ``_``,
    leading/trailing dots and spaces are dropped (no ``.``, ``..``, hidden or empty name), at most
    :data:`MAX_NAME_CHARS` characters; ``fallback`` when nothing is left."""
    name = _UNSAFE.sub("_", str(text)).strip(" .")
    name = name[:MAX_NAME_CHARS].rstrip(" .")
    return name or fallback


def unique_names(names: Sequence[str], taken: Iterable[str] = RESERVED_NAMES) -> list[str]:
    """``names`` made unique, in order: a repeated (or ``taken``, case-insensitively) name gets
    ``-2``, ``-3`` ... (the first free one)."""
    used = {n.lower() for n in taken}
    out = []
    for name in names:
        candidate, number = name, 1
        while candidate.lower() in used:
            number += 1
            candidate = f"{name}-{number}"
        used.add(candidate.lower())
        out.append(candidate)
    return out


def volume_name(path: str | os.PathLike) -> str:
    """The safe folder name of one input file or folder (its suffix stripped; a path such as
    ``.`` or ``..`` is named after the folder it resolves to)."""
    path = Path(path)
    base = path.name if path.name not in ("", ".", "..") else Path(os.path.abspath(path)).name
    return safe_name(strip_volume_suffix(base))


# ----------------------------------------------------------------------------- file types


def _file_kind(lower_name: str) -> Optional[str]:
    """``nifti`` / ``itk`` / ``zip`` for a volume file's (lower-case) name, else None."""
    if is_nifti_name(lower_name):
        return "nifti"
    if lower_name.endswith(ITK_SUFFIXES):
        return "itk"
    return "zip" if lower_name.endswith(ZIP_SUFFIX) else None


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _special_kind(mode: int) -> Optional[str]:
    for test, word in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return None


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by content: ``DICM`` at byte 128 (the Part 10 preamble)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_identity(path: Path) -> Optional[tuple[str, str, bool]]:
    """``(SeriesInstanceUID, Modality, is_image)`` of a DICOM file, None when pydicom cannot
    read its header."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not is_dicom_file(path),
                             specific_tags=["SeriesInstanceUID", "Modality", "Rows", "Columns", "SOPClassUID"])
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is not a DICOM file for us
        return None
    if "SOPClassUID" not in ds and "Rows" not in ds and "SeriesInstanceUID" not in ds:
        return None  # forced read of a non-DICOM file
    return (str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("Modality", "") or "").upper(),
            "Rows" in ds and "Columns" in ds)


# ----------------------------------------------------------------------------- discovery


def find_volumes(paths: Sequence[str | os.PathLike]) -> Found:
    """The volumes under ``paths`` (files or folders, walked recursively) and what was skipped.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input that is not a regular file or folder (a FIFO, a device), a file
            that is not a volume, a single DICOM image, or a folder without any volume (the
            message lists what was skipped there).
    """
    found = Found()
    candidates: list[tuple[str, Path, str, tuple[Path, ...], Optional[str], Optional[str]]] = []
    for item in paths:
        path = Path(item)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: --inputs path not found") from None
        except OSError as err:
            raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
        special = _special_kind(mode)
        if special:
            raise ValueError(f"{path}: --inputs is {special}, not a file or folder; give a NIfTI file, a DICOM zip "
                             "or a folder")
        if stat.S_ISREG(mode):
            lower = path.name.lower()
            if is_nifti_name(lower):
                candidates.append((volume_name(path), path, "nifti", (), None, None))
            elif lower.endswith(ITK_SUFFIXES):
                candidates.append((volume_name(path), path, "itk", (), None, None))
            elif lower.endswith(ZIP_SUFFIX):
                candidates.append((volume_name(path), path, "zip", (), None, None))
            elif is_dicom_file(path):
                raise ValueError(f"{path}: a single DICOM image; give the folder holding its whole series")
            else:
                raise ValueError(f"{path}: not a CT volume (expected .nii, .nii.gz, .mha, .nrrd, a DICOM .zip, a "
                                 "DICOM series folder or a folder of those)")
            continue
        before = len(found.skipped)
        inside = _walk_folder(path, found.skipped)
        if not inside:
            reasons = "; ".join(f"{s.path.name} ({s.reason})" for s in found.skipped[before:before + 3])
            raise ValueError(f"{path}: no NIfTI file, DICOM zip or DICOM series in it"
                             + (f" (skipped: {reasons})" if reasons else ""))
        candidates += inside
    seen: dict[tuple, Path] = {}
    unique = []
    for cand in candidates:  # the same file or series given twice (a folder and a file in it)
        key = (cand[2], cand[4]) if cand[2] == "dicom" else (cand[2], os.path.realpath(cand[1]))
        if key in seen:
            continue
        seen[key] = cand[1]
        unique.append(cand)
    unique.sort(key=lambda c: (c[0].lower(), str(c[1]), c[4] or ""))
    names = unique_names([c[0] for c in unique])
    scanned = {os.path.realpath(c[1]) for c in unique if c[2] != "dicom"}
    found.skipped = [s for s in found.skipped if os.path.realpath(s.path) not in scanned]
    found.volumes = [VolumeInput(name=n, path=c[1], kind=c[2], files=c[3], series_uid=c[4], modality=c[5])
                     for n, c in zip(names, unique)]
    return found


def discover(paths: Sequence[str | os.PathLike]) -> list[VolumeInput]:
    """The volumes of :func:`find_volumes` (for callers that do not report what was skipped)."""
    return find_volumes(paths).volumes


def _walk_folder(root: Path, skipped: list[Skipped]) -> list[tuple]:
    """Volumes under ``root``: its NIfTIs and zips, and its DICOM files grouped by series."""
    out: list[tuple] = []
    series: dict[str, list[Path]] = defaultdict(list)
    modality: dict[str, str] = {}
    non_image: dict[str, list[Path]] = defaultdict(list)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        for d in sorted(dirs):
            if d.startswith("."):
                skipped.append(Skipped(here / d, "hidden folder"))
            elif (here / d).is_symlink():
                skipped.append(Skipped(here / d, "a link to a folder (not followed; give its target as an input)"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        for name in sorted(files):
            path = here / name
            if name.startswith("."):
                if name not in (".DS_Store",) and not name.startswith((".minigpt4.lock",)):
                    skipped.append(Skipped(path, "hidden file"))
                continue
            try:
                mode = path.stat().st_mode
            except OSError:
                skipped.append(Skipped(path, "cannot be read (broken link or no permission)"))
                continue
            special = _special_kind(mode)
            if special:
                skipped.append(Skipped(path, f"{special}, not a file"))
                continue
            lower = name.lower()
            kind = _file_kind(lower)
            if kind is not None:
                out.append((volume_name(path), path, kind, (), None, None))
                continue
            identity = _dicom_identity(path) if (is_dicom_file(path) or lower.endswith(".dcm")) else None
            if identity is None:
                skipped.append(Skipped(path, "not a NIfTI, MHA/NRRD, zip or DICOM file"))
                continue
            uid, mod, is_image = identity
            key = uid or f"(no SeriesInstanceUID) {here}"
            if not is_image:
                non_image[key].append(path)
                continue
            series[key].append(path)
            modality.setdefault(key, mod)
    for key, files in non_image.items():
        if key not in series:
            skipped.append(Skipped(files[0] if len(files) == 1 else files[0].parent,
                                   f"DICOM object(s) without an image ({len(files)} file(s))"))
    by_folder: dict[Path, list[str]] = defaultdict(list)
    for key, files in series.items():
        by_folder[_common_folder(files)].append(key)
    kept: list[tuple[Path, str, tuple[Path, ...], str]] = []
    for folder, keys in by_folder.items():
        for key in sorted(keys):
            files = tuple(sorted(series[key]))
            mod = modality.get(key, "")  # another modality than CT is scanned and flagged by the fitness checks
            if len(files) < 2:
                skipped.append(Skipped(files[0], "a single DICOM image (a scout or key image?), not a CT series"))
                continue
            kept.append((folder, key, files, mod))
    # a series is named after the highest folder under ``root`` (``root`` itself included) that
    # holds no other volume: ``patient/study/series/`` is named ``patient``, as the user sees it
    others = [c[1] for c in out] + [f for _, _, files, _ in kept for f in files[:1]]
    for folder, key, files, mod in kept:
        mine = set(files)
        chain = [folder, *[p for p in folder.parents if p == root or root in p.parents]]
        place = None
        for candidate in reversed(chain):  # from root down to the series' own folder
            if not any(p not in mine and (p == candidate or candidate in p.parents) for p in others):
                place = candidate
                break
        name = volume_name(place if place is not None else folder)
        if place is None:  # shares its folder with another volume
            name = safe_name(f"{name}_series-{key[-8:]}")
        out.append((name, place if place is not None else folder, "dicom", files, key, mod or None))
    return out


def _common_folder(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))
