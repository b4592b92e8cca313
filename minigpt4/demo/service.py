"""The demo's model logic, without the web UI (paper §3.9), so it is tested without a browser.

:class:`DemoService` answers one instruction about one slice (``ask``, ``classify``) and scans a
volume with the inference pipeline (:func:`minigpt4.inference.pipeline.scan_slices`); files are
read by :mod:`minigpt4.inference.readers`; :func:`minigpt4.drawing.annotate` draws boxes. Generation is greedy:
detection answers must be reproducible (the release's sampling only ever served free text).

Limits: each question is answered on its own (the model was fine-tuned on single-turn prompts),
and ``classify`` on a whole slice is outside the classifier's training distribution (pancreas
crops; the volume scan crops to the detected pancreas first).
"""

from __future__ import annotations

import dataclasses

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from minigpt4.boxes import EMPTY_BOX, box_problem, grid_to_pixel, parse_box, parse_yes_no
from minigpt4.config import DecodingConfig
from minigpt4.inference.operating_point import check_checkpoints, scan_normalization, scan_settings
from minigpt4.drawing import CYAN, RED, annotate
from minigpt4.inference.calibration import CalibrationMap, configured_calibration, likelihood_entry, likelihood_text
from minigpt4.inference.fitness import check_fitness, fitness_summary, stage_envelopes
from minigpt4.inference.pipeline import CascadeSettings, PatientResult, SingleModel, SliceResult, model_images, scan_slices
from minigpt4.inference.readers import InputError, Limits
from minigpt4.prompts import TARGET_NAMES, classification_question, detection_instruction
from minigpt4.models.stages import load_stages, missing_stages
from minigpt4.utils import resolve_device
from minigpt4.models.minigpt_v2 import build_model


# quick-button tasks: key → (button label, instruction); one prompt builder for all of them
QUICK_TASKS: dict[str, tuple[str, str]] = {
    "pancreas": ("Locate the pancreas", detection_instruction(TARGET_NAMES["pancreas"])),
    "tumor_yes_no": ("Is there a tumor?", classification_question()),
    "tumor": ("Locate the tumor", detection_instruction(TARGET_NAMES["tumor"])),
    "liver": ("Locate the liver", detection_instruction(TARGET_NAMES["liver"])),
    "kidney": ("Locate the kidney", detection_instruction(TARGET_NAMES["kidney"])),
    "spleen": ("Locate the spleen", detection_instruction(TARGET_NAMES["spleen"])),
}


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


