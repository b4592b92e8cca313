"""Model-facing logic of the clinician's demo, independent of the web UI (paper §3.9).

Everything the Gradio app (:mod:`minigpt4.demo.app`) does with files and the model goes through
this module, so it can be tested without a browser or a server:

* :func:`load_slice` / :func:`load_volume` read an upload and refuse what the demo cannot use
  (wrong type, too large, unreadable, a colour picture instead of a CT slice, an empty volume)
  with an :class:`InputError` whose message is meant for the user.
* :class:`DemoService` asks the model about one slice (:meth:`DemoService.ask`,
  :meth:`DemoService.classify`) and scans a whole volume slice by slice
  (:meth:`DemoService.scan_volume`).
* :func:`annotate` draws boxes on a slice; box text is parsed and converted with
  :mod:`minigpt4.boxes` only.

Generation is greedy (the model's ``generate``): detection answers must be reproducible, and the
release's sampling settings only ever served free-text chat.

Limits: every question is answered on its own about the displayed slice (the model was
fine-tuned on single-turn prompts, so earlier turns are not fed back), and the tumor classifier
was trained on crops to the pancreas box, so ``classify`` on a whole slice is outside its
training distribution (the volume scan crops to the detected pancreas first).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from minigpt4.boxes import EMPTY_BOX, box_problem, grid_to_pixel, grid_to_pixel_inclusive, parse_box, parse_yes_no
from minigpt4.config import DecodingConfig
from minigpt4.prompts import TARGET_NAMES, classification_question, detection_instruction

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".zip")
NORMALISATIONS = ("paper", "window")
RED = (255, 0, 0)
CYAN = (0, 200, 255)

# quick-button tasks: key → (button label, instruction); one prompt builder for all of them
QUICK_TASKS: dict[str, tuple[str, str]] = {
    "pancreas": ("Locate the pancreas", detection_instruction(TARGET_NAMES["pancreas"])),
    "tumor_yes_no": ("Is there a tumor?", classification_question()),
    "tumor": ("Locate the tumor", detection_instruction(TARGET_NAMES["tumor"])),
    "liver": ("Locate the liver", detection_instruction(TARGET_NAMES["liver"])),
    "kidney": ("Locate the kidney", detection_instruction(TARGET_NAMES["kidney"])),
    "spleen": ("Locate the spleen", detection_instruction(TARGET_NAMES["spleen"])),
}


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
        raise InputError(f"{name}: {n_slices} slices, over the demo's limit of {limits.max_slices}.")
    if min(height, width) < limits.min_side or max(height, width) > limits.max_side:
        raise InputError(
            f"{name}: slices of {width}×{height} pixels are outside the accepted size "
            f"({limits.min_side}–{limits.max_side} pixels per side)."
        )
    need = decode_bytes(voxels, itemsize)
    if need > limits.max_decode_bytes:
        raise InputError(
            f"{name}: {n_slices} slices of {width}×{height} pixels need about {_size_text(need)} of memory "
            f"to decode, over the demo's budget of {_size_text(limits.max_decode_bytes)}."
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


def check_dicom_headers(folder: Path, name: str, limits: Limits) -> None:
    """Refuse a DICOM series that declares more than the demo accepts, before decoding pixels.

    Reads every file's header only (``stop_before_pixels``): image count (× NumberOfFrames),
    Rows × Columns. Files that are not DICOM images are left to the reader.

    Raises:
        InputError: too many slices, slices too small or large, too much decoding memory.
    """
    import pydicom

    n_slices, voxels, sizes = 0, 0, set()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
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


def public_message(message: str, upload: Path, private: Sequence[Path] = (), members: Optional[dict] = None) -> str:
    """``message`` without the server's private paths: the upload's temp path becomes its file
    name, an extracted DICOM file ``<dir>/000003.dcm`` becomes ``<zip>:<member name>``, and any
    other private folder is dropped."""
    for generated, member in (members or {}).items():
        for folder in private:
            message = message.replace(str(Path(folder) / generated), f"{upload.name}:{member}")
    message = message.replace(str(upload), upload.name)
    folders = {str(Path(f)) for f in (*private, upload.parent) if Path(f).is_absolute() and len(Path(f).parts) > 1}
    for folder in sorted(folders, key=len, reverse=True):  # a folder before its parents
        message = message.replace(folder + os.sep, "").replace(folder, "(upload folder)")
    return message


# ----------------------------------------------------------------------------------------------
# uploads


def _display_name(path: Path) -> str:
    # Gradio stores uploads under random folders; the base name is what the user recognises
    return path.name


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


def _check_file(path: Path, max_bytes: int) -> None:
    if not path.is_file():
        raise InputError(f"{_display_name(path)}: file not found (the upload may have expired; upload it again).")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{_display_name(path)}: the file is empty.")
    if size > max_bytes:
        raise InputError(
            f"{_display_name(path)}: {size / 1024**2:.1f} MB is over the demo's limit of {max_bytes / 1024**2:.0f} MB."
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

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])


def _safe_extract_dicom_zip(path: Path, dest: Path, limits: Limits, members_by_file: Optional[dict] = None) -> Path:
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
        for number, member in enumerate(members):
            if Path(member.filename).name.startswith("."):
                continue  # macOS resource forks (__MACOSX/._x) and hidden files
            target = dest / f"{number:06d}.dcm"
            if members_by_file is not None:
                members_by_file[target.name] = member.filename
            try:
                with archive.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, length=1024**2)
            except (zipfile.BadZipFile, OSError, RuntimeError) as err:
                raise InputError(f"{path.name}: cannot extract {member.filename!r} ({err}).") from None
    return dest


def load_volume(
    path: str | os.PathLike,
    normalisation: str = "paper",
    limits: Limits = Limits(),
    workdir: Optional[str | os.PathLike] = None,
) -> Volume:
    """Read an uploaded CT volume (NIfTI, or a zip of one DICOM series) for display and scanning.

    Orientation and normalisation come from :mod:`preprocessing` (the same functions that wrote
    the training PNGs): slices are reoriented from the affine to radiological display (anterior
    up, patient's right on the image left) and normalised per slice as in training (``paper``:
    2–98 % clip + histogram equalisation; ``window``: HU window [-150, 250]).

    Args:
        path: ``.nii``, ``.nii.gz`` or ``.zip``.
        normalisation: ``paper`` or ``window``.
        workdir: private folder for the extracted DICOM files (a fresh temp folder when None).

    Raises:
        InputError: wrong type, too large, unreadable, empty, not 3-D, too many slices.
    """
    path = Path(path)
    if normalisation not in NORMALISATIONS:
        raise InputError(f"unknown normalisation {normalisation!r}; choose one of {', '.join(NORMALISATIONS)}.")
    if upload_kind(path) != "volume":
        raise InputError(f"{path.name}: this is a slice image, not a volume.")
    _check_file(path, limits.max_volume_bytes)
    from minigpt4.demo import volumes as volume_io  # the preprocessing package is imported lazily there

    # headers are checked against the limits before any voxel is decoded, and no message may
    # show the server's private temp paths (Gradio's upload folder, the extraction folder)
    private: list[Path] = [Path(workdir)] if workdir is not None else []
    members: dict[str, str] = {}
    try:
        if path.name.lower().endswith(".zip"):
            extract_dir = Path(tempfile.mkdtemp(prefix="dicom_", dir=workdir))
            private.insert(0, extract_dir)
            try:
                _safe_extract_dicom_zip(path, extract_dir, limits, members)
                check_dicom_headers(extract_dir, path.name, limits)
                hu, spacing = volume_io.read_display_volume(extract_dir, path.name)
            finally:
                shutil.rmtree(extract_dir, ignore_errors=True)
        else:
            check_nifti_header(path, path.name, limits)
            hu, spacing = volume_io.read_display_volume(path, path.name)
    except InputError as err:
        raise InputError(public_message(str(err), path, private, members)) from None
    except MemoryError:
        raise InputError(f"{path.name}: not enough memory to decode this volume.") from None
    except Exception as err:  # noqa: BLE001 - a reader failure is a message, without private paths
        raise InputError(public_message(f"{path.name}: cannot read the volume ({type(err).__name__}: {err}).",
                                        path, private, members)) from None
    if hu.ndim != 3:
        raise InputError(f"{path.name}: expected a 3-D CT volume, got shape {tuple(hu.shape)}.")
    if hu.shape[0] == 0 or hu.size == 0:
        raise InputError(f"{path.name}: the volume has no slices.")
    if hu.shape[0] > limits.max_slices:
        raise InputError(f"{path.name}: {hu.shape[0]} slices, over the demo's limit of {limits.max_slices}.")
    if not np.isfinite(hu).all() or float(hu.max()) - float(hu.min()) <= 0:
        raise InputError(f"{path.name}: the volume is empty (constant or non-finite values).")
    height, width = hu.shape[1:]
    if min(height, width) < limits.min_side or max(height, width) > limits.max_side:
        raise InputError(
            f"{path.name}: slices of {width}×{height} pixels are outside the accepted size "
            f"({limits.min_side}–{limits.max_side} pixels per side)."
        )
    slices = volume_io.normalise_volume(hu, normalisation)
    return Volume(name=path.name, slices=slices, normalisation=normalisation, spacing=spacing)


# ----------------------------------------------------------------------------------------------
# drawing


def annotate(
    image: np.ndarray,
    boxes: Sequence[tuple[Sequence[float], tuple[int, int, int]]] = (),
    scale: int = 1,
) -> Image.Image:
    """Draw pixel boxes on a slice.

    Args:
        image: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB.
        boxes: ``(pixel_box, rgb_colour)`` pairs; a pixel box is ``(x1, y1, x2, y2)`` in pixels
            of ``image`` (continuous, as :func:`minigpt4.boxes.grid_to_pixel` returns it).
        scale: integer zoom (nearest neighbour) applied before drawing, so small slices are shown
            larger with thin lines; boxes are scaled with the image.

    Returns:
        An RGB PIL image of size (W·scale, H·scale) with each box outlined; the line is about
        0.5 % of the image side (at least 2 pixels) and is drawn inside the box's extent.
    """
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if scale != 1:
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(picture.size) / 200))
    for box, colour in boxes:
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        if x2 <= x1 or y2 <= y1:
            continue
        draw.rectangle([x1, y1, x2, y2], outline=tuple(colour), width=line)
    return picture


def display_scale(height: int, width: int, min_side: int = 384) -> int:
    """Integer zoom that shows a slice at least ``min_side`` pixels wide/high in the viewer."""
    return max(1, math.ceil(min_side / max(height, width)))


# ----------------------------------------------------------------------------------------------
# answers


@dataclass
class Answer:
    """One model answer about one slice."""

    instruction: str
    text: str
    """The model's raw answer."""
    task: str
    """``detection`` ([refer]), ``question`` ([vqa]) or ``free`` (anything else)."""
    grid_box: Optional[tuple[int, int, int, int]] = None
    pixel_box: Optional[tuple[float, float, float, float]] = None
    p_yes: Optional[float] = None
    message: str = ""
    """Markdown for the chat."""
    stage: Optional[str] = None
    """The cascade stage that answered (three-stage mode), e.g. ``tumor_classification``."""


