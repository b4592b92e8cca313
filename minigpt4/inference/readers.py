"""Reading a CT for the model: a file (NIfTI, DICOM folder or zip) → oriented, normalised slices.

:func:`load_slice` / :func:`load_volume` refuse what the model cannot use (wrong type, too large,
unreadable, a colour picture, an empty volume) with an :class:`InputError` meant for the user;
headers are checked against :class:`Limits` before any voxel is decoded. Orientation and
normalisation are those of the training PNGs, from :mod:`preprocessing` (``load_nifti`` /
``read_dicom_series``, ``to_display``: anterior up, the patient's right on the image left;
``normalize_slice`` slice by slice).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from minigpt4.inference.geometry import geometry_from_volume
from preprocessing.acquisition import measure_acquisition
from preprocessing.normalize import normalize_slice
from preprocessing.volumes import (
    VolumeError,
    check_intensities,
    decode_budget,
    load_mha,
    load_nifti,
    read_dicom_headers,
    read_dicom_series,
    to_display,
)

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
ITK_SUFFIXES = (".mha", ".nrrd")
"""Read with SimpleITK (:func:`preprocessing.volumes.load_mha`): grand-challenge's ``.mha`` and NRRD."""
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".zip", *ITK_SUFFIXES)
NORMALISATIONS = ("paper", "window")


class InputError(ValueError):
    """An upload or instruction the demo cannot use. The message is shown to the user as is."""


@dataclass
class Limits:
    """Upload limits (the web server also caps every upload with ``--max-file-size``)."""

    max_slice_bytes: int = 20 * 1024**2
    max_volume_bytes: int = 1024**3
    max_unzipped_bytes: int = 2 * 1024**3
    """Total uncompressed size of a DICOM zip (guards against zip bombs)."""
    max_zip_members: int = 5000
    min_side: int = 32
    max_side: int = 4096
    max_slices: int = 2000
    max_instruction_chars: int = 500
    max_decode_bytes: int = 4 * 1024**3
    """Memory a volume may take once decoded, estimated from its header before any voxel is read
    (:func:`decode_bytes`): a small ``.nii.gz`` of zeros can declare gigabytes of voxels."""
    owner: str = "the demo's"
    """Whose limits these are, in messages ("over the demo's limit of ...")."""


def scan_limits() -> Limits:
    """``scan.py``'s limits: no upload caps (the files are the user's own), the decoding memory
    bounded by this machine's physical memory, and a CT's slice count and size."""
    return Limits(max_volume_bytes=1 << 50, max_unzipped_bytes=1 << 50, max_zip_members=20000, max_slices=5000,
                  max_decode_bytes=decode_budget(), owner="scan.py's")


def decode_bytes(voxels: int, itemsize: int) -> int:
    """Peak memory of :func:`load_volume` for ``voxels`` stored with ``itemsize`` bytes each.

    Measured (tracemalloc) at 5–16 bytes per voxel: the file's array (≥ float32 once scaled), the
    float32 HU volume in display order and the uint8 slices; estimated as 2 × max(itemsize, 4) + 1.
    """
    return int(voxels) * (2 * max(int(itemsize), 4) + 1)


def _check_volume_geometry(name: str, n_slices: int, height: int, width: int, voxels: int, itemsize: int,
                           limits: Limits) -> None:
    """The slice count, slice size and decoding memory a header declares, against ``limits``."""
    if n_slices > limits.max_slices:
        raise InputError(f"{name}: {n_slices} slices, over {limits.owner} limit of {limits.max_slices}.")
    if min(height, width) < limits.min_side or max(height, width) > limits.max_side:
        raise InputError(
            f"{name}: slices of {width}×{height} pixels are outside the accepted size "
            f"({limits.min_side}–{limits.max_side} pixels per side)."
        )
    need = decode_bytes(voxels, itemsize)
    if need > limits.max_decode_bytes:
        raise InputError(
            f"{name}: {n_slices} slices of {width}×{height} pixels need about {_size_text(need)} of memory "
            f"to decode, over {limits.owner} budget of {_size_text(limits.max_decode_bytes)}."
        )


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.1f} GB" if n_bytes >= 1024**3 else f"{n_bytes / 1024**2:.1f} MB"


