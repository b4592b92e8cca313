"""Reading CT volumes (NIfTI, DICOM series) and bringing them into the display frame.

Frames used in this package:

* **stored frame**: the voxel array as stored in the file (NIfTI) or as stacked by
  :func:`read_dicom_series` (columns, rows, slices sorted along the slice normal), with an
  affine mapping voxel indices to RAS+ world millimetres (nibabel's convention).
* **display frame**: ``(rows, cols, slices)`` with rows running anterior → posterior (anterior
  at the top of the PNG), columns running from the patient's right to the patient's left
  (radiological convention: the patient's right on the image LEFT), and the axial axis kept in
  its **stored order**: slice ``k`` of the display frame is slice ``k`` along the stored axial
  axis, whether that axis runs inferior → superior or the reverse. ``slice_index`` in every
  JSON record is this ``k``; a file stored with its axial axis pointing inferior (``..I``)
  therefore has ``slice_index 0`` at the top of the scan, exactly as a viewer of the stored
  array would count it.

Only axis permutations and flips are applied (no resampling); an oblique NIfTI affine is
assigned to its closest axes (``nibabel.orientations.io_orientation``), an oblique DICOM series
is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

import nibabel as nib
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

if TYPE_CHECKING:
    import pydicom


class VolumeError(ValueError):
    """A problem with one input volume; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        # raised in a worker process, it is pickled back to the parent: the default would call
        # VolumeError(message) without ``problem``, which fails there and hangs a multiprocessing pool
        return (type(self), (self.path, self.problem))


def decode_budget() -> int:
    """Bytes a volume may take once decoded: this machine's physical memory (1 TiB if unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 1 << 40


def check_nifti_shape(path, image) -> None:
    """Refuse, from the header alone, a NIfTI that is not 3-D or would not fit in memory decoded.

    ``image``: the ``nibabel.load`` result (the voxels are not read yet). Decoding needs the
    stored array plus one float copy (≥ 4 bytes a voxel) for scaling/normalising.
    """
    shape = tuple(int(v) for v in image.shape)
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise VolumeError(path, f"expected a 3-D volume, got shape {shape}")
    voxels = int(np.prod(shape, dtype=np.int64))
    need = voxels * (np.dtype(image.get_data_dtype()).itemsize + 4)
    budget = decode_budget()
    if need > budget:
        raise VolumeError(path, f"the header declares {'x'.join(map(str, shape))} voxels, about "
                                f"{need / 1024**3:.1f} GB to decode, more than this machine's memory "
                                f"({budget / 1024**3:.1f} GB); crop or resample the volume, or check its header")


# ----------------------------------------------------------------------------- orientation


def display_transform(affine: np.ndarray) -> np.ndarray:
    """Orientation transform (nibabel ``ornt`` array, shape (3, 2)) stored → display frame.

    The display frame is ``('P', 'L', axial)`` in nibabel's axis codes (rows point posterior,
    columns point to the patient's left), where ``axial`` is ``'S'`` or ``'I'`` as stored, so
    the axial order is never changed.
    """
    start = io_orientation(affine)
    axial = [i for i in range(3) if int(start[i, 0]) == 2]
    if len(axial) != 1:  # pragma: no cover - io_orientation always yields a permutation
        raise ValueError("affine has no axial axis")
    axial_code = "S" if start[axial[0], 1] > 0 else "I"
    return ornt_transform(start, axcodes2ornt(("P", "L", axial_code)))


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """Orientation transform stored → ``('P', 'L', 'S')``: the display frame with the slices always
    inferior → superior, so that one scan stored in any axis order or direction reads the same
    (content fingerprints, :mod:`preprocessing.overlap`)."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(("P", "L", "S")))