STAGE_LABELS = {
    "pancreas_detection": "stage 1 (pancreas detection)",
    "tumor_classification": "stage 2 (tumor classification)",
    "tumor_detection": "stage 3 (tumor detection)",
}


def stage_for(instruction: str) -> str:
    """The cascade stage that answers an instruction in three-stage mode: ``[vqa]`` → stage 2,
    ``[refer]`` about a tumor → stage 3, anything else (pancreas, organs, free text) → stage 1."""
    task = instruction_task(instruction)
    if task == "question":
        return "tumor_classification"
    if task == "detection" and "tumor" in instruction.lower():
        return "tumor_detection"
    return "pancreas_detection"


def instruction_task(instruction: str) -> str:
    text = instruction.strip().lower()
    if text.startswith("[refer]"):
        return "detection"
    if text.startswith("[vqa]"):
        return "question"
    return "free"


def describe_answer(answer: Answer, width: int, height: int) -> str:
    """The chat text of an answer: the box in pixels for detection, the verdict and P(yes) for
    yes/no questions, and the model's raw answer in every case."""
    raw = answer.text.strip() or "(empty answer)"
    raw_md = "`" + raw.replace("`", "'") + "`"
    if answer.task == "detection":
        if answer.grid_box is not None and tuple(answer.grid_box) == EMPTY_BOX:
            return f"The model reports the target absent from this slice (empty box). Model answer: {raw_md}"
        problem = box_problem(answer.text)  # the scoring rule's verdict (the release's)
        if problem is not None:
            return f"Not a valid box answer: {problem}; evaluation scores it IoU 0. Model answer: {raw_md}"
        x1, y1, x2, y2 = (round(v) for v in answer.pixel_box)
        return (
            f"**Box** (pixels, x1 y1 x2 y2 on the {width}×{height} image): **[{x1}, {y1}, {x2}, {y2}]**, "
            f"drawn in red. Model answer: {raw_md}"
        )
    if answer.task == "question" and answer.p_yes is not None:
        verdict = parse_yes_no(answer.text)
        head = f"**{verdict}**" if verdict else "Unclear answer (neither yes nor no)"
        return f"{head} — model probability P(yes) = {answer.p_yes:.3f}. Model answer: {raw_md}"
    return raw


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@dataclass
class ScanRow:
    slice_index: int
    p_tumor: Optional[float]
    """None: no pancreas box in three-stage mode, so nothing to classify."""
    classified_on: str
    """``pancreas crop`` (as the classifier was trained) or ``whole slice`` (no pancreas box found)."""
    pancreas_box: Optional[tuple[float, float, float, float]]
    tumor_box: Optional[tuple[float, float, float, float]]
    pancreas_answer: str
    tumor_answer: str

    def as_dict(self) -> dict:
        def rounded(box):
            return None if box is None else [round(v, 1) for v in box]

        return {
            "slice": self.slice_index,
            "p_tumor": None if self.p_tumor is None else round(self.p_tumor, 4),
            "classified_on": self.classified_on,
            "pancreas_box": rounded(self.pancreas_box),
            "tumor_box": rounded(self.tumor_box),
            "pancreas_answer": self.pancreas_answer,
            "tumor_answer": self.tumor_answer,
        }


