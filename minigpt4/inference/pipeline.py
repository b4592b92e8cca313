"""The cascade on the slices of one volume, and the patient answer: one code path for every tool.

Per slice: stage 1 ``[refer]`` pancreas box → crop from the predicted box, cut exactly as
``python -m preprocessing tc`` cuts (:func:`cut_crop`, :func:`minigpt4.boxes.grid_to_pixel_inclusive`)
→ stage 2 P(tumor) = P(yes) on the crop → stage 3 ``[refer]`` tumor box where P(tumor) >= threshold.
A slice "got a box" when its answer is a box with positive area (:func:`minigpt4.boxes.box_problem`
is None; ``{<0><0><0><0>}`` means "absent"). The slices' P(tumor) are aggregated into a patient
score and decision: ``tumor`` / ``no tumor`` at the threshold, ``inconclusive`` when no slice got a
pancreas box (the model never looked at a pancreas). One checkpoint for every stage (the demo's
``model.ckpt``) runs the same code: :class:`SingleModel`, ``whole_slice_fallback``, threshold 0.

Encode once: the stages share the frozen EVA tower (only ``llama_proj`` and the LoRA differ), so a
slice's tower tokens (``model.encode_tower``) serve stage 1 and stage 3; stage 2 encodes only the
crops: 2 tower passes per asked slice instead of 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch

from minigpt4.boxes import box_problem, grid_to_pixel, grid_to_pixel_inclusive, parse_box
from minigpt4.config import AGGREGATIONS
from minigpt4.prompts import TARGET_NAMES, classification_question, detection_instruction
from preprocessing.tc import crop_box

DECISIONS = ("tumor", "no tumor", "inconclusive")
PixelBox = tuple[float, float, float, float]
IntBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class CascadeSettings:
    """How the stages run on a volume and how its slices become a patient answer."""

    threshold: Optional[float] = 0.5  # patient: "tumor" where the aggregated P(tumor) >= it; None: stages 1–2 only
    aggregation: str = "max"  # or top_k_mean
    top_k: int = 3
    crop_margin: int = 0  # the TC folder's --margin
    batch_size: int = 8  # images per model call (fp32: the same answers; bf16 may move one: BENCHMARKS.md)
    whole_slice_fallback: bool = False  # one checkpoint: classify the whole slice when stage 1 has no box
    max_new_tokens: Optional[int] = None  # detection budget; None: the model's generation.max_new_tokens
    min_boxed_slices: int = 1  # fewer slices with a pancreas box: the patient answer is "inconclusive"
    slice_threshold: Optional[float] = None  # stage 3 asked where a slice's P(tumor) >= it; None: ``threshold``

    @property
    def stage3_gate(self) -> Optional[float]:
        """Stage 3's slice gate: chosen on val slices (``cascade.slice_threshold``), separate from
        the patient threshold, which is chosen on aggregated volume scores."""
        return self.threshold if self.slice_threshold is None else self.slice_threshold

    @classmethod
    def from_config(cls, cascade: Any, **run) -> "CascadeSettings":
        """The operating point of a :class:`minigpt4.config.CascadeConfig` (unset threshold: 0.5,
        ``auto`` aggregation: max); ``run``: batch_size, whole_slice_fallback, max_new_tokens."""
        threshold = 0.5 if cascade.threshold is None else cascade.threshold
        return cls(threshold=threshold, slice_threshold=cascade.slice_threshold,
                   aggregation="max" if cascade.aggregation == "auto" else cascade.aggregation,
                   top_k=cascade.top_k, crop_margin=cascade.crop_margin,
                   min_boxed_slices=cascade.min_boxed_slices, **run)

    def describe(self) -> str:
        """The operating point in words (demo, scan reports)."""
        gate = "" if self.slice_threshold is None else f", stage 3 asked where slice P(tumor) >= {self.slice_threshold:g}"
        return (f"patient threshold {self.threshold:g} on the {self.aggregation} of slice P(tumor)"
                f"{f' (top {self.top_k})' if self.aggregation == 'top_k_mean' else ''}{gate}; inconclusive when "
                f"fewer than {max(1, self.min_boxed_slices)} slice(s) get a pancreas box")


class SingleModel:
    """One checkpoint answering for every stage, with the interface of
    :class:`minigpt4.models.stages.StageModels` the pipeline uses."""

    shares_tower = True  # one model, so one ViT for every stage (trainable or not)

    def __init__(self, model: Any) -> None:
        self.model = model

    def use(self, stage: str) -> Any:
        return self.model


@dataclass
class SliceResult:
    """The cascade's answers on one slice. Boxes are in pixels of the slice: ``pancreas_box`` and
    ``tumor_box`` continuous (:func:`minigpt4.boxes.grid_to_pixel`, as scored), ``crop_box``
    inclusive (the crop is ``slice[y1:y2 + 1, x1:x2 + 1]``)."""

    slice_index: int
    pancreas_answer: str
    pancreas_grid: Optional[tuple[int, int, int, int]] = None
    pancreas_box: Optional[PixelBox] = None
    crop_box: Optional[tuple[int, int, int, int]] = None
    p_tumor: Optional[float] = None
    """P(yes) of stage 2; None where nothing was classified (no pancreas box, no fallback)."""
    tumor_asked: bool = False
    tumor_answer: Optional[str] = None
    tumor_box: Optional[PixelBox] = None
    p_tumor_gt_crop: Optional[float] = None
    """Evaluation only: stage 2 on the ground-truth crop."""
    tumor_answer_alone: Optional[str] = None
    """Evaluation only: stage 3 on a ground-truth tumor slice regardless of P(tumor)."""
    tumor_box_alone: Optional[PixelBox] = None

    @property
    def classified_on(self) -> str:
        if self.crop_box is not None:
            return "pancreas crop"
        return "no pancreas box" if self.p_tumor is None else "whole slice"

    def inclusive_boxes(self, width: int, height: int) -> tuple[Optional[IntBox], Optional[IntBox]]:
        """``(pancreas, tumor)`` as inclusive integer pixel boxes of this (height, width) slice,
        :func:`minigpt4.boxes.grid_to_pixel_inclusive` of the answers' grid boxes (the pixels the
        scan's files mark; the pancreas one is the box the crop was cut from). None: no box."""
        tumor = answer_box(self.tumor_answer, width, height) if self.tumor_box is not None else None
        return (None if self.pancreas_grid is None else grid_to_pixel_inclusive(self.pancreas_grid, width, height),
                None if tumor is None else grid_to_pixel_inclusive(tumor[0], width, height))

    def record(self) -> dict:
        """The keys of ``eval_cascade.py``'s ``predictions.jsonl`` (``slice_index`` comes from the slice record)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "slice_index"}

    def as_dict(self) -> dict:
        """A short summary (boxes to 0.1 px, P to 4 decimals) for people and APIs."""
        def rounded(box):
            return None if box is None else [round(v, 1) for v in box]

        return {"slice": self.slice_index, "p_tumor": None if self.p_tumor is None else round(self.p_tumor, 4),
                "classified_on": self.classified_on, "pancreas_box": rounded(self.pancreas_box),
                "tumor_box": rounded(self.tumor_box), "pancreas_answer": self.pancreas_answer,
                "tumor_answer": self.tumor_answer}


@dataclass
class PatientResult:
    """A volume's answer from its slices."""

    score: float
    """Aggregated P(tumor) of the slices that have one (0 when none has)."""
    aggregation: str
    top_k: int
    threshold: float
    decision: str
    """One of :data:`DECISIONS`."""
    n_slices_boxed: int
    """Slices where stage 1 found a pancreas box."""

    @property
    def tumor(self) -> bool:
        return self.decision == "tumor"