def to_display(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Stored array (X, Y, Z) → display-frame view (rows, cols, slices); no copy."""
    return apply_orientation(array, display_transform(affine))


# ----------------------------------------------------------------------------- NIfTI


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii") or path.name.endswith(".nii.gz")


def nifti_stem(path: str | os.PathLike) -> str:
    """``pancreas_001.nii.gz`` → ``pancreas_001`` (suffix removed, never ``str.strip``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class Volume:
    """A volume in its stored frame.

    Attributes:
        array: (X, Y, Z) voxel data, unscaled (apply ``slope``/``inter`` for HU).
        affine: (4, 4) voxel → RAS+ mm.
        slope, inter: linear scaling to HU (1 and 0 when the data are HU already).
        path: where it came from (for error messages).
    """

    array: np.ndarray
    affine: np.ndarray
    path: str
    slope: float = 1.0
    inter: float = 0.0


def orientation_codes(codes: str) -> tuple[str, str, str]:
    """``"LPS"`` → ``("L", "P", "S")``; refuses anything but one of R/L, A/P, S/I per axis."""
    letters = tuple(str(codes).strip().upper())
    axes = [next((i for i, pair in enumerate(("RL", "AP", "SI")) if c in pair), None) for c in letters]
    if len(letters) != 3 or None in axes or sorted(axes) != [0, 1, 2]:
        raise ValueError(f"--assume-orientation must be three axis codes, one of R/L, A/P and S/I each "
                         f"(e.g. RAS, LPS, LAS), got {codes!r}")
    return letters  # type: ignore[return-value]


def assumed_affine(codes: str, zooms) -> np.ndarray:
    """(4, 4) voxel → RAS+ mm affine of a file stored with axis codes ``codes`` and voxel sizes ``zooms``."""
    ornt = axcodes2ornt(orientation_codes(codes))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, (axis, flip) in enumerate(ornt):
        affine[int(axis), i] = float(flip) * float(zooms[i])
    return affine


def load_nifti(path: str | os.PathLike, scaled: bool = False, assume_orientation: str | None = None) -> Volume:
    """Read a NIfTI file fully, turning every read failure into a :class:`VolumeError`.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        scaled: return HU floats (``True``) or the unscaled stored integers plus
            ``slope``/``inter`` (``False``, cheaper: scaling is applied per written slice).
        assume_orientation: axis codes (``RAS``, ``LPS``, ...) for a file whose header has no
            orientation (qform_code = sform_code = 0), which is refused without it: nibabel
            would silently fall back to a default orientation (flipped slices and boxes).
            Files with an orientation keep their own.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(path, "file not found")
    try:
        img = nib.load(str(path))
        check_nifti_shape(path, img)  # before any voxel is decoded
        proxy = img.dataobj
        if scaled or not hasattr(proxy, "get_unscaled"):
            array = np.asanyarray(proxy)
            slope, inter = 1.0, 0.0
        else:
            array = np.asarray(proxy.get_unscaled())
            slope = float(proxy.slope) if proxy.slope is not None else 1.0
            inter = float(proxy.inter) if proxy.inter is not None else 0.0
            if not np.isfinite(slope) or slope == 0:
                slope, inter = 1.0, 0.0
    except VolumeError:
        raise
    except MemoryError:
        raise VolumeError(path, "not enough memory to decode the volume; crop or resample it, or use a machine "
                                "with more memory") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError,
            nib.filebasedimages.ImageFileError) as err:
        raise VolumeError(path, f"corrupt or truncated NIfTI file ({type(err).__name__}: {err})") from None
    if array.ndim == 4:
        array = array[..., 0]
    affine = img.affine
    header = img.header
    if "qform_code" in header and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        if not assume_orientation:
            raise VolumeError(path, "no orientation in the header (qform_code = sform_code = 0), so left/right "
                                    "and up/down are unknown; fix the header (set a qform/sform), or, when you "
                                    "know how it is stored, give it to python -m preprocessing as "
                                    "--assume-orientation RAS|LPS|...")
        try:
            affine = assumed_affine(assume_orientation, header.get_zooms()[:3])
        except ValueError as err:
            raise VolumeError(path, str(err)) from None
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(path, "invalid (singular or non-finite) affine")
    return Volume(array=array, affine=np.asarray(affine, dtype=np.float64), path=str(path),
                  slope=slope, inter=inter)


def is_mha(path) -> bool:
    """A MetaImage file (``.mha``, grand-challenge's format; ``.mhd`` + raw data too)."""
    return Path(path).name.lower().endswith((".mha", ".mhd"))


@contextlib.contextmanager
def _stderr_captured():
    """Collect what C++ code writes to file descriptor 2 meanwhile (yields a list, filled on exit)."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def _itk_reason(message: str, said: list[str]) -> str:
    """One readable reason from an ITK exception and what ITK printed: "Unable to determine ImageIO
    reader", "data not read completely (ideal = 6963 : actual = 3306)"."""
    printed = " ".join(line.split(": ", 1)[-1] if line.startswith("MetaImage:") else line for line in said)
    for line in message.splitlines():
        if "sitk::ERROR:" in line:
            return line.split("sitk::ERROR:", 1)[1].strip().split(' for "', 1)[0]
    return printed or (message.strip().splitlines() or ["unknown error"])[-1]


def load_mha(path: str | os.PathLike) -> Volume:
    """Read a MetaImage (``.mha`` / ``.mhd``) volume with SimpleITK into the stored frame.

    ITK holds the voxels as (z, y, x) and the geometry in LPS: the array is transposed to
    (x, y, z) (NIfTI's voxel order) and the affine built as ``diag(-1, -1, 1) @ [D·diag(spacing) | origin]``.

    Raises:
        VolumeError: missing, unreadable, not 3-D, or a singular direction matrix (names the file).
    """
    import SimpleITK as sitk  # heavy (an ITK build); only needed for .mha inputs

    path = Path(path)
    if not path.is_file():
        raise VolumeError(path, "file not found")
    said: list[str] = []
    try:
        with _stderr_captured() as said:  # ITK's MetaIO writes its reason to stderr, not into the exception
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = tuple(int(v) for v in reader.GetSize())
            if len(size) != 3 or reader.GetNumberOfComponents() != 1:
                raise VolumeError(path, f"expected a 3-D scalar volume, got size {size} with "
                                        f"{reader.GetNumberOfComponents()} component(s)")
            need = int(np.prod(size, dtype=np.int64)) * 8
            if need > decode_budget():
                raise VolumeError(path, f"the header declares {'x'.join(map(str, size))} voxels, more than this "
                                        "machine's memory can decode; crop or resample the volume, or check its header")
            image = reader.Execute()
    except VolumeError:
        raise
    except RuntimeError as err:  # SimpleITK reports every read failure as RuntimeError
        raise VolumeError(path, f"corrupt or unreadable MetaImage file ({_itk_reason(str(err), said)})") from None
    array = np.transpose(sitk.GetArrayViewFromImage(image), (2, 1, 0)).copy()
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(path, "invalid (singular or non-finite) direction/spacing")
    return Volume(array=array, affine=affine, path=str(path))


# Hounsfield units a CT can hold (int16 and uint16 - 1024 storage); a value outside is not HU.
HU_RANGE = (-32768.0, 65535.0)


def check_intensities(volume: Volume) -> None:
    """Refuse NaN/Inf voxels and values outside :data:`HU_RANGE` (naming the file): they would
    break the normalisation, or a 1e9 voxel would size its histogram at gigabytes."""
    data = volume.array
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            bad = np.argwhere(~finite)
            raise VolumeError(volume.path, f"{len(bad)} NaN/Inf voxel(s) (first at voxel {bad[0].tolist()}); "
                                           "fix or drop the volume (python -m preprocessing --on-error skip goes on "
                                           "without it)")
    if data.size == 0:
        return
    lo, hi = sorted(float(v) * volume.slope + volume.inter for v in (data.min(), data.max()))
    if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
        raise VolumeError(volume.path, f"voxel values {lo:g} .. {hi:g} lie outside the CT range "
                                       f"[{HU_RANGE[0]:g}, {HU_RANGE[1]:g}] HU; is this a CT in Hounsfield units? "
                                       "(python -m preprocessing --on-error skip goes on without it)")


def label_array(volume: Volume) -> np.ndarray:
    """Integer label map of a label volume; refuses non-integer values (names the file)."""
    data = volume.array
    if volume.slope != 1.0 or volume.inter != 0.0:
        data = data * volume.slope + volume.inter
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise VolumeError(volume.path, "label map has NaN/Inf values")
    if not np.issubdtype(data.dtype, np.integer):
        # float labels (PANORAMA's are float64): checked and converted a few slices at a time, so
        # no second float copy of the whole volume is made
        out = np.empty(data.shape, dtype=np.int32, order="F" if data.flags.f_contiguous else "C")
        step = 8
        for start in range(0, max(1, data.shape[-1]), step):
            chunk = data[..., start:start + step]
            rounded = np.rint(chunk)
            if not np.array_equal(rounded, chunk):
                raise VolumeError(volume.path, "label map has non-integer values")
            out[..., start:start + step] = rounded
        return out
    return data


# ----------------------------------------------------------------------------- grids


def align_label_to_image(label: np.ndarray, label_affine: np.ndarray, image_shape: tuple,
                         image_affine: np.ndarray, label_path: str, image_path: str,
                         tol_voxel: float = 0.05) -> np.ndarray:
    """Bring a label array onto the image's voxel grid when both describe the same grid.

    Accepts a label stored with another axis order or direction (e.g. an LAS label for an LPS
    DICOM stack) as long as every image voxel centre is a label voxel centre; anything else
    (other spacing, shift, shape) is a geometry mismatch.

    Returns:
        (X, Y, Z) label array indexed like the image.

    Raises:
        VolumeError: naming both files, when the grids differ.
    """
    if tuple(label.shape) == tuple(image_shape) and np.allclose(label_affine, image_affine, atol=1e-3):
        return label  # the common case: same grid, nothing to do
    # T maps image voxel indices to label voxel indices.
    T = np.linalg.solve(label_affine, image_affine)
    R = np.rint(T[:3, :3])
    off = T[:3, 3]
    ok = (np.allclose(T[:3, :3], R, atol=tol_voxel / max(image_shape))
          and np.all(np.abs(R).sum(axis=0) == 1) and np.all(np.abs(R).sum(axis=1) == 1)
          and np.allclose(off, np.rint(off), atol=tol_voxel))
    if ok:
        off = np.rint(off).astype(int)
        perm = [int(np.nonzero(R[:, j])[0][0]) for j in range(3)]  # label axis for image axis j
        signs = [int(R[perm[j], j]) for j in range(3)]
        # label index along axis perm[j] = off[perm[j]] + signs[j] * i_j for i_j in 0..n_j-1
        ok = True
        for j in range(3):
            first = off[perm[j]]
            last = first + signs[j] * (image_shape[j] - 1)
            if min(first, last) != 0 or max(first, last) != label.shape[perm[j]] - 1:
                ok = False
    if not ok:
        raise VolumeError(label_path, f"geometry does not match the image {image_path} "
                                      f"(label shape {tuple(label.shape)}, image shape {tuple(image_shape)}; "
                                      f"label affine {np.round(label_affine, 3).tolist()} vs image affine "
                                      f"{np.round(image_affine, 3).tolist()})")
    out = np.transpose(label, perm)
    flips = tuple(slice(None, None, -1) if s < 0 else slice(None) for s in signs)
    return out[flips]


# ----------------------------------------------------------------------------- DICOM


GEOMETRY_TAGS = (("ImagePositionPatient", "(0020,0032)"), ("ImageOrientationPatient", "(0020,0037)"),
                 ("PixelSpacing", "(0028,0030)"))


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_dicom_headers(folder: str | os.PathLike, files: Optional[list] = None
                       ) -> tuple[list[tuple[Path, pydicom.Dataset]], np.ndarray]:
    """The headers (no pixel data) of one DICOM series, in the order :func:`read_dicom_series`
    stacks its slices, and the series' affine.

    Slices are ordered by ImagePositionPatient projected on the slice normal (never by file
    name or InstanceNumber); the affine is built from ImageOrientationPatient/PixelSpacing/
    positions and converted from DICOM LPS to RAS.

    Returns:
        ``(headers, affine)``: ``headers[k] = (path, dataset)`` is stored slice ``k``;
        affine (4, 4) voxel ``[column, row, slice]`` → RAS+ mm.

    Args:
        folder: the series' folder (read recursively, hidden files skipped).
        files: read exactly these files instead (one series found among others by the caller).

    Raises:
        VolumeError: no DICOM files, several series, inconsistent or oblique orientation,
            missing or duplicated slices.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(folder, "DICOM folder not found")
    headers = _series_headers(folder, files)
    row_cos, col_cos, normal = _series_orientation(folder, headers)
    headers, positions, step = _order_along_normal(folder, headers, normal)
    spacing = [float(v) for v in headers[0][1].PixelSpacing]  # [between rows, between columns]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing[1]
    lps[:3, 1] = col_cos * spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return headers, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS → RAS


def _series_headers(folder: Path, files: Optional[list] = None) -> list[tuple[Path, "pydicom.Dataset"]]:
    """The image headers of the one series in ``folder`` (or of exactly ``files``; unordered); see
    :func:`read_dicom_headers`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers, without_geometry = [], []
    for path in (_dicom_files(folder) if files is None else [Path(f) for f in files]):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue  # not a DICOM file (README, licence, DICOMDIR index...)
        if "Rows" not in ds or "Columns" not in ds:
            continue  # DICOMDIR, reports, presentation states: no image
        missing = [(tag, number) for tag, number in GEOMETRY_TAGS if tag not in ds]
        if missing:
            without_geometry.append((path, ds, missing))
        else:
            headers.append((path, ds))
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    # An image of this series without geometry cannot be placed: name it rather than report a
    # "missing slice" later. Images of another series (a dose report screenshot) are ignored.
    for path, ds, missing in without_geometry:
        if not headers or str(getattr(ds, "SeriesInstanceUID", "")) in series:
            tags = ", ".join(f"{tag} {number}" for tag, number in missing)
            raise VolumeError(path, f"image slice without {tags}: its place in the series is unknown; "
                                    "remove the file from the folder or restore the tag")
    if not headers:
        raise VolumeError(folder, "no DICOM image files found")
    if len(series) > 1:
        raise VolumeError(folder, f"mixed series: {len(series)} SeriesInstanceUIDs in one folder "
                                  f"({', '.join(s[-12:] for s in series[:4])}...); keep one series per folder")
    return headers


def _series_orientation(folder: Path, headers: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row_cos, col_cos, normal)`` in LPS, after checking that every slice shares PixelSpacing and
    ImageOrientationPatient and that the series is axial, not oblique."""
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for _, ds in headers])
    odd = np.nonzero(~np.all(np.isclose(spacings, spacings[0], rtol=1e-4, atol=1e-6), axis=1))[0]
    if odd.size:
        path, ds = headers[int(odd[0])]
        raise VolumeError(path, f"PixelSpacing {spacings[odd[0]].tolist()} differs from the series' "
                                f"{spacings[0].tolist()} (of {headers[0][0].name}); keep one series per folder")
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    if not np.allclose(iops, iops[0], atol=1e-4):
        raise VolumeError(folder, "slices have different ImageOrientationPatient")
    row_cos, col_cos = iops[0][:3], iops[0][3:]
    # Oblique: a direction cosine not aligned with a patient axis.
    for cos in (row_cos, col_cos):
        if np.max(np.abs(cos)) < 0.999:
            raise VolumeError(folder, f"oblique geometry (ImageOrientationPatient {iops[0].tolist()}) "
                                      "is not supported; resample the series to axial first")
    normal = np.cross(row_cos, col_cos)
    if np.argmax(np.abs(normal)) != 2:
        raise VolumeError(folder, "not an axial series (slice normal is not head-feet)")
    return row_cos, col_cos, normal


def _order_along_normal(folder: Path, headers: list, normal: np.ndarray) -> tuple[list, np.ndarray, float]:
    """``(headers, positions, slice step)`` ordered by ImagePositionPatient along ``normal``, after
    checking for duplicated, missing or sheared slices."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    headers = [headers[i] for i in order]
    positions = positions[order]
    if len(headers) == 1:
        return headers, positions, float(getattr(headers[0][1], "SliceThickness", 1.0) or 1.0)
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        i = int(np.nonzero(gaps < 1e-3)[0][0])
        raise VolumeError(folder, f"duplicated slice position: {headers[i][0].name} and {headers[i + 1][0].name} "
                                  f"both at {along[i]:.2f} mm along the slice normal; remove one of them")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        worst = int(np.argmax(np.abs(gaps - step)))
        raise VolumeError(folder, f"missing slice or uneven spacing: gap of {gaps[worst]:.2f} mm after "
                                  f"{headers[worst][0].name} where the series spacing is {step:.2f} mm")
    in_plane = positions - np.outer(along, normal)
    if not np.allclose(in_plane, in_plane[0], atol=0.01 * step + 1e-3):
        raise VolumeError(folder, "slice positions do not lie on a straight line along the normal (sheared series)")
    return headers, positions, step


def read_dicom_series(folder: str | os.PathLike, dtype=np.float32, headers: Optional[tuple] = None) -> Volume:
    """Read one DICOM series (nested folders allowed) into a stored-frame HU volume.

    Slices are ordered and the affine built by :func:`read_dicom_headers` (or given as
    ``headers``, what it returned for this folder, so a caller that needs them reads them once);
    RescaleSlope/Intercept are applied per slice. The array is indexed ``[column, row, slice]``
    like a NIfTI volume converted by dcm2niix without reorientation.

    Raises:
        VolumeError: no DICOM files, several series, inconsistent or oblique orientation,
            missing or duplicated slices, unequal slice sizes, unreadable pixel data.
    """
    import pydicom

    headers, affine = read_dicom_headers(folder) if headers is None else headers
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    data = np.empty((cols, rows, len(headers)), dtype=dtype)
    for k, (path, _) in enumerate(headers):
        try:
            ds = pydicom.dcmread(str(path))
            pixels = ds.pixel_array
        except Exception as err:  # decoder errors come in many types
            raise VolumeError(path, f"cannot decode pixel data ({type(err).__name__}: {err})") from None
        if pixels.shape != (rows, cols):
            raise VolumeError(path, f"slice size {pixels.shape} differs from the series' {(rows, cols)}")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        data[:, :, k] = (pixels.astype(np.float32) * slope + inter).T
    return Volume(array=data, affine=affine, path=str(folder))


def is_nifti(path: Path) -> bool:
    return _is_nifti(Path(path))