def check_nifti_header(path: Path, name: str, limits: Limits) -> None:
    """Refuse a NIfTI whose header declares more than the demo accepts, before reading voxels.

    ``nibabel.load`` reads only the header (the voxels stay on disk behind a proxy). A header
    nibabel cannot read is left to the reader, which names the problem.

    Raises:
        InputError: not 3-D, a non-numeric voxel type, too many slices, slices too small or
            large, or more decoding memory than ``limits.max_decode_bytes``.
    """
    import nibabel as nib
    from nibabel.orientations import io_orientation

    try:
        image = nib.load(str(path))
        shape = tuple(int(v) for v in image.shape)
        dtype = np.dtype(image.get_data_dtype())
        affine = image.affine
    except Exception:  # noqa: BLE001 - unreadable headers are reported by the reader
        return
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise InputError(f"{name}: voxel type {dtype} is not a CT intensity (expected integers or floats).")
    dims = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    if len(dims) != 3:
        raise InputError(f"{name}: expected a 3-D CT volume, got shape {shape}.")
    axial = 2
    try:  # the stored axis closest to head-feet becomes the slice axis (as in to_display)
        axes = io_orientation(affine)[:, 0]
        if 2 in axes:
            axial = int(np.nonzero(axes == 2)[0][0])
    except Exception:  # noqa: BLE001 - a degenerate affine is the reader's to report
        pass
    height, width = (dims[i] for i in range(3) if i != axial)
    slope, inter = image.header.get_slope_inter() if hasattr(image.header, "get_slope_inter") else (None, None)
    scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
    itemsize = max(dtype.itemsize, 8 if scaled else 4)  # nibabel scales into float64 when needed
    _check_volume_geometry(name, dims[axial], height, width, int(np.prod(dims, dtype=np.int64)), itemsize, limits)


