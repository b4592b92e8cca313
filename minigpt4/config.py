"""One configuration mechanism for every entry point.

YAML files (``train_configs/``, ``eval_configs/``) are merged through omegaconf into the typed
dataclasses below, then ``--options key=value`` overrides are applied on top. Unknown keys are
errors (omegaconf struct mode), values are type-checked, and every numeric or enumerated field
declares its constraint beside its declaration (``checked(default, POSITIVE)``); the constraints
are checked when a config is loaded, with the full key in the message (``datasets.msd.sample_ratio
must be positive, got inf``), and again in ``__post_init__`` when a dataclass is built in code.
``__post_init__`` keeps only the checks that relate several fields. The same :class:`Config` shape (``model`` / ``datasets`` / ``run``) serves
training, evaluation and the demo, so one file can be passed to any of them.

Relative paths in a config are relative to the current working directory (the repository root
in every documented command); image paths inside prepared annotation files are relative to the
dataset folder, so prepared data can be moved freely.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minigpt4.cli import add_debug_argument

TASKS = ("pancreas_detection", "tumor_detection", "organ_detection", "tumor_classification")
DETECTION_TASKS = ("pancreas_detection", "tumor_detection", "organ_detection")
ORGANS = ("liver", "kidney", "spleen", "pancreas")


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


# --------------------------------------------------------------------------- value constraints


@dataclass(frozen=True)
class Check:
    """A constraint on one config value: ``accepts(value)`` and the words for what is expected."""

    accepts: Callable[[Any], bool]
    expected: str
    numeric: bool = True
    """Numbers only: a float must also be finite (NaN and infinity are never a valid setting)."""

    def verify(self, key: str, value: Any) -> None:
        """Raise a ConfigError naming ``key`` unless ``value`` satisfies the constraint (None = not set)."""
        if value is None or value == MISSING:
            return
        if self.numeric and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if not self.accepts(value):
            raise ConfigError(f"{key} must be {self.expected}, got {value!r}")


POSITIVE = Check(lambda v: v > 0, "positive")
NON_NEGATIVE = Check(lambda v: v >= 0, "non-negative (>= 0)")
SEED = Check(lambda v: 0 <= v < 2**32, "in [0, 2**32) (the range NumPy and torch seeds take)")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """``low <= v <= high``, either end excluded when ``*_open``."""
    words = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return Check(lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high), words)


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(choices), numeric=False)


def checked(default: Any = MISSING, check: Optional[Check] = None, *,
            default_factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field with its constraint: ``batch_size: int = checked(16, POSITIVE)``."""
    metadata = {"check": check} if check is not None else {}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Checked:
    """Base of the config dataclasses: ``__post_init__`` verifies each field's declared check.

    Subclasses with cross-field checks call ``super().__post_init__()`` first, so those never see
    a value that breaks its own constraint (e.g. ``patch_size = 0`` before ``image_size % patch_size``).
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is not None:
                check.verify(f.name, getattr(self, f.name))


def check_values(node: DictConfig, prefix: str = "") -> None:
    """Verify every declared check in a merged config tree, naming the full key (``run.seed``).

    Runs before omegaconf builds the dataclasses, so an error names ``datasets.<name>.…`` and
    no cross-field check sees an invalid value.
    """
    kind = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(kind):
        for f in dataclasses.fields(kind):
            if OmegaConf.is_missing(node, f.name):
                continue
            value = node[f.name]
            if isinstance(value, DictConfig):
                check_values(value, f"{prefix}{f.name}.")
            elif "check" in f.metadata:
                if isinstance(value, ListConfig):
                    value = OmegaConf.to_container(value)
                f.metadata["check"].verify(prefix + f.name, value)
    else:  # Dict[str, <dataclass>] (datasets)
        for name in node:
            if isinstance(node[name], DictConfig):
                check_values(node[name], f"{prefix}{name}.")


@dataclass
class VisionConfig(Checked):
    """EVA ViT-g/14 as used by BLIP-2 / MiniGPT-v2 (defaults = full size)."""

    image_size: int = checked(448, POSITIVE)
    """Input side in pixels; the patch grid is image_size // patch_size."""
    patch_size: int = checked(14, POSITIVE)
    width: int = checked(1408, POSITIVE)
    depth: int = checked(39, POSITIVE)
    """Blocks used. EVA-CLIP-g has 40; BLIP-2 drops the last one."""
    num_heads: int = checked(16, POSITIVE)
    mlp_hidden: int = checked(6144, POSITIVE)
    layer_norm_eps: float = checked(1e-6, POSITIVE)
    weights: Optional[str] = None
    """Path to ``eva_vit_g.pth``; None = random init (tests, tiny models, benchmarks)."""
    trainable: bool = False
    """Train the ViT's own weights too (kept in fp32, saved in checkpoints). False = the paper:
    the pretrained EVA is frozen. A deviation for tiny models trained from scratch (quickstart,
    tests), whose *random* frozen ViT would be a handicap the pretrained EVA does not have."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.vision.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError(f"model.vision.width={self.width} is not divisible by num_heads={self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextConfig(Checked):
    """LLaMA-2 decoder (defaults = LLaMA-2-7B sizes)."""

    path: Optional[str] = None
    """Local Hugging Face folder (``weights/Llama-2-7b-chat-hf``); None = random init from the sizes below."""
    tokenizer: Optional[str] = None
    """SentencePiece ``tokenizer.model``; None = ``<path>/tokenizer.model``, or the project's tiny
    tokenizer (built offline, cached) when ``path`` is None too."""
    hidden_size: int = checked(4096, POSITIVE)
    num_layers: int = checked(32, POSITIVE)
    num_heads: int = checked(32, POSITIVE)
    intermediate_size: int = checked(11008, POSITIVE)
    vocab_size: int = checked(32000, POSITIVE)
    max_position_embeddings: int = checked(4096, POSITIVE)
    rms_norm_eps: float = checked(1e-5, POSITIVE)
    quantization: str = checked("none", one_of("none", "8bit", "4bit"))
    """none | 8bit | 4bit (bitsandbytes, inference only)."""


@dataclass
class LoraConfig(Checked):
    """LoRA adapters on the LLaMA attention projections (paper §3.8)."""

    r: int = checked(64, POSITIVE)
    alpha: int = checked(16, POSITIVE)
    """The update is scaled by alpha / r; 0 would switch the adapter off."""
    dropout: float = checked(0.05, between(0, 1, high_open=True))
    target_modules: List[str] = checked(check=Check(len, "a non-empty list", numeric=False),
                                        default_factory=lambda: ["q_proj", "k_proj"])
    """Paper: q,k. The release trained q,v: set ``[q_proj, v_proj]`` to reproduce it."""


@dataclass
class DecodingConfig(Checked):
    """How :meth:`MiniGPTPancreas.generate` decodes (HF ``generate``). Defaults: greedy, one beam,
    20 new tokens, the evaluation setting of SPEC §3. The first new token is never ``</s>``
    (MiniGPT-v2's ``min_length=1``), so an answer is never empty."""

    max_new_tokens: int = checked(20, POSITIVE)
    num_beams: int = checked(1, POSITIVE)
    do_sample: bool = False
    """Sample instead of greedy/beam search (the release's demo: temperature 0.6, top-p 0.9)."""
    temperature: float = checked(1.0, POSITIVE)
    """Sampling only."""
    top_p: float = checked(1.0, between(0, 1, low_open=True))
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (sampling only)."""
    repetition_penalty: float = checked(1.0, POSITIVE)
    """> 1 makes repeated tokens less likely (the release's demo: 1.05); 1 = off."""

    @property
    def strategy(self) -> str:
        """greedy | beam | sample (recorded next to evaluation results)."""
        return "sample" if self.do_sample else ("beam" if self.num_beams > 1 else "greedy")


@dataclass
class GenerationConfig(DecodingConfig):
    """``model.generation``: decoding of detection and yes/no answers (evaluation, demo buttons),
    plus an optional setting for the demo's free-text answers."""

    free_text: Optional[DecodingConfig] = None
    """Demo only: decoding of instructions that are neither ``[refer]`` nor ``[vqa]``. None =
    the settings above with up to 64 new tokens. ``eval_configs/demo.yaml`` samples like the
    release's demo (temperature 0.6, top-p 0.9, repetition penalty 1.05)."""


PROMPT_WORDINGS = ("paper", "release")


@dataclass
class PromptsConfig(Checked):
    """How prompts are worded and laid out in tokens (``minigpt4/prompts.py``)."""

    wording: str = checked("paper", one_of(*PROMPT_WORDINGS))
    """paper: the paper's instructions in MiniGPT-v2's training stream, in training and at
    inference. release: the MiniGPT-Pancreas release's evaluation wording and inference stream
    (two BOS, one space before ``[/INST]``), for the zero-shot MiniGPT-v2 baseline only (training
    refuses it)."""


@dataclass
class ModelConfig(Checked):
    """Composite config: vision tower + projection + language model + LoRA."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    merge_tokens: int = checked(4, POSITIVE)
    """Consecutive visual tokens concatenated before ``llama_proj`` (1×4 row-major strips)."""
    dtype: str = checked("auto", one_of("auto", "bf16", "fp16", "fp32"))
    """auto (bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."""
    init_from: Optional[str] = None
    """Weights to start from: a MiniGPT-v2 stage-3 / release ``.pth``, a project checkpoint
    (folder or ``.safetensors``) or a PEFT export folder (``python -m minigpt4.export``).
    Training starts a stage from here. A LoRA of other targets/rank than ``lora`` is stacked as a
    frozen adapter (the base weights are never modified)."""
    ckpt: Optional[str] = None
    """Weights to evaluate/serve, loaded after ``init_from`` (same formats)."""
    max_txt_len: int = checked(160, POSITIVE)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_new_tokens: Optional[int] = checked(None, POSITIVE)
    """Old spelling of ``generation.max_new_tokens`` (old configs, ``--options
    model.max_new_tokens=N``): when set it replaces ``generation.max_new_tokens`` and is reset
    to None, so read ``generation.max_new_tokens``."""
    gradient_checkpointing: bool = False
    """Recompute LLaMA decoder layers in the backward pass instead of keeping their activations."""
    checkpoint_every: int = checked(1, POSITIVE)
    """With ``gradient_checkpointing``: checkpoint decoder layers 0, n, 2n, … only (1 = every layer).
    Partial checkpointing trades recomputation for memory; ``python -m minigpt4.inspect --memory``
    predicts the peak of each choice (``minigpt4/memory.py``)."""
    seed: int = checked(0, SEED)
    """Seed of the random initialisation (tiny models, llama_proj when nothing is loaded)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision.num_patches % self.merge_tokens:
            raise ConfigError(
                f"{self.vision.num_patches} patches are not divisible by model.merge_tokens={self.merge_tokens}"
            )
        if self.max_new_tokens is not None:  # the old spelling: move it to its new place
            self.generation.max_new_tokens = self.max_new_tokens
            self.max_new_tokens = None

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_patches // self.merge_tokens


@dataclass
class DatasetConfig(Checked):
    """One prepared folder (output of ``python -m preprocessing``) used for one task."""

    root: str = MISSING
    task: str = checked(MISSING, Check(lambda v: v in TASKS, "one of " + ", ".join(TASKS), numeric=False))
    """pancreas_detection | tumor_detection | organ_detection | tumor_classification."""
    sample_ratio: float = checked(1.0, POSITIVE)
    """Relative weight when several datasets are mixed (a whole batch comes from one dataset)."""
    threshold: Optional[float] = checked(None, between(0, 1))
    """None = use the prepared split files as they are; a number = reselect slices with
    ``<target>_bbox_ratio > threshold`` from ``*_slices_info.json`` (the threshold study)."""
    organs: List[str] = checked(check=Check(lambda v: set(v) <= set(ORGANS), f"a subset of {list(ORGANS)}", numeric=False),
                                default_factory=lambda: list(ORGANS))
    """organ_detection only: organs to keep."""
    empty_share: float = checked(0.0, between(0, 0.9))
    """pancreas_detection only, the trainer's training and validation splits: the share of records
    that are slices without pancreas, answered ``{<0><0><0><0>}`` (:data:`minigpt4.boxes.NO_BOX_ANSWER`),
    so stage 1 can say "no pancreas" on a whole volume. 0 = the paper (pancreas slices only; Table 1
    configs); the cascade's stage 1 uses 0.2 (docs/DEVIATIONS.md). Needs a folder prepared with
    ``--all-slices``."""


@dataclass
class RunConfig(Checked):
    """Everything about one run that is not the model or the data."""

    output_dir: str = "output/run"
    seed: int = checked(42, SEED)
    device: str = checked("auto", Check(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                                         "auto, cpu, cuda or cuda:N", numeric=False))
    """auto | cpu | cuda | cuda:N."""
    # --- optimisation (paper §3.8; release batch 16) ---
    max_epoch: int = checked(50, POSITIVE)
    iters_per_epoch: Optional[int] = checked(None, POSITIVE)
    """None = an epoch is one full pass over the mixed data; the release used 1000 iterations."""
    max_steps: Optional[int] = checked(None, POSITIVE)
    """Stop after this many optimizer steps in total (smoke tests, interrupted-run tests)."""
    batch_size: int = checked(16, POSITIVE)
    """Per-process micro-batch."""
    grad_accum_steps: int = checked(1, POSITIVE)
    init_lr: float = checked(1e-5, NON_NEGATIVE)
    """Peak learning rate (0 is allowed: a run that checks loading and saving without changing weights)."""
    min_lr: float = checked(1e-6, NON_NEGATIVE)
    warmup_lr: float = checked(1e-6, NON_NEGATIVE)
    warmup_steps: int = checked(1000, NON_NEGATIVE)
    weight_decay: float = checked(0.05, NON_NEGATIVE)
    beta1: float = checked(0.9, between(0, 1, high_open=True))
    beta2: float = checked(0.999, between(0, 1, high_open=True))
    amp: str = checked("auto", one_of("auto", "bf16", "fp16", "none"))
    """auto (bf16 autocast on GPU, none on CPU) | bf16 | fp16 (with GradScaler) | none."""
    num_workers: int = checked(2, NON_NEGATIVE)
    cache_images: bool = False
    """Keep each transformed training image in memory after its first use (150 KB per image at
    112 px, 2.4 MB at 448 px): for small datasets on CPU with ``num_workers: 0``."""
    cache_visual_features: bool = False
    """Encode each training and validation image with the frozen ViT (+ ``ln_vision``) once, store
    the tower output on disk and reuse it every epoch (``minigpt4/data/feature_cache.py``): saves
    the ViT forward (≈ 20 % of a full-size step) after the first pass. The loss and the
    validation answers are unchanged. In evaluation configs: ``eval_detection.py --checkpoints``
    encodes the images once for all epochs when they share the frozen EVA. Needs a frozen tower
    (``model.vision.trainable: false``). Disk: (1 + N) × width values per image in the autocast
    dtype (validation/evaluation: the ``llama_proj`` dtype): 1025 × 1408 × 2 bytes ≈ 2.75 MiB per
    448-px image in bf16."""
    feature_cache_dir: Optional[str] = None
    """Where ``cache_visual_features`` keeps its files; None = ``<output_dir>/feature_cache``.
    Entries are keyed by image content + ViT weights + image size, so one folder can be shared
    by every run and stage that uses the same frozen EVA."""
    compile: bool = False
    """``torch.compile`` each LLaMA decoder layer and each EVA block on its own (regional
    compilation) and pad training sequences to a multiple of ``compile_pad_to_multiple_of`` so
    that recompiles stay bounded. Needs a working inductor backend (a C++ compiler on CPU, Triton
    on GPU)."""
    compile_pad_to_multiple_of: int = checked(64, POSITIVE)
    """With ``compile``: training prompts are padded to a multiple of this length (padding is
    masked: the loss is unchanged). 64 keeps two shapes at full size (320, 384) but pads a
    322-token batch by 19 %; a smaller multiple pads less and relies on dynamic shapes."""
    log_interval: int = checked(10, POSITIVE)
    """Write a step row to ``log.jsonl`` every this many optimizer steps."""
    resume: Optional[str] = None
    """None | auto (latest checkpoint in output_dir) | path of a checkpoint folder."""
    validate: bool = True
    """Evaluate on the ``val`` split at the end of every epoch and keep the best checkpoint."""
    val_max_samples: Optional[int] = checked(None, POSITIVE)
    """Validate on at most this many evenly spaced ``val`` slices per dataset; None = all."""
    # --- evaluation ---
    eval_split: str = checked("test", one_of("train", "val", "test"))
    eval_batch_size: int = checked(16, POSITIVE)
    eval_instruction: Optional[str] = checked(None, Check(lambda v: v.count("{}") == 1, "a text with exactly one {} for the target", numeric=False))
    """Detection instruction of evaluation, ``{}`` = the target (``pancreas``, ``pancreatic
    tumor``, ...). None = the paper's first instruction ``[refer] Give me the location of the {}``
    (also used in training). The zero-shot MiniGPT-v2 baseline uses the release's wording."""


CASCADE_STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")
AGGREGATIONS = ("max", "top_k_mean", "top_k_logit_mean", "mean")
"""How the kept slices' P(tumor) of a volume become its patient score (:func:`minigpt4.inference.patient.aggregate`);
``cascade.aggregation`` may also be ``auto`` (chosen on val by ``eval_cascade.py``)."""
Z_RULES = ("none", "largest_run")
"""3-D consistency rules of the pancreas boxes (:func:`minigpt4.inference.patient.z_consistent`)."""


@dataclass
class CascadeStagesConfig:
    """The checkpoint of each stage of the clinical cascade (folder, ``.safetensors`` or ``.pth``).

    All three are served on one base (``model:`` gives its sizes and weight files); each stage
    adds its own LoRA adapter and ``llama_proj`` (and ViT, for tiny models with
    ``vision.trainable``)."""

    pancreas_detection: Optional[str] = None
    """Stage 1: ``[refer]`` pancreas box on the whole slice."""
    tumor_classification: Optional[str] = None
    """Stage 2: P(tumor) on the crop to the predicted pancreas box."""
    tumor_detection: Optional[str] = None
    """Stage 3: ``[refer]`` tumor box on the whole slice, asked where P(tumor) >= threshold."""

    def configured(self) -> dict[str, str]:
        """``{stage: checkpoint}`` of the stages that name one, in cascade order."""
        return {s: getattr(self, s) for s in CASCADE_STAGES if getattr(self, s) is not None}


@dataclass
class CascadeConfig(Checked):
    """``eval_cascade.py`` and the demo's three-stage mode (``cascade.stages`` set)."""

    stages: CascadeStagesConfig = field(default_factory=CascadeStagesConfig)
    threshold: Optional[float] = checked(None, between(0, 1))
    """Patient score at or above which a volume is called tumor (the demo also gates stage 3 with
    it); None = chosen on the ``val`` volumes (Youden's J of the patient scores), never on test."""
    slice_threshold: Optional[float] = checked(None, between(0, 1))
    """Slice P(tumor) at or above which stage 3 is asked for a tumor box (and a TC slice is called
    "yes" in the slice accuracy); None = chosen on the ``val`` slices (Youden's J of slice P(tumor)
    against the slice's tumor label), separate from the patient ``threshold``."""
    min_boxed_slices: Optional[int] = checked(None, POSITIVE)
    """A volume in which fewer slices keep a pancreas box is ``inconclusive`` (the model did not look
    at enough of a pancreas): never scored as "no tumor". None = chosen on the ``val`` volumes
    (eval_cascade: half the median ground-truth pancreas extent, :func:`minigpt4.inference.patient.min_assessed_rule`)."""
    aggregation: str = checked("auto", one_of("auto", *AGGREGATIONS))
    """Patient score from the kept slices' P(tumor): ``max``, ``top_k_mean`` (mean of the ``top_k``
    largest), ``top_k_logit_mean`` (the same in logit space), ``mean`` (all kept slices) or ``auto``
    (the one with the highest patient AUC on ``val``)."""
    z_rule: str = checked("auto", one_of("auto", *Z_RULES))
    """3-D consistency of stage 1's boxes: ``largest_run`` keeps only the largest run of adjacent
    slices whose boxes overlap (isolated boxes dropped), ``none`` keeps all, ``auto`` = chosen on
    ``val`` by patient AUC (eval_cascade; scan.py and the demo need a chosen one)."""
    operating_point: Optional[str] = None
    """scan.py / demo: the ``operating_point.json`` eval_cascade.py wrote (threshold, aggregation,
    slice threshold, minimum assessed, 3-D rule, calibration, all chosen on val). Without it the
    scan needs threshold, slice_threshold, aggregation and z_rule set explicitly."""
    top_k: int = checked(3, POSITIVE)
    crop_margin: int = checked(0, NON_NEGATIVE)
    """Pixels added around the predicted pancreas box: the ``--margin`` of the TC folder stage 2
    was trained on (``preprocessing tc``'s default is 0)."""
    bootstrap: int = checked(1000, NON_NEGATIVE)
    """Bootstrap replicates (over volumes) of the patient-level CIs; 0 = none."""
    max_volumes: Optional[int] = checked(None, POSITIVE)
    """Scan at most this many volumes per folder and split (evenly spaced by name; quick runs such
    as the quickstart); None = all."""
    compare_pancreas_detection: Optional[str] = None
    """eval_cascade.py: another stage-1 checkpoint (e.g. the paper-faithful one, trained on pancreas
    slices only) run through the same cascade — the same stages 2-3 and volumes, its rules chosen on
    val alike — and shown beside this one (tables.md "Stage 1 compared", metrics.json
    ``stage1_compared``), so the effect of the stage-1 change is a measured difference. None = no comparison."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    datasets: Dict[str, DatasetConfig] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def __post_init__(self) -> None:
        check_feature_cache(self)


def check_feature_cache(cfg: Config) -> None:
    """``run.cache_visual_features`` needs a frozen tower: a trained ViT changes its output every step.

    Raises:
        ConfigError: both ``run.cache_visual_features`` and ``model.vision.trainable`` are true.
    """
    if cfg.run.cache_visual_features and cfg.model.vision.trainable:
        raise ConfigError(
            "run.cache_visual_features=true needs a frozen vision tower, but model.vision.trainable=true "
            "(a trained ViT changes its features every step); set one of them to false"
        )


def load_config(path: Optional[str | os.PathLike] = None, options: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate, return typed dataclasses.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: YAML syntax (with file, line and column), an ``--options`` item that is not
            ``key=value`` YAML, unknown key, wrong type, missing required value or a value that
            breaks its field's declared check; the message names the file or option and the key.
    """
    # parse first: these errors name their own place (file:line:column, the option's text)
    layers = []
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        source = str(path)
        layers.append(read_yaml_mapping(path))
    if options:
        source += " + --options " + " ".join(options)
        layers.extend(parse_option(option) for option in options)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        check_values(merged)
        cfg = OmegaConf.to_object(merged)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except OmegaConfBaseException as err:
        # omegaconf appends full_key/reference_type/object_type lines: keep one line naming the key
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        key = getattr(err, "full_key", None)
        where = f" (key {key}; the valid keys are the fields in minigpt4/config.py)" if key else ""
        raise ConfigError(f"{source}: {first}{where}") from None
    assert isinstance(cfg, Config)
    return cfg


def _yaml_problem(err: yaml.YAMLError, line_text: Optional[str] = None) -> tuple[str, Optional[Any]]:
    """``(problem, mark)`` of a YAML error; the mark has 0-based ``line`` and ``column``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None and line_text is not None and line_text[mark.column:mark.column + 1] == "\t":
        problem += " (a tab: YAML indents with spaces)"
    if "python/" in problem:
        problem += " (tags that build Python objects are refused)"
    return problem, mark


def read_yaml_mapping(path: Path) -> DictConfig:
    """A config file as a DictConfig; YAML errors name the file, line and column (1-based).

    Raises:
        ConfigError: not UTF-8, not valid YAML (syntax, tab indentation, duplicate key, a
            ``!!python/...`` tag: omegaconf's loader is a safe loader) or not a mapping at the top.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start})") from None
    try:
        node = OmegaConf.create(text)
    except yaml.YAMLError as err:
        lines = text.splitlines()
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line_text = lines[mark.line] if mark is not None and mark.line < len(lines) else None
        problem, mark = _yaml_problem(err, line_text)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, datasets:, run:, "
                          f"cascade:), got a {type(OmegaConf.to_container(node)).__name__}")
    return node


def parse_option(option: str) -> DictConfig:
    """One ``--options`` item ``key=value`` (the value is YAML) as a DictConfig.

    Raises:
        ConfigError: no ``=`` or no key, or the value is not valid YAML (the column counts from
            the start of the option).
    """
    key, sep, value = option.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--options expects key=value, got {option!r}")
    try:
        return OmegaConf.from_dotlist([option])
    except yaml.YAMLError as err:
        problem, mark = _yaml_problem(err, value)
        at_end = mark is None or mark.line > 0 or mark.column >= len(value)
        column = " at its end" if at_end else f" at column {len(key) + 2 + mark.column}"
        raise ConfigError(f"--options {option!r}: the value is not valid YAML{column}: {problem}") from None


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    os.replace(tmp, path)


def add_config_arguments(parser) -> None:
    """The arguments every entry point shares: ``--cfg-path``, ``--options`` and ``--debug``."""
    parser.add_argument("--cfg-path", required=True, help="YAML config (train_configs/ or eval_configs/)")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. run.batch_size=4 datasets.tc.root=data/TC",
    )

    add_debug_argument(parser)