@dataclass
class ScanResult:
    rows: list[SliceResult]
    patient: Optional[PatientResult] = None
    """Three-stage mode: the volume's answer (single checkpoint: None, its P(tumor) may come from
    whole slices, outside the classifier's training distribution)."""
    likelihood: Optional[dict] = None
    """report.json ``patient.likelihood`` (:func:`minigpt4.inference.calibration.likelihood_entry`)."""
    fitness: Optional[list] = None
    """The input's fitness checks (:func:`minigpt4.inference.fitness.check_fitness`); None: not run."""

    @property
    def most_suspicious(self) -> int:
        """Slice index with the highest P(tumor) (the first one on ties)."""
        best = max(self.rows, key=lambda r: (-1.0 if r.p_tumor is None else r.p_tumor, -r.slice_index))
        return best.slice_index

    def assessed_text(self) -> str:
        """What the scan looked at: slices boxed, classified (on a crop or the whole slice), asked
        for a tumor box."""
        rows = self.rows
        boxed = sum(r.pancreas_box is not None for r in rows)
        on_crop = sum(r.crop_box is not None for r in rows)
        whole = sum(r.crop_box is None and r.p_tumor is not None for r in rows)
        asked = sum(r.tumor_asked for r in rows)
        found = sum(r.tumor_box is not None for r in rows)
        text = f"Assessed: {boxed} of {len(rows)} slices got a pancreas box"
        if on_crop + whole == 0:
            return text + ", so no slice was classified and none was asked for a tumor box."
        classified = [f"{on_crop} on the pancreas crop"] + ([f"{whole} on the whole slice"] if whole else [])
        return (text + f"; P(tumor) computed on {on_crop + whole} ({', '.join(classified)}); tumor box asked on "
                f"{asked} slice{'' if asked == 1 else 's'}, found on {found}.")

    def patient_text(self) -> str:
        """The scan's conclusion in words: the patient-level answer with its operating point
        (three-stage mode) and what was assessed. When no slice got a pancreas box it is
        "inconclusive: no pancreas found on any slice", never "no tumor found", in both modes."""
        p = self.patient
        boxed = sum(r.pancreas_box is not None for r in self.rows)
        if boxed == 0:
            inconclusive = ("**inconclusive: no pancreas found on any slice** — this is not a negative result: the "
                            "model never looked at a pancreas")
        else:  # the pipeline may require more boxed slices than this
            needed = (p.assessed.get("min_slices_required") if p is not None else None) or None
            kept = p.assessed.get("slices_with_pancreas", boxed) if p is not None and p.assessed else boxed
            inconclusive = (f"**inconclusive: a pancreas box on only {kept} of {len(self.rows)} slices"
                            f"{f' ({needed} needed)' if needed else ''}** — this is "
                            "not a negative result: too little of the pancreas was looked at")
        if p is None:  # one checkpoint: no patient-level answer (its P(tumor) may come from whole slices)
            if boxed:
                return self.assessed_text()
            return (inconclusive + "; P(tumor) came from whole slices only, outside the classifier's training "
                    "distribution. " + self.assessed_text())
        aggregation = f"aggregation `{p.aggregation}`" + (f", top {p.top_k}" if p.aggregation.startswith("top_k") else "")
        if p.decision == "inconclusive":
            return (f"Patient-level answer: {inconclusive}, so the threshold {p.threshold:.3f} ({aggregation}) was not "
                    "applied. " + self.assessed_text())
        how = {"max": "largest slice P(tumor)", "top_k_mean": f"mean of the {p.top_k} largest slice P(tumor)",
               "top_k_logit_mean": f"logit-space mean of the {p.top_k} largest slice P(tumor)",
               "mean": "mean slice P(tumor)"}.get(p.aggregation, p.aggregation)
        verdict, side = ("tumor suspected", "at or above") if p.tumor else ("no tumor found", "below")
        seen = p.assessed.get("slices_with_pancreas", p.n_slices_boxed)
        return (f"Patient-level answer: **{verdict}** on the {seen} slice{'' if seen == 1 else 's'} where a pancreas "
                f"was found ({how} = {p.score:.3f}, {side} the threshold {p.threshold:.3f}; {aggregation}); "
                f"{likelihood_text(self.likelihood or likelihood_entry(p.score, None))}. " + self.assessed_text())

    def fitness_text(self) -> str:
        """The fitness checks in words: ``**Outside the validated range**: ... failed (reason); ...``
        or ``Within the validated range ...``; empty when the checks were not run."""
        if self.fitness is None:
            return ""
        failed = [c for c in self.fitness if c["status"] == "failed"]
        if not failed:
            return f"Input checks: {fitness_summary(self.fitness)}."
        return ("**Outside the validated range** — the answer is given but was not validated for such a scan: "
                + "; ".join(f"{c['check']}: {c['reason']}" for c in failed) + ".")

    def chat_text(self) -> str:
        """The chat message after "Scan volume" (Markdown)."""
        stages = (" Three stages: pancreas box (stage 1) → P(tumor) on its crop (stage 2) → tumor box (stage 3)."
                  if self.patient is not None else "")
        row = self.rows[self.most_suspicious]
        if row.p_tumor is None:
            look = " No slice was classified, so none is most suspicious."
        else:
            look = (f" Most suspicious: **slice {row.slice_index}**, P(tumor) = {row.p_tumor:.3f} (classified on the "
                    f"{row.classified_on}). Boxes: tumor in red, pancreas in cyan. The viewer now shows that slice.")
        return f"Scanned {len(self.rows)} slices.{stages}{look} {self.patient_text()} {self.fitness_text()}".strip()

    def summary_text(self, name: str) -> str:
        """The ``/scan_volume`` endpoint's summary (plain text)."""
        row = self.rows[self.most_suspicious]
        look = ("no slice was classified" if row.p_tumor is None
                else f"most suspicious slice {row.slice_index} (P(tumor) = {row.p_tumor:.3f})")
        text = f"{name}: {len(self.rows)} slices scanned; {look}. {self.patient_text()} {self.fitness_text()}"
        return text.replace("**", "").strip()

    def boxes_for(self, slice_index: int) -> list[tuple[tuple[float, ...], tuple[int, int, int]]]:
        row = self.rows[slice_index]
        boxes = []
        if row.pancreas_box is not None:
            boxes.append((row.pancreas_box, CYAN))
        if row.tumor_box is not None:
            boxes.append((row.tumor_box, RED))
        return boxes


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
            stage (:func:`stage_for`). "Scan volume" runs :func:`minigpt4.inference.pipeline.scan_slices`
            in both modes (one checkpoint: the same model for every stage).
        cascade: the volume scan's :class:`CascadeSettings` (``CascadeSettings.from_config``): its
            ``crop_margin`` in both modes, the whole operating point in three-stage mode.
        checkpoints: ``{stage: checkpoint path}`` of the served weights (their sha256s go into
            the scan's ``report.json``).
        calibration, slice_calibration: the maps of the patient score and slice P(tumor) (the
            operating point's ``calibration``); None: the score is shown as an uncalibrated score.
        envelopes: ``{stage: (training envelope or None, note)}`` the fitness checks compare with.
        normalization: the volume normalisation offered first: the one the operating point's folders
            were prepared with (:func:`minigpt4.inference.operating_point.scan_normalization`).
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
        cascade: Optional[CascadeSettings] = None,
        checkpoints: Optional[dict] = None,
        calibration: Optional[CalibrationMap] = None,
        slice_calibration: Optional[CalibrationMap] = None,
        envelopes: Optional[dict] = None,
        normalization: str = "paper",
    ) -> None:
        self.model = model
        self.stages = stages
        self.cascade = cascade or CascadeSettings()
        self.max_new_tokens = max_new_tokens
        self.text_max_new_tokens = text_max_new_tokens
        self.text_decoding = text_decoding
        self.limits = limits
        self.warning = warning
        self.description = description
        self.scan_batch_size = scan_batch_size
        self.checkpoints = dict(checkpoints or {})
        self.calibration, self.slice_calibration = calibration, slice_calibration
        self.envelopes = dict(envelopes or {})
        self.normalization = normalization
        self._lock = threading.Lock()

    # -- low level ---------------------------------------------------------------------------

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
            answers = model.generate(model_images(self.model, slices), list(instructions), max_new_tokens=max_new_tokens, **extra)
        return [str(a) for a in answers]

    def _p_yes(self, slices: Sequence[np.ndarray], questions: Sequence[str], stage: Optional[str] = None) -> list[float]:
        with self._lock, torch.no_grad():
            probs = self._model_for(stage).yes_probability(model_images(self.model, slices), list(questions))
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
        acquisition: Optional[dict] = None,
        dicom_headers: Optional[list] = None,
    ) -> ScanResult:
        """The cascade on every slice (:func:`minigpt4.inference.pipeline.scan_slices`).

        Per slice: ``[refer]`` pancreas → crop to that box → the tumor question's P(yes) on the
        crop → ``[refer]`` pancreatic tumor on the whole slice where P(tumor) >= threshold.
        One checkpoint for every task: the whole slice is classified when no pancreas box is found
        and the tumor is asked on every slice (threshold 0); no patient answer is given.

        Args:
            slices: (Z, H, W) uint8 normalised slices.
            progress: called as ``progress(fraction_done, description)``.
            acquisition, dicom_headers: the volume's (:class:`minigpt4.inference.readers.Volume`), for
                the fitness checks (unknown where absent).
        """
        if slices.ndim != 3 or slices.shape[0] == 0:
            raise InputError("the volume has no slices to scan.")
        single = self.stages is None
        run = dict(batch_size=self.scan_batch_size, whole_slice_fallback=single, max_new_tokens=self.max_new_tokens)
        settings = (CascadeSettings(threshold=0.0, crop_margin=self.cascade.crop_margin, **run) if single
                    else dataclasses.replace(self.cascade, **run))
        stages = SingleModel(self.model) if single else self.stages
        result = scan_slices(stages, slices, settings, progress, lock=self._lock, chunk=self.scan_batch_size)
        patient = None if single else result.patient
        score = None if patient is None or patient.decision == "inconclusive" else float(patient.score)
        fitness = check_fitness(acquisition, dicom_headers, result.slices, int(slices.shape[0]), self.envelopes)
        return ScanResult(result.slices, patient, likelihood_entry(score, self.calibration), fitness)


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
    missing = missing_stages(stage_paths)
    if missing:
        raise ValueError(f"cascade.stages.{missing[0]} is not set: the three-stage demo needs all three stages "
                         "(or set model.ckpt to serve one checkpoint for every task)")
    absent = {s: p for s, p in stage_paths.items() if not Path(p).exists()}
    if absent:
        if _is_random_init(cfg.model):
            return None
        stage, path = next(iter(absent.items()))
        raise FileNotFoundError(f"cascade.stages.{stage} {path} not found (cwd {Path.cwd()}); train the cascade first")
    # the operating point eval_cascade chose on val (or a complete explicit one), before the model loads
    settings, point = scan_settings(cfg.cascade, "demo config")
    if point is not None:
        check_checkpoints(point, stage_paths, "demo config")
    normalization = scan_normalization(point, None, "demo config")
    resolved = resolve_device(device or cfg.run.device)
    stages = load_stages(cfg.model, stage_paths, device=resolved)
    calibration, slice_calibration = configured_calibration(cfg.cascade)
    listed = "; ".join(f"{STAGE_LABELS[s]} `{Path(p).name}`" for s, p in stage_paths.items())  # names, not paths
    description = (f"three stages on one base — {listed} (image {cfg.model.vision.image_size}px, LLaMA "
                   f"{cfg.model.text.num_layers}×{cfg.model.text.hidden_size}) on {resolved}; greedy decoding; "
                   f"volume scan: {settings.describe()}; "
                   + ("the operating point eval_cascade.py chose on the validation volumes (cascade.operating_point)."
                      if point is not None else "an operating point set by hand in the config, not one chosen by "
                      "eval_cascade.py (set cascade.operating_point to its operating_point.json)."))
    return DemoService(
        stages.model, max_new_tokens=cfg.model.generation.max_new_tokens, text_decoding=cfg.model.generation.free_text,
        limits=limits, description=description, stages=stages, cascade=settings,
        checkpoints=dict(stage_paths), calibration=calibration, slice_calibration=slice_calibration,
        envelopes=stage_envelopes(stage_paths), normalization=normalization,
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
            f"checkpoint <code>{Path(ckpt).name}</code> not found: serving a tiny model with <b>random weights</b>; "
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
    served = Path(ckpt).name if model_cfg.ckpt is not None else "random / base weights"  # a name, not a server path
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
        cascade=CascadeSettings(crop_margin=cfg.cascade.crop_margin) if hasattr(cfg, "cascade") else None,
        checkpoints={"model": model_cfg.ckpt} if model_cfg.ckpt is not None else None,
        envelopes=stage_envelopes({"model": model_cfg.ckpt}) if model_cfg.ckpt is not None else None,
    )