def check_dicom_headers(folder: Path, name: str, limits: Limits, files: Optional[Sequence[Path]] = None) -> None:
    """Refuse a DICOM series that declares more than the demo accepts, before decoding pixels.

    Reads every file's header only (``stop_before_pixels``): image count (× NumberOfFrames),
    Rows × Columns. Files that are not DICOM images are left to the reader.

    Raises:
        InputError: too many slices, slices too small or large, too much decoding memory.
    """
    import pydicom

    n_slices, voxels, sizes = 0, 0, set()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()) if files is None else files:
        try:
            header = pydicom.dcmread(str(file), stop_before_pixels=True)
            rows, cols = int(header.Rows), int(header.Columns)
            frames = int(getattr(header, "NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - not a DICOM image (README, DICOMDIR, ...)
            continue
        n_slices += frames
        voxels += frames * rows * cols
        sizes.add((rows, cols))
    if not sizes:
        return
    outside = sorted(s for s in sizes if min(s) < limits.min_side or max(s) > limits.max_side)
    height, width = outside[0] if outside else max(sizes)
    _check_volume_geometry(name, n_slices, height, width, voxels, 4, limits)


def private_folders(extra: Sequence[str | os.PathLike] = ()) -> list[str]:
    """The server's folders no user message may show: ``extra`` (e.g. the demo's private workdir),
    Gradio's temp dir (``GRADIO_TEMP_DIR``), the temp dir, the caches (``HF_HOME``,
    ``XDG_CACHE_HOME``) and the home folder, each also as its resolved path; longest first, so a
    folder is replaced before its parents. ``/`` and relative paths are never listed."""
    candidates = [*extra, os.environ.get("GRADIO_TEMP_DIR"), tempfile.gettempdir(), os.environ.get("HF_HOME"),
                  os.environ.get("XDG_CACHE_HOME"), os.path.expanduser("~")]
    folders = set()
    for folder in candidates:
        if not folder:
            continue
        for text in (os.path.normpath(os.fspath(folder)), os.path.realpath(folder)):
            if os.path.isabs(text) and len(Path(text).parts) > 1:
                folders.add(text)
    return sorted(folders, key=len, reverse=True)


# a path runs until whitespace, a quote, a bracket or a separator that ends it in a sentence
_PATH_TAIL = r"(?:[/\\][^\s'\"`()\[\]{}<>,;:]*)?"
_PATH_END = r"(?![^\s'\"`()\[\]{}<>,;:/\\])"


def public_message(
    message: str,
    upload: Optional[str | os.PathLike] = None,
    private: Sequence[str | os.PathLike] = (),
    members: Optional[dict] = None,
) -> str:
    """``message`` without the server's private paths: the one filter of every text the demo shows.

    The upload's temp path becomes its file name; an extracted DICOM file ``<dir>/000003.dcm``
    becomes ``<zip>:<member name>``; any other path inside a private folder (``private``, the
    upload's folder and :func:`private_folders`: Gradio's temp dir, the temp dir, caches, the home
    folder) becomes its last component, or ``(private folder)`` when that is itself one of the
    private folders (e.g. the workdir's random name).

    Args:
        message: text meant for the user.
        upload: the uploaded file's (temp) path, if any.
        private: more private folders (the demo's workdir, an extraction folder).
        members: ``{generated file name: zip member name}`` of an extracted DICOM zip.
    """
    message = str(message)
    upload = Path(upload) if upload is not None else None
    extra = [*private, *([upload.parent] if upload is not None else [])]
    for generated, member in (members or {}).items():
        for folder in private:
            message = message.replace(str(Path(folder) / generated), f"{upload.name if upload else ''}:{member}")
    if upload is not None:
        for text in {str(upload), os.path.realpath(upload)}:
            message = message.replace(text, upload.name)
    folders = private_folders(extra)
    hidden = {part for folder in folders for part in Path(folder).parts}

    def replace(match: re.Match) -> str:
        tail = match.group(0)[len(match.group(1)):].strip("/\\")
        last = Path(tail).name if tail else ""
        return last if last and last not in hidden else "(private folder)"

    for folder in folders:
        message = re.sub("(" + re.escape(folder) + ")" + _PATH_END + _PATH_TAIL, replace, message)
    return message


# ----------------------------------------------------------------------------------------------
# uploads


def upload_kind(path: str | os.PathLike) -> str:
    """``'slice'`` for PNG/JPEG, ``'volume'`` for ``.nii``/``.nii.gz``/``.zip``.

    Raises:
        InputError: any other file type.
    """
    name = Path(path).name.lower()
    if name.endswith(SLICE_SUFFIXES):
        return "slice"
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    raise InputError(
        f"{Path(path).name}: unsupported file type. Upload a CT slice ({', '.join(SLICE_SUFFIXES)}) "
        f"or a CT volume ({', '.join(VOLUME_SUFFIXES)}; .zip = one DICOM series)."
    )


def _check_file(path: Path, max_bytes: int, owner: str = "the demo's") -> None:
    if not path.is_file():
        raise InputError(f"{path.name}: file not found (the upload may have expired; upload it again).")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name}: the file is empty.")
    if size > max_bytes:
        raise InputError(
            f"{path.name}: {size / 1024**2:.1f} MB is over {owner} limit of {max_bytes / 1024**2:.0f} MB."
        )


def to_uint8_gray(image: Image.Image, name: str = "image") -> np.ndarray:
    """A decoded picture → grayscale uint8 (H, W), refusing what is not a CT slice.

    Grayscale 8-bit images pass unchanged; 16-bit and float grayscale are stretched min–max to
    0–255; RGB(A)/palette images are accepted only when their channels agree (a grayscale slice
    saved as RGB or JPEG), since CT slices have no colour.

    Raises:
        InputError: colour picture, blank image, or a side outside the limits.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        gray = np.zeros(array.shape, np.uint8) if high <= low else np.round((array - low) / (high - low) * 255).astype(np.uint8)
    elif image.mode in ("L", "1"):
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
        # JPEG chroma noise stays within a few grey levels; a colour photo differs far more
        spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max(axis=2)
        if float(spread.mean()) > 3.0 or float(np.percentile(spread, 99)) > 24:
            raise InputError(
                f"{name}: this looks like a colour picture, not a CT slice (CT slices are grayscale). "
                "Upload an axial CT slice exported as PNG/JPEG, or the CT volume itself."
            )
        gray = np.round(rgb.mean(axis=2)).astype(np.uint8)
    if gray.ndim != 2:
        raise InputError(f"{name}: expected a 2-D image, got shape {gray.shape}.")
    return gray


def check_slice_array(gray: np.ndarray, name: str, limits: Limits) -> np.ndarray:
    """Size and content checks shared by uploaded slices and volume slices."""
    height, width = gray.shape
    if min(height, width) < limits.min_side or max(height, width) > limits.max_side:
        raise InputError(
            f"{name}: {width}×{height} pixels is outside the accepted size "
            f"({limits.min_side}–{limits.max_side} pixels per side)."
        )
    if int(gray.max()) - int(gray.min()) < 2:
        raise InputError(f"{name}: the image is blank (a single grey level); nothing to analyse.")
    return gray


def load_slice(path: str | os.PathLike, limits: Limits = Limits()) -> np.ndarray:
    """Read an uploaded CT slice (PNG/JPEG) as grayscale uint8 (H, W).

    Raises:
        InputError: wrong type, too large, unreadable, not a CT slice (see :func:`to_uint8_gray`).
    """
    path = Path(path)
    if upload_kind(path) != "slice":
        raise InputError(f"{path.name}: this is a volume, not a slice image.")
    _check_file(path, limits.max_slice_bytes)
    try:
        with Image.open(path) as image:
            if max(image.size) > limits.max_side:
                raise InputError(
                    f"{path.name}: {image.size[0]}×{image.size[1]} pixels is larger than the accepted "
                    f"{limits.max_side} pixels per side."
                )
            image.load()
            gray = to_uint8_gray(image, path.name)
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{path.name}: cannot be read as an image ({type(err).__name__}: {err}).") from None
    return check_slice_array(gray, path.name, limits)


# ----------------------------------------------------------------------------------------------
# volumes


@dataclass
class Volume:
    """A CT volume ready to display: normalised axial slices in radiological orientation."""

    name: str
    slices: np.ndarray
    """(Z, H, W) uint8, slice 0 = the first axial slice as the reader orders them."""
    normalisation: str
    spacing: Optional[tuple[float, ...]] = None
    """Voxel sizes (mm) of the stored axes, for information."""
    geometry: Any = None
    """:class:`minigpt4.scan_outputs.VolumeGeometry` of the input (stored shape, affine, display →
    voxel map): outputs are written in the input's own geometry from it."""
    dicom_headers: Optional[list] = None
    """DICOM input: the series' headers (pydicom Datasets without pixel data), header ``k`` =
    stored slice ``k`` (:func:`preprocessing.volumes.read_dicom_headers`' order), for a DICOM SEG."""
    acquisition: Optional[dict] = None
    """How it was acquired (:func:`preprocessing.acquisition.measure_acquisition` of its HU voxels):
    what the fitness checks (:mod:`minigpt4.inference.fitness`) compare with the training envelope;
    None when it could not be measured (the checks then say unknown)."""

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])


