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

from minigpt4.boxes import EMPTY_BOX, box_problem, grid_to_pixel, parse_box, parse_yes_no
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


def _safe_extract_dicom_zip(path: Path, dest: Path, limits: Limits) -> Path:
    """Extract a zip's files into ``dest`` under generated names (member names never become paths,
    so ``../`` tricks cannot escape), after checking member count and total size."""
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

    if path.name.lower().endswith(".zip"):
        extract_dir = Path(tempfile.mkdtemp(prefix="dicom_", dir=workdir))
        try:
            _safe_extract_dicom_zip(path, extract_dir, limits)
            hu, spacing = volume_io.read_display_volume(extract_dir, path.name)
        finally:
            shutil.rmtree(extract_dir, ignore_errors=True)
    else:
        hu, spacing = volume_io.read_display_volume(path, path.name)
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
    p_tumor: float
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
            "p_tumor": round(self.p_tumor, 4),
            "classified_on": self.classified_on,
            "pancreas_box": rounded(self.pancreas_box),
            "tumor_box": rounded(self.tumor_box),
            "pancreas_answer": self.pancreas_answer,
            "tumor_answer": self.tumor_answer,
        }


@dataclass
class ScanResult:
    rows: list[ScanRow]

    @property
    def most_suspicious(self) -> int:
        """Slice index with the highest P(tumor) (the first one on ties)."""
        best = max(self.rows, key=lambda r: (r.p_tumor, -r.slice_index))
        return best.slice_index

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


def crop_to_box(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Crop (H, W) to the pixels a continuous box covers: rows floor(y1)..ceil(y2), same for x,
    at least 2 pixels per side."""
    height, width = image.shape[:2]
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, max(x1 + 2, math.ceil(box[2]))), min(height, max(y1 + 2, math.ceil(box[3])))
    return image[y1:y2, x1:x2]


class DemoService:
    """The served model plus everything the demo asks of it. Thread-safe (one call at a time).

    Args:
        model: an object with ``generate(images, instructions, max_new_tokens=None) -> list[str]``,
            ``yes_probability(images, questions) -> Tensor (B,)`` and ``image_transform``
            (:class:`minigpt4.models.minigpt_v2.MiniGPTPancreas` or a test double).
        max_new_tokens: for detection and yes/no answers (the evaluation setting, 20).
        text_max_new_tokens: for free-text instructions.
        warning: shown in the app (e.g. "random weights").
        description: one line about what is served (checkpoint, sizes).
    """

    def __init__(
        self,
        model: Any,
        *,
        max_new_tokens: int = 20,
        text_max_new_tokens: int = 64,
        limits: Limits = Limits(),
        warning: Optional[str] = None,
        description: str = "",
        scan_batch_size: int = 4,
    ) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.text_max_new_tokens = text_max_new_tokens
        self.limits = limits
        self.warning = warning
        self.description = description
        self.scan_batch_size = scan_batch_size
        self._lock = threading.Lock()

    # -- low level ---------------------------------------------------------------------------

    def _images(self, slices: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self.model.image_transform(Image.fromarray(s)) for s in slices])
        return batch.to(_model_device(self.model))

    def _generate(self, slices: Sequence[np.ndarray], instructions: Sequence[str], max_new_tokens: int) -> list[str]:
        with self._lock, torch.no_grad():
            answers = self.model.generate(self._images(slices), list(instructions), max_new_tokens=max_new_tokens)
        return [str(a) for a in answers]

    def _p_yes(self, slices: Sequence[np.ndarray], questions: Sequence[str]) -> list[float]:
        with self._lock, torch.no_grad():
            probs = self.model.yes_probability(self._images(slices), list(questions))
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
        budget = self.text_max_new_tokens if task == "free" else self.max_new_tokens
        text = self._generate([image], [instruction], budget)[0]
        answer = Answer(instruction=instruction, text=text, task=task)
        if task == "detection":
            answer.grid_box = parse_box(text)
            if answer.grid_box is not None:
                answer.pixel_box = grid_to_pixel(answer.grid_box, width, height)
        elif task == "question":
            answer.p_yes = self._p_yes([image], [instruction])[0]
        answer.message = describe_answer(answer, width, height)
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
            crops = [s if b is None else crop_to_box(s, b) for s, b in zip(batch, pancreas_boxes)]
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


def make_private_workdir(prefix: str = "minigpt_pancreas_demo_") -> Path:
    """A fresh temp folder readable only by this user (``mkdtemp`` uses mode 0700 and a random
    name), for uploads, Gradio's cache and extracted DICOM files."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def _is_random_init(model_cfg: Any) -> bool:
    """True when no pretrained LLM/EVA weights are configured (tiny CPU models)."""
    return model_cfg.text.path is None and model_cfg.vision.weights is None


def load_service(cfg: Any, device: Optional[str] = None, limits: Limits = Limits()) -> DemoService:
    """Build the configured model and wrap it for the demo.

    ``model.ckpt`` is the checkpoint served (any stage, or the quickstart's). When it is missing:
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
    description = f"checkpoint `{served}` ({sizes}) on {resolved}; greedy decoding."
    return DemoService(
        model,
        max_new_tokens=model_cfg.max_new_tokens,
        limits=limits,
        warning=warning,
        description=description,
    )