@dataclass
class VolumeResult:
    slices: list[SliceResult] = field(default_factory=list)
    patient: Optional[PatientResult] = None


# ----------------------------------------------------------------------------- crops and boxes
def answer_box(answer: Optional[str], width: int, height: int) -> Optional[tuple[tuple[int, int, int, int], PixelBox]]:
    """``(grid box, continuous pixel box)`` of a detection answer, None unless it is a box with
    positive area (an unparseable answer, the empty box, reversed or equal corners)."""
    if box_problem(answer) is not None:
        return None
    grid = parse_box(answer)
    return grid, grid_to_pixel(grid, width, height)


def cut_crop(pixels: np.ndarray, pixel_box: Sequence[int], margin: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The crop ``python -m preprocessing tc`` cuts for an inclusive pixel box.

    Args:
        pixels: (H, W) uint8 slice.
        pixel_box: inclusive ``[x1, y1, x2, y2]``.
        margin: the TC folder's ``--margin``.
    Returns:
        ``(crop (h, w), crop_box)`` with the inclusive crop box of :func:`preprocessing.tc.crop_box`.
    """
    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = crop_box(pixel_box, width, height, margin)
    return pixels[y1:y2 + 1, x1:x2 + 1], (x1, y1, x2, y2)


def grid_box_crop(image: np.ndarray, grid: Sequence[int], margin: int = 0) -> tuple[np.ndarray, IntBox]:
    """``(crop, inclusive pixel box cut)`` of a slice at a 0–100 grid box (:func:`cut_crop`)."""
    height, width = image.shape[:2]
    return cut_crop(image, grid_to_pixel_inclusive(grid, width, height), margin)


def pancreas_crop(image: np.ndarray, answer: str, margin: int = 0) -> Optional[np.ndarray]:
    """The crop the tumor classifier trained on, cut where a pancreas answer points; None when the
    answer holds no box with an area."""
    height, width = image.shape[:2]
    found = answer_box(answer, width, height)
    return None if found is None else grid_box_crop(image, found[0], margin)[0]


# ----------------------------------------------------------------------------- running the stages
def model_images(model: Any, slices: Sequence[np.ndarray]) -> torch.Tensor:
    batch = torch.stack([model.image_transform(s) for s in slices])
    return batch.to(getattr(model, "device", "cpu"))


def _batched(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def run_stages(stages: Any, slices: Sequence[np.ndarray], settings: CascadeSettings, first_index: int = 0,
               gt_pancreas_boxes: Optional[Sequence[Optional[Sequence[int]]]] = None,
               gt_tumor_slices: Sequence[bool] = (), encode_once: Optional[bool] = None) -> list[SliceResult]:
    """Run the cascade on some slices of one volume (all held in memory with their tower tokens).

    Args:
        stages: :class:`minigpt4.models.stages.StageModels` or :class:`SingleModel` (``use(stage)``).
        slices: (H, W) uint8 slices, as the prepared PNGs; slice ``k`` gets index ``first_index + k``.
        gt_pancreas_boxes: evaluation: per slice, the ground-truth inclusive pancreas box (or None):
            stage 2 also runs on that crop (``p_tumor_gt_crop``) to price the predicted crop.
        gt_tumor_slices: evaluation: True where a tumor is present: stage 3 is also asked there
            regardless of P(tumor) (``tumor_answer_alone``, the paper's Table 3 condition).
        encode_once: reuse stage 1's tower tokens in stage 3; default ``stages.shares_tower``.
            Only right when every stage runs the same ViT: a stage with its own ViT (a checkpoint
            trained with ``model.vision.trainable``) sees other tower tokens than stage 1.
    """
    shared = getattr(stages, "shares_tower", False) if encode_once is None else encode_once
    budget = settings.max_new_tokens
    rows = [SliceResult(first_index + k, "") for k in range(len(slices))]
    pancreas_q = detection_instruction(TARGET_NAMES["pancreas"])
    tumor_q = detection_instruction(TARGET_NAMES["tumor"])
    yes_q = classification_question()
    towers: dict[int, torch.Tensor] = {}  # slice position → (1 + N, C) tower tokens, when shared

    def detect(model, positions: Sequence[int], question: str) -> list[str]:
        if shared:
            tower = torch.stack([towers[k] for k in positions])
            return model.generate(None, [question] * len(positions), budget, tower_tokens=tower)
        return model.generate(model_images(model, [slices[k] for k in positions]), [question] * len(positions), budget)

    model = stages.use("pancreas_detection")
    for chunk in _batched(range(len(slices)), settings.batch_size):
        if shared:
            towers.update(zip(chunk, model.encode_tower(model_images(model, [slices[k] for k in chunk]))))
        for k, answer in zip(chunk, detect(model, chunk, pancreas_q)):
            height, width = slices[k].shape[:2]
            rows[k].pancreas_answer = answer
            found = answer_box(answer, width, height)
            if found is not None:
                rows[k].pancreas_grid, rows[k].pancreas_box = found

    crops: list[tuple[int, str, np.ndarray]] = []
    for k, row in enumerate(rows):
        if row.pancreas_grid is not None:
            crop, row.crop_box = grid_box_crop(slices[k], row.pancreas_grid, settings.crop_margin)
            crops.append((k, "p_tumor", crop))
        elif settings.whole_slice_fallback:
            crops.append((k, "p_tumor", slices[k]))
        gt = None if gt_pancreas_boxes is None else gt_pancreas_boxes[k]
        if gt is not None:
            crops.append((k, "p_tumor_gt_crop", cut_crop(slices[k], gt, settings.crop_margin)[0]))
    model = stages.use("tumor_classification")
    for chunk in _batched(crops, settings.batch_size):
        probs = model.yes_probability(model_images(model, [c for _, _, c in chunk]), [yes_q] * len(chunk))
        for (k, key, _), p in zip(chunk, torch.as_tensor(probs).float().cpu().reshape(-1).tolist()):
            setattr(rows[k], key, float(p))

    threshold = settings.stage3_gate
    for row in rows:
        row.tumor_asked = threshold is not None and row.p_tumor is not None and row.p_tumor >= threshold
    asks = [(k, "tumor") for k, row in enumerate(rows) if row.tumor_asked]
    asks += [(k, "tumor_alone") for k in range(len(rows)) if k < len(gt_tumor_slices) and gt_tumor_slices[k]]
    if asks:
        model = stages.use("tumor_detection")
        for chunk in _batched(asks, settings.batch_size):
            for (k, kind), answer in zip(chunk, detect(model, [k for k, _ in chunk], tumor_q)):
                height, width = slices[k].shape[:2]
                found = answer_box(answer, width, height)
                suffix = "" if kind == "tumor" else "_alone"
                setattr(rows[k], "tumor_answer" + suffix, answer)
                setattr(rows[k], "tumor_box" + suffix, None if found is None else found[1])
    return rows


def scan_slices(stages: Any, slices: np.ndarray | Sequence[np.ndarray], settings: CascadeSettings,
                progress: Optional[Callable[[float, str], None]] = None, lock: Optional[ContextManager] = None,
                chunk: Optional[int] = None, gt_pancreas_boxes: Optional[Sequence[Optional[Sequence[int]]]] = None,
                gt_tumor_slices: Sequence[bool] = ()) -> VolumeResult:
    """The cascade on every slice of a volume, ``chunk`` slices at a time, then the patient answer
    (None without a threshold).

    Memory is bounded by one chunk's tower tokens (default ``8 × batch_size`` slices).

    Args:
        slices: (Z, H, W) uint8 normalised slices.
        progress: called as ``progress(fraction_done, description)`` before each chunk and at the end.
        lock: held while a chunk runs (the demo shares one model between users).
        gt_pancreas_boxes, gt_tumor_slices: evaluation runs of :func:`run_stages`, one per slice.
    """
    count = len(slices)
    step = chunk or 8 * settings.batch_size
    result = VolumeResult()
    for start in range(0, count, step):
        stop = min(count, start + step)
        if progress is not None:
            progress(start / count, f"scanning slices {start + 1}–{stop} of {count}")
        gt_boxes = None if gt_pancreas_boxes is None else gt_pancreas_boxes[start:stop]
        with lock if lock is not None else contextlib.nullcontext():
            result.slices += run_stages(stages, [slices[k] for k in range(start, stop)], settings, start, gt_boxes,
                                        gt_tumor_slices[start:stop])
    if settings.threshold is not None:
        result.patient = patient_result(result.slices, settings)
    if progress is not None:
        progress(1.0, "scan finished")
    return result


# ----------------------------------------------------------------------------- patient level
def aggregate(p_tumor: Sequence[Optional[float]], method: str, top_k: int) -> float:
    """A volume's score from its slices' P(tumor) (None = slice without a crop, ignored).

    ``max``: the largest; ``top_k_mean``: mean of the ``top_k`` largest (all when fewer);
    0 when no slice has a P(tumor).
    """
    values = sorted((float(p) for p in p_tumor if p is not None), reverse=True)
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {AGGREGATIONS}")
    if not values:
        return 0.0
    return values[0] if method == "max" else float(np.mean(values[:top_k]))


def patient_result(slices: Sequence[SliceResult], settings: CascadeSettings) -> PatientResult:
    """The patient answer: ``inconclusive`` when fewer than ``min_boxed_slices`` (default 1) slices
    got a pancreas box, else ``tumor`` where the aggregated P(tumor) >= threshold, ``no tumor`` below."""
    score = aggregate([s.p_tumor for s in slices], settings.aggregation, settings.top_k)
    boxed = sum(s.pancreas_box is not None for s in slices)
    decision = "inconclusive" if boxed < max(1, settings.min_boxed_slices) else \
        "tumor" if score >= settings.threshold else "no tumor"
    return PatientResult(score=score, aggregation=settings.aggregation, top_k=settings.top_k,
                         threshold=settings.threshold, decision=decision, n_slices_boxed=boxed)