def safe_extract_dicom_zip(path: Path, dest: Path, limits: Limits, members_by_file: Optional[dict] = None) -> Path:
    """Extract a zip's files into ``dest`` under generated names (member names never become paths,
    so ``../`` tricks cannot escape), after checking member count and total size.
    ``members_by_file`` receives ``{generated name: member name}``."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{path.name}: not a readable zip archive ({err}).") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise InputError(f"{path.name}: the zip archive is empty.")
        if len(members) > limits.max_zip_members:
            raise InputError(f"{path.name}: {len(members)} files in the zip, over the limit of {limits.max_zip_members}.")
        total = sum(m.file_size for m in members)
        if total > limits.max_unzipped_bytes:
            raise InputError(
                f"{path.name}: {total / 1024**2:.0f} MB uncompressed, over the limit of "
                f"{limits.max_unzipped_bytes / 1024**2:.0f} MB."
            )
        dest.mkdir(parents=True, exist_ok=True)
        bases = [Path(m.filename.replace("\\", "/")).name for m in members]
        repeated = {b.lower() for b in bases if sum(x.lower() == b.lower() for x in bases) > 1}
        for number, (member, base) in enumerate(zip(members, bases)):
            if base.startswith("."):
                continue  # macOS resource forks (__MACOSX/._x) and hidden files
            # the member's own file name, so messages name the user's file; a generated name only
            # where that name repeats or could not be a plain file name (never a path)
            plain = (base and base.lower() not in repeated and len(base) <= 120
                     and not any(ord(c) < 32 or c in "/\\:" for c in base))
            target = dest / (base if plain else f"{number:06d}.dcm")
            if members_by_file is not None:
                members_by_file[target.name] = member.filename
            try:
                with archive.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, length=1024**2)
            except (zipfile.BadZipFile, OSError, RuntimeError) as err:
                raise InputError(f"{path.name}: cannot extract {member.filename!r} ({err}).") from None
    return dest


# the preprocessing reader's advice names its own command-line options; scan.py and the demo have none
_PREPROCESSING_HINTS = (
    (re.compile(r", or, when you know how it is stored, give it to python -m preprocessing as --assume-orientation \S+"),
     " with a converter that keeps the scanner's geometry (e.g. dcm2niix)"),
    (re.compile(r"\s*\(python -m preprocessing [^)]*\)"), ""),
    (re.compile(r"fix or drop the volume;?"), "fix or drop the volume"),
)

MAX_PIXEL_ASPECT = 1.25
"""Largest ratio of an axial pixel's two sides accepted (CT acquires square axial pixels; a
coronal or sagittal reformat with thick slices would reach the model squashed)."""
OBLIQUE_COSINE = 0.999
"""An axis whose direction is further from every patient axis than this cosine (about 2.6°) is
oblique: the limit :func:`preprocessing.volumes.read_dicom_headers` applies to DICOM series,
applied here to NIfTI affines too (one rule for both)."""


def _reader_problem(err: Any, name: str, root: Path, display_root: str) -> str:
    """A reader error as ``<name>: [<file>: ]<problem>``: a problem of one file inside a DICOM
    folder names that file (relative to the folder), not only the folder."""
    problem = err.problem
    for pattern, replacement in _PREPROCESSING_HINTS:
        problem = pattern.sub(replacement, problem)
    where = Path(err.path)
    if where != root and root in where.parents:
        return f"{name}: {display_root}{where.relative_to(root).as_posix()}: {problem}"
    return f"{name}: {problem}"


def check_scan_geometry(affine: np.ndarray, name: str) -> None:
    """One rule for NIfTI and DICOM: refuse an oblique volume and axial pixels that are not
    square (within :data:`MAX_PIXEL_ASPECT`); the model would see tilted or squashed anatomy.

    Raises:
        InputError: naming the angle or the pixel sides and what to do.
    """
    from nibabel.orientations import io_orientation

    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.sqrt((axes ** 2).sum(axis=0))
    cosines = np.abs(axes / sizes).max(axis=0)
    if float(cosines.min()) < OBLIQUE_COSINE:
        degrees = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))
        raise InputError(f"{name}: oblique geometry (a voxel axis {degrees:.1f}° off the patient axes) is not "
                         "supported; resample the volume to axial slices first.")
    axial = int(np.nonzero(io_orientation(affine)[:, 0] == 2)[0][0])  # the stored axis closest to head-feet
    side = sorted(float(sizes[i]) for i in range(3) if i != axial)
    if side[1] > MAX_PIXEL_ASPECT * side[0]:
        raise InputError(f"{name}: axial pixels of {side[0]:.2f} × {side[1]:.2f} mm ({side[1] / side[0]:.2f} : 1) "
                         "would reach the model squashed (the volume is not stored as axial slices with square "
                         "pixels); resample it to axial slices first.")


def read_display_volume(path: str | os.PathLike, name: Optional[str] = None, files: Optional[Sequence[Path]] = None,
                        display_root: str = "") -> tuple[np.ndarray, tuple[float, ...], Any, Optional[list],
                                                         Optional[dict]]:
    """A NIfTI / ``.mha`` / ``.nrrd`` file or a folder holding one DICOM series → HU slices in the display frame.

    Args:
        path: ``.nii``/``.nii.gz``/``.mha``/``.nrrd`` file or a DICOM folder.
        name: the file name to show in messages (the upload's, not the temp path).
        files: DICOM: the series' files (default: every DICOM file under ``path``).
        display_root: prefix of a file's name inside ``path`` in messages (a zip's ``name:``).

    Returns:
        ``(hu, spacing, geometry, headers, acquisition)``: hu (Z, H, W) float32, slice k = display-frame slice k
        (row = PNG row); spacing = voxel sizes (mm) of the stored axes; the input's
        :class:`~minigpt4.scan_outputs.VolumeGeometry`; the DICOM headers in stored slice order
        (None for NIfTI), read once with the pixels; the acquisition record (None when it
        could not be measured).

    Raises:
        InputError: the preprocessing reader refused the file (the message says why), or
            :func:`check_scan_geometry` (a series of another modality than CT is read: the fitness
            checks flag it, :mod:`minigpt4.inference.fitness`).
    """
    path = Path(path)
    name = name or path.name
    headers = None
    try:
        if path.is_dir():
            found = read_dicom_headers(path, files=None if files is None else list(files))
            volume = read_dicom_series(path, headers=found)
            headers = [ds for _, ds in found[0]]
        elif path.name.lower().endswith(ITK_SUFFIXES):
            volume = load_mha(path)
        else:
            volume = load_nifti(path, scaled=True)
        check_scan_geometry(volume.affine, name)
        check_intensities(volume)  # NaN/Inf or non-HU values: refused like the preprocessing CLI does
    except VolumeError as err:
        raise InputError(_reader_problem(err, name, path, display_root).rstrip(".") + ".") from None
    if volume.array.ndim != 3 or min(volume.array.shape) == 0:
        raise InputError(f"{name}: expected a 3-D CT volume, got shape {tuple(volume.array.shape)}.")
    display = to_display(np.asarray(volume.array), volume.affine)  # (rows, cols, slices)
    hu = np.ascontiguousarray(np.moveaxis(display, 2, 0), dtype=np.float32)
    if volume.slope != 1.0 or volume.inter != 0.0:
        hu = hu * np.float32(volume.slope) + np.float32(volume.inter)
    spacing = tuple(float(v) for v in np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0)))
    try:  # slice axis 0 of the display frame is the stored axial axis
        acquisition = measure_acquisition(hu, volume.affine, 0, headers)
    except (ValueError, FloatingPointError):
        acquisition = None
    return hu, spacing, geometry_from_volume(volume), headers, acquisition


def normalise_volume(hu: np.ndarray, method: str) -> np.ndarray:
    """(Z, H, W) HU → (Z, H, W) uint8 with the training normalisation, slice by slice."""
    out = np.empty(hu.shape, dtype=np.uint8)
    for k in range(hu.shape[0]):
        out[k] = normalize_slice(hu[k], method)
    return out


def load_volume(
    path: str | os.PathLike,
    normalisation: str = "paper",
    limits: Limits = Limits(),
    workdir: Optional[str | os.PathLike] = None,
    files: Optional[Sequence[str | os.PathLike]] = None,
) -> Volume:
    """Read a CT volume (NIfTI, ``.mha`` / ``.nrrd``, a DICOM series folder, or a zip of one) for display and scanning.

    Orientation and normalisation come from :mod:`preprocessing` (the same functions that wrote
    the training PNGs): slices are reoriented from the affine to radiological display (anterior
    up, patient's right on the image left) and normalised per slice as in training (``paper``:
    2–98 % clip + histogram equalisation; ``window``: HU window [-150, 250]).

    Args:
        path: ``.nii``, ``.nii.gz``, ``.mha``, ``.nrrd``, ``.zip`` or a folder holding one DICOM series.
        normalisation: ``paper`` or ``window``.
        workdir: private folder for the extracted DICOM files (a fresh temp folder when None).
        files: a DICOM folder: read exactly these files (one series among others), e.g.
            :class:`minigpt4.inference.inputs.VolumeInput` ``files``.

    Raises:
        InputError: wrong type, too large, unreadable, empty, not 3-D, too many slices.
    """
    path = Path(path)
    if normalisation not in NORMALISATIONS:
        raise InputError(f"unknown normalisation {normalisation!r}; choose one of {', '.join(NORMALISATIONS)}.")
    if not path.is_dir():
        if upload_kind(path) != "volume":
            raise InputError(f"{path.name}: this is a slice image, not a volume.")
        _check_file(path, limits.max_volume_bytes, limits.owner)

    # headers are checked against the limits before any voxel is decoded, and no message may
    # show the server's private temp paths (Gradio's upload folder, the extraction folder)
    private: list[Path] = [Path(workdir)] if workdir is not None else []
    shown = path.name or Path(os.path.abspath(path)).name  # `.` and `..` by the folder they are
    members: dict[str, str] = {}
    try:
        if shown.lower().endswith(".zip"):
            extract_dir = Path(tempfile.mkdtemp(prefix="dicom_", dir=workdir))
            private.insert(0, extract_dir)
            try:
                safe_extract_dicom_zip(path, extract_dir, limits, members)
                check_dicom_headers(extract_dir, shown, limits)
                hu, spacing, geometry, headers, acquisition = read_display_volume(extract_dir, shown)
            finally:
                shutil.rmtree(extract_dir, ignore_errors=True)
        elif path.is_dir():
            listed = None if files is None else [Path(f) for f in files]
            check_dicom_headers(path, shown, limits, listed)
            hu, spacing, geometry, headers, acquisition = read_display_volume(path, shown, listed)
        else:
            check_nifti_header(path, shown, limits)
            hu, spacing, geometry, headers, acquisition = read_display_volume(path, shown)
    except InputError as err:
        raise InputError(public_message(str(err), path, private, members)) from None
    except MemoryError:
        raise InputError(f"{shown}: not enough memory to decode this volume.") from None
    except Exception as err:  # noqa: BLE001 - a reader failure is a message, without private paths
        raise InputError(public_message(f"{shown}: cannot read the volume ({type(err).__name__}: {err}).",
                                        path, private, members)) from None
    if hu.ndim != 3:
        raise InputError(f"{shown}: expected a 3-D CT volume, got shape {tuple(hu.shape)}.")
    if hu.shape[0] == 0 or hu.size == 0:
        raise InputError(f"{shown}: the volume has no slices.")
    if hu.shape[0] > limits.max_slices:
        raise InputError(f"{shown}: {hu.shape[0]} slices, over {limits.owner} limit of {limits.max_slices}.")
    if not np.isfinite(hu).all() or float(hu.max()) - float(hu.min()) <= 0:
        raise InputError(f"{shown}: the volume is empty (constant or non-finite values).")
    height, width = hu.shape[1:]
    if min(height, width) < limits.min_side or max(height, width) > limits.max_side:
        raise InputError(
            f"{shown}: slices of {width}×{height} pixels are outside the accepted size "
            f"({limits.min_side}–{limits.max_side} pixels per side)."
        )
    slices = normalise_volume(hu, normalisation)
    return Volume(name=shown, slices=slices, normalisation=normalisation, spacing=spacing, geometry=geometry,
                  dicom_headers=headers, acquisition=acquisition)