@dataclass
class ScanResult:
    rows: list[ScanRow]
    patient: Optional[dict] = None
    """Three-stage mode: the volume's answer ``{aggregation, top_k, score, threshold, tumor}``."""

    @property
    def most_suspicious(self) -> int:
        """Slice index with the highest P(tumor) (the first one on ties)."""
        best = max(self.rows, key=lambda r: (-1.0 if r.p_tumor is None else r.p_tumor, -r.slice_index))
        return best.slice_index

    def patient_text(self) -> str:
        """The patient-level answer in words (three-stage mode), '' otherwise."""
        if self.patient is None:
            return ""
        p = self.patient
        how = "largest slice P(tumor)" if p["aggregation"] == "max" else f"mean of the {p['top_k']} largest slice P(tumor)"
        verdict = "tumor suspected" if p["tumor"] else "no tumor found"
        return (f"Patient-level answer: **{verdict}** ({how} = {p['score']:.3f}, threshold {p['threshold']:.3f}, "
                f"aggregation `{p['aggregation']}`).")

    def boxes_for(self, slice_index: int) -> list[tuple[tuple[float, ...], tuple[int, int, int]]]:
        row = self.rows[slice_index]
        boxes = []
        if row.pancreas_box is not None:
            boxes.append((row.pancreas_box, CYAN))
        if row.tumor_box is not None:
            boxes.append((row.tumor_box, RED))
        return boxes


def _non_empty_pixel_box(answer: str, width: int, height: int) -> Optional[tuple[float, float, float, float]]:
    grid = parse_box(answer)
    if grid is None or tuple(grid) == EMPTY_BOX:
        return None
    box = grid_to_pixel(grid, width, height)
    return box if box[2] > box[0] and box[3] > box[1] else None


def pancreas_crop(image: np.ndarray, answer: str, margin: int = 0) -> Optional[np.ndarray]:
    """The crop the tumor classifier trained on, cut where a pancreas answer points.

    As ``python -m preprocessing tc`` cuts (and the cascade, :func:`minigpt4.evaluation.cascade.cut_crop`):
    the answer's grid box as inclusive pixels, plus ``margin``, clipped. None when the answer holds
    no box with an area.
    """
    from minigpt4.evaluation.cascade import cut_crop

    height, width = image.shape[:2]
    if _non_empty_pixel_box(answer, width, height) is None:
        return None
    return cut_crop(image, grid_to_pixel_inclusive(parse_box(answer), width, height), margin)[0]


class DemoService:
    """The served model plus everything the demo asks of it. Thread-safe (one call at a time).

    Args:
        model: an object with ``generate(images, instructions, max_new_tokens=None) -> list[str]``,
            ``yes_probability(images, questions) -> Tensor (B,)`` and ``image_transform``
            (:class:`minigpt4.models.minigpt_v2.MiniGPTPancreas` or a test double).
        max_new_tokens: for detection and yes/no answers (the evaluation setting, 20).
        text_max_new_tokens: for free-text instructions (when ``text_decoding`` is None).
        text_decoding: decoding of free-text instructions (``model.generation.free_text``, e.g.
            sampling like the release's demo); None = greedy. Detection stays greedy.
        warning: shown in the app (e.g. "random weights").
        description: one line about what is served (checkpoint, sizes).
        stages: three-stage mode: a :class:`minigpt4.models.stages.StageModels` serving the
            cascade's stages on one base (``model`` is its model); each instruction goes to its
            stage (:func:`stage_for`) and "Scan volume" runs the cascade of
            :func:`minigpt4.evaluation.cascade.run_cascade`.
        cascade: ``crop_margin`` of the volume scan's pancreas crops (both modes; the TC folder's
            ``--margin``) and, in three-stage mode, ``threshold``, ``aggregation`` (max |
            top_k_mean), ``top_k``.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_new_tokens: int = 20,
        text_max_new_tokens: int = 64,
        text_decoding: Optional[DecodingConfig] = None,
        limits: Limits = Limits(),
        warning: Optional[str] = None,
        description: str = "",
        scan_batch_size: int = 4,
        stages: Any = None,
        cascade: Optional[dict] = None,
    ) -> None:
        self.model = model
        self.stages = stages
        self.cascade = {"threshold": 0.5, "aggregation": "max", "top_k": 3, "crop_margin": 0, **(cascade or {})}
        self.max_new_tokens = max_new_tokens
        self.text_max_new_tokens = text_max_new_tokens
        self.text_decoding = text_decoding
        self.limits = limits
        self.warning = warning
        self.description = description
        self.scan_batch_size = scan_batch_size
        self._lock = threading.Lock()

    # -- low level ---------------------------------------------------------------------------

    def _images(self, slices: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self.model.image_transform(Image.fromarray(s)) for s in slices])
        return batch.to(_model_device(self.model))

    def _model_for(self, stage: Optional[str]) -> Any:
        # call with the lock held: switching stages changes the shared model
        return self.model if self.stages is None or stage is None else self.stages.use(stage)

    def _generate(
        self,
        slices: Sequence[np.ndarray],
        instructions: Sequence[str],
        max_new_tokens: Optional[int],
        decoding: Optional[DecodingConfig] = None,
        stage: Optional[str] = None,
    ) -> list[str]:
        extra = {} if decoding is None else {"decoding": decoding}
        with self._lock, torch.no_grad():
            model = self._model_for(stage)
            answers = model.generate(self._images(slices), list(instructions), max_new_tokens=max_new_tokens, **extra)
        return [str(a) for a in answers]

    def _p_yes(self, slices: Sequence[np.ndarray], questions: Sequence[str], stage: Optional[str] = None) -> list[float]:
        with self._lock, torch.no_grad():
            probs = self._model_for(stage).yes_probability(self._images(slices), list(questions))
        return [float(p) for p in torch.as_tensor(probs).float().cpu().reshape(-1)]

    def check_instruction(self, instruction: Optional[str]) -> str:
        text = (instruction or "").strip()
        if not text:
            raise InputError("Type a question, or use one of the task buttons.")
        if len(text) > self.limits.max_instruction_chars:
            raise InputError(
                f"The question has {len(text)} characters; the limit is {self.limits.max_instruction_chars}."
            )
        return text

    # -- one slice -----------------------------------------------------------------------------

    def ask(self, image: np.ndarray, instruction: str) -> Answer:
        """Answer one instruction about one slice (H, W) uint8.

        ``[refer]`` instructions are detection: the answer's box is parsed and converted to pixels
        of this slice. ``[vqa]`` questions also get P(yes) at the first answer token.
        """
        instruction = self.check_instruction(instruction)
        task = instruction_task(instruction)
        height, width = image.shape[:2]
        stage = stage_for(instruction) if self.stages is not None else None
        if task == "free" and self.text_decoding is not None:
            text = self._generate([image], [instruction], None, self.text_decoding, stage=stage)[0]
        else:
            budget = self.text_max_new_tokens if task == "free" else self.max_new_tokens
            text = self._generate([image], [instruction], budget, stage=stage)[0]
        answer = Answer(instruction=instruction, text=text, task=task, stage=stage)
        if task == "detection":
            answer.grid_box = parse_box(text)
            if answer.grid_box is not None:
                answer.pixel_box = grid_to_pixel(answer.grid_box, width, height)
        elif task == "question":
            answer.p_yes = self._p_yes([image], [instruction], stage)[0]
        answer.message = describe_answer(answer, width, height)
        if stage is not None:
            answer.message += f"\n\n*Answered by {STAGE_LABELS[stage]}.*"
        return answer

    def classify(self, image: np.ndarray) -> Answer:
        """The paper's tumor question (the first classification question) with P(yes)."""
        return self.ask(image, classification_question())

    @staticmethod
    def answer_boxes(answer: Optional[Answer]) -> list[tuple[tuple[float, ...], tuple[int, int, int]]]:
        """The box to draw for an answer: ``[(pixel_box, RED)]``, or ``[]`` for no or an empty box."""
        if answer is None or answer.pixel_box is None or tuple(answer.grid_box) == EMPTY_BOX:
            return []
        return [(answer.pixel_box, RED)]

    def annotated(self, image: np.ndarray, answer: Optional[Answer]) -> Image.Image:
        """The slice with the answer's box in red (an RGB copy even without a box)."""
        return annotate(image, self.answer_boxes(answer))

    # -- whole volume --------------------------------------------------------------------------

    def scan_volume(
        self,
        slices: np.ndarray,
        progress: Optional[Callable[[float, str], None]] = None,
    ) -> ScanResult:
        """Pancreas detection, tumor classification and tumor detection on every slice.

        Per slice: ``[refer]`` pancreas → crop to that box → the tumor question's P(yes) on the
        crop (the classifier's training input; the whole slice when no pancreas box is found) →
        ``[refer]`` pancreatic tumor on the whole slice.

        Args:
            slices: (Z, H, W) uint8 normalised slices.
            progress: called as ``progress(fraction_done, description)``.
        """
        if slices.ndim != 3 or slices.shape[0] == 0:
            raise InputError("the volume has no slices to scan.")
        if self.stages is not None:
            return self._scan_cascade(slices, progress)
        count, height, width = slices.shape
        pancreas_q = detection_instruction(TARGET_NAMES["pancreas"])
        tumor_q = detection_instruction(TARGET_NAMES["tumor"])
        yes_q = classification_question()
        rows: list[ScanRow] = []
        for start in range(0, count, self.scan_batch_size):
            if progress is not None:
                progress(start / count, f"scanning slices {start + 1}–{min(count, start + self.scan_batch_size)} of {count}")
            batch = [slices[i] for i in range(start, min(count, start + self.scan_batch_size))]
            pancreas_answers = self._generate(batch, [pancreas_q] * len(batch), self.max_new_tokens)
            tumor_answers = self._generate(batch, [tumor_q] * len(batch), self.max_new_tokens)
            pancreas_boxes = [_non_empty_pixel_box(a, width, height) for a in pancreas_answers]
            cut = [pancreas_crop(s, a, self.cascade["crop_margin"]) for s, a in zip(batch, pancreas_answers)]
            crops = [s if c is None else c for s, c in zip(batch, cut)]
            p_tumor = self._p_yes(crops, [yes_q] * len(batch))
            for offset, image in enumerate(batch):
                rows.append(
                    ScanRow(
                        slice_index=start + offset,
                        p_tumor=p_tumor[offset],
                        classified_on="whole slice" if pancreas_boxes[offset] is None else "pancreas crop",
                        pancreas_box=pancreas_boxes[offset],
                        tumor_box=_non_empty_pixel_box(tumor_answers[offset], width, height),
                        pancreas_answer=pancreas_answers[offset],
                        tumor_answer=tumor_answers[offset],
                    )
                )
        if progress is not None:
            progress(1.0, "scan finished")
        return ScanResult(rows)

    def _scan_cascade(self, slices: np.ndarray, progress: Optional[Callable[[float, str], None]]) -> ScanResult:
        """Three-stage mode: the cascade of ``eval_cascade.py`` on every slice, then the patient answer.

        Stage 1 pancreas box → crop from the predicted box (as ``preprocessing tc`` cuts) → stage 2
        P(tumor) → stage 3 tumor box where P(tumor) >= threshold; the slices' P(tumor) aggregated.
        """
        from minigpt4.evaluation.cascade import aggregate, run_cascade

        count = slices.shape[0]
        settings = self.cascade
        step = max(1, self.scan_batch_size * 4)
        results: list[dict] = []
        for start in range(0, count, step):
            if progress is not None:
                progress(start / count, f"cascade on slices {start + 1}–{min(count, start + step)} of {count}")
            with self._lock:
                results += run_cascade(self.stages, [slices[i] for i in range(start, min(count, start + step))],
                                       settings["threshold"], settings["crop_margin"], self.scan_batch_size)
        rows = []
        for index, r in enumerate(results):
            asked = r["tumor_asked"]
            rows.append(ScanRow(
                slice_index=index,
                p_tumor=r["p_tumor"],
                classified_on="pancreas crop (predicted box)" if r["p_tumor"] is not None else "no pancreas box",
                pancreas_box=None if r["pancreas_box"] is None else tuple(r["pancreas_box"]),
                tumor_box=None if r["tumor_box"] is None else tuple(r["tumor_box"]),
                pancreas_answer=r["pancreas_answer"],
                tumor_answer=r["tumor_answer"] if asked else "(not asked: P(tumor) below the threshold)",
            ))
        score = aggregate([r.p_tumor for r in rows], settings["aggregation"], settings["top_k"])
        patient = {"aggregation": settings["aggregation"], "top_k": settings["top_k"], "score": score,
                   "threshold": settings["threshold"], "tumor": score >= settings["threshold"]}
        if progress is not None:
            progress(1.0, "scan finished")
        return ScanResult(rows, patient)


def make_private_workdir(prefix: str = "minigpt_pancreas_demo_") -> Path:
    """A fresh temp folder readable only by this user (``mkdtemp`` uses mode 0700 and a random
    name), for uploads, Gradio's cache and extracted DICOM files."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def _is_random_init(model_cfg: Any) -> bool:
    """True when no pretrained LLM/EVA weights are configured (tiny CPU models)."""
    return model_cfg.text.path is None and model_cfg.vision.weights is None


def _load_stage_service(cfg: Any, stage_paths: dict, device: Optional[str], limits: Limits) -> Optional[DemoService]:
    """Three-stage mode (``cascade.stages``, no ``model.ckpt``); None when a tiny random-init
    model lacks a stage checkpoint (the caller then serves random weights with a warning)."""
    from minigpt4.config import CASCADE_STAGES
    from minigpt4.models.stages import load_stages
    from minigpt4.utils import resolve_device

    missing = [s for s in CASCADE_STAGES if s not in stage_paths]
    if missing:
        raise ValueError(f"cascade.stages.{missing[0]} is not set: the three-stage demo needs all three stages "
                         "(or set model.ckpt to serve one checkpoint for every task)")
    absent = {s: p for s, p in stage_paths.items() if not Path(p).exists()}
    if absent:
        if _is_random_init(cfg.model):
            return None
        stage, path = next(iter(absent.items()))
        raise FileNotFoundError(f"cascade.stages.{stage} {path} not found (cwd {Path.cwd()}); train the cascade first")
    resolved = resolve_device(device or cfg.run.device)
    stages = load_stages(cfg.model, stage_paths, device=resolved)
    casc = cfg.cascade
    threshold = 0.5 if casc.threshold is None else casc.threshold
    aggregation = "max" if casc.aggregation == "auto" else casc.aggregation
    listed = "; ".join(f"{STAGE_LABELS[s]} `{p}`" for s, p in stage_paths.items())
    description = (f"three stages on one base — {listed} (image {cfg.model.vision.image_size}px, LLaMA "
                   f"{cfg.model.text.num_layers}×{cfg.model.text.hidden_size}) on {resolved}; greedy decoding; "
                   f"volume scan: threshold {threshold:g}{' (cascade.threshold unset: 0.5)' if casc.threshold is None else ''}, "
                   f"aggregation {aggregation}.")
    return DemoService(
        stages.model, max_new_tokens=cfg.model.generation.max_new_tokens, text_decoding=cfg.model.generation.free_text,
        limits=limits, description=description, stages=stages,
        cascade={"threshold": threshold, "aggregation": aggregation, "top_k": casc.top_k, "crop_margin": casc.crop_margin},
    )


def load_service(cfg: Any, device: Optional[str] = None, limits: Limits = Limits()) -> DemoService:
    """Build the configured model and wrap it for the demo.

    ``model.ckpt`` is the checkpoint served (any stage, or the quickstart's) for every task.
    Without it, ``cascade.stages`` serves the three stages on one base (three-stage mode: each
    task routed to its stage, the volume scan runs the cascade). When a checkpoint is missing:
    a random-init (tiny) model starts anyway with random weights and a visible warning; a
    full-size model raises, because serving the untuned base model silently is the release's
    defect. With no ``model.ckpt`` at all the app shows a warning that the base weights are served.

    Args:
        cfg: :class:`minigpt4.config.Config`.
        device: overrides ``run.device``.

    Raises:
        FileNotFoundError: the checkpoint (full-size model) or a configured weight file is missing.
    """
    from minigpt4.models.minigpt_v2 import build_model
    from minigpt4.utils import resolve_device

    model_cfg = cfg.model
    stage_paths = cfg.cascade.stages.configured() if hasattr(cfg, "cascade") else {}
    if stage_paths and model_cfg.ckpt is None:
        service = _load_stage_service(cfg, stage_paths, device, limits)
        if service is not None:
            return service
        model_cfg.ckpt = stage_paths.get("tumor_detection") or next(iter(stage_paths.values()))
    warning = None
    ckpt = model_cfg.ckpt
    if ckpt is not None and not Path(ckpt).exists():
        if not _is_random_init(model_cfg):
            raise FileNotFoundError(
                f"model.ckpt {ckpt} not found (cwd {Path.cwd()}); train the cascade first or pass "
                "--options model.ckpt=<checkpoint folder, .safetensors or .pth>"
            )
        warning = (
            f"checkpoint <code>{ckpt}</code> not found: serving a tiny model with <b>random weights</b>; "
            "its answers are meaningless. Run <code>./quickstart.sh</code> or pass "
            "<code>--options model.ckpt=PATH</code>."
        )
        model_cfg.ckpt = None
    elif ckpt is None:
        warning = "no fine-tuned checkpoint configured (model.ckpt): serving the base weights."
    resolved = resolve_device(device or cfg.run.device)
    model = build_model(model_cfg, device=resolved)
    model.eval()
    sizes = f"image {model_cfg.vision.image_size}px, LLaMA {model_cfg.text.num_layers}×{model_cfg.text.hidden_size}"
    served = ckpt if model_cfg.ckpt is not None else "random / base weights"
    free_text = model_cfg.generation.free_text
    decoding = "greedy decoding" if free_text is None else f"greedy boxes and yes/no, free text: {free_text.strategy}"
    description = f"checkpoint `{served}` ({sizes}) on {resolved}; {decoding}."
    return DemoService(
        model,
        max_new_tokens=model_cfg.generation.max_new_tokens,
        text_decoding=free_text,
        limits=limits,
        warning=warning,
        description=description,
        cascade={"crop_margin": cfg.cascade.crop_margin} if hasattr(cfg, "cascade") else None,
    )
