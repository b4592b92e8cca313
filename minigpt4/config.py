"""One configuration mechanism for every entry point.

YAML files (``train_configs/``, ``eval_configs/``) are merged through omegaconf into the typed
dataclasses below, then ``--options key=value`` overrides are applied on top. Unknown keys are
errors (omegaconf struct mode), values are type-checked, and each dataclass validates itself in
``__post_init__``. The same :class:`Config` shape (``model`` / ``datasets`` / ``run``) serves
training, evaluation and the demo, so one file can be passed to any of them.

Relative paths in a config are relative to the current working directory (the repository root
in every documented command); image paths inside prepared annotation files are relative to the
dataset folder, so prepared data can be moved freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("pancreas_detection", "tumor_detection", "organ_detection", "tumor_classification")
DETECTION_TASKS = ("pancreas_detection", "tumor_detection", "organ_detection")
ORGANS = ("liver", "kidney", "spleen", "pancreas")


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class VisionConfig:
    """EVA ViT-g/14 as used by BLIP-2 / MiniGPT-v2 (defaults = full size)."""

    image_size: int = 448
    """Input side in pixels; the patch grid is image_size // patch_size."""
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    """Blocks used. EVA-CLIP-g has 40; BLIP-2 drops the last one."""
    num_heads: int = 16
    mlp_hidden: int = 6144
    layer_norm_eps: float = 1e-6
    weights: Optional[str] = None
    """Path to ``eva_vit_g.pth``; None = random init (tests, tiny models, benchmarks)."""
    trainable: bool = False
    """Train the ViT's own weights too (kept in fp32, saved in checkpoints). False = the paper:
    the pretrained EVA is frozen. A deviation for tiny models trained from scratch (quickstart,
    tests), whose *random* frozen ViT would be a handicap the pretrained EVA does not have."""

    def __post_init__(self) -> None:
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
class TextConfig:
    """LLaMA-2 decoder (defaults = LLaMA-2-7B sizes)."""

    path: Optional[str] = None
    """Local Hugging Face folder (``weights/Llama-2-7b-chat-hf``); None = random init from the sizes below."""
    tokenizer: Optional[str] = None
    """SentencePiece ``tokenizer.model``; None = ``<path>/tokenizer.model``, or the project's tiny
    tokenizer (built offline, cached) when ``path`` is None too."""
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    quantization: str = "none"
    """none | 8bit | 4bit (bitsandbytes, inference only)."""

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "8bit", "4bit"):
            raise ConfigError(f"model.text.quantization must be none, 8bit or 4bit, got {self.quantization!r}")


@dataclass
class LoraConfig:
    """LoRA adapters on the LLaMA attention projections (paper §3.8)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj"])
    """Paper: q,k. The release trained q,v: set ``[q_proj, v_proj]`` to reproduce it."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"model.lora.r must be positive, got {self.r}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty")


@dataclass
class DecodingConfig:
    """How :meth:`MiniGPTPancreas.generate` decodes (HF ``generate``). Defaults: greedy, one beam,
    20 new tokens, the evaluation setting of SPEC §3. The first new token is never ``</s>``
    (MiniGPT-v2's ``min_length=1``), so an answer is never empty."""

    max_new_tokens: int = 20
    num_beams: int = 1
    do_sample: bool = False
    """Sample instead of greedy/beam search (the release's demo: temperature 0.6, top-p 0.9)."""
    temperature: float = 1.0
    """Sampling only."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (sampling only)."""
    repetition_penalty: float = 1.0
    """> 1 makes repeated tokens less likely (the release's demo: 1.05); 1 = off."""

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.num_beams <= 0:
            raise ConfigError(
                f"generation max_new_tokens and num_beams must be positive, got {self.max_new_tokens}, {self.num_beams}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ConfigError(
                "generation needs temperature > 0, 0 < top_p <= 1 and repetition_penalty > 0, got "
                f"{self.temperature}, {self.top_p}, {self.repetition_penalty}"
            )

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
class PromptsConfig:
    """How prompts are worded and laid out in tokens (``minigpt4/prompts.py``)."""

    wording: str = "paper"
    """paper: the paper's instructions in MiniGPT-v2's training stream, in training and at
    inference. release: the MiniGPT-Pancreas release's evaluation wording and inference stream
    (two BOS, one space before ``[/INST]``), for the zero-shot MiniGPT-v2 baseline only (training
    refuses it)."""

    def __post_init__(self) -> None:
        if self.wording not in PROMPT_WORDINGS:
            raise ConfigError(f"model.prompts.wording must be one of {', '.join(PROMPT_WORDINGS)}, got {self.wording!r}")


@dataclass
class ModelConfig:
    """Composite config: vision tower + projection + language model + LoRA."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    merge_tokens: int = 4
    """Consecutive visual tokens concatenated before ``llama_proj`` (1×4 row-major strips)."""
    dtype: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."""
    init_from: Optional[str] = None
    """Weights to start from: a MiniGPT-v2 stage-3 / release ``.pth``, a project checkpoint
    (folder or ``.safetensors``) or a PEFT export folder (``python -m minigpt4.export``).
    Training starts a stage from here. A LoRA of other targets/rank than ``lora`` is stacked as a
    frozen adapter (the base weights are never modified)."""
    ckpt: Optional[str] = None
    """Weights to evaluate/serve, loaded after ``init_from`` (same formats)."""
    max_txt_len: int = 160
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_new_tokens: Optional[int] = None
    """Old spelling of ``generation.max_new_tokens`` (old configs, ``--options
    model.max_new_tokens=N``): when set it replaces ``generation.max_new_tokens`` and is reset
    to None, so read ``generation.max_new_tokens``."""
    gradient_checkpointing: bool = False
    """Recompute LLaMA decoder layers in the backward pass instead of keeping their activations."""
    checkpoint_every: int = 1
    """With ``gradient_checkpointing``: checkpoint decoder layers 0, n, 2n, … only (1 = every layer).
    Partial checkpointing trades recomputation for memory; ``python -m minigpt4.inspect --memory``
    predicts the peak of each choice (``minigpt4/memory.py``)."""
    seed: int = 0
    """Seed of the random initialisation (tiny models, llama_proj when nothing is loaded)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"model.dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.checkpoint_every <= 0:
            raise ConfigError(f"model.checkpoint_every must be positive, got {self.checkpoint_every}")
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
class DatasetConfig:
    """One prepared folder (output of ``python -m preprocessing``) used for one task."""

    root: str = MISSING
    task: str = MISSING
    """pancreas_detection | tumor_detection | organ_detection | tumor_classification."""
    sample_ratio: float = 1.0
    """Relative weight when several datasets are mixed (a whole batch comes from one dataset)."""
    threshold: Optional[float] = None
    """None = use the prepared split files as they are; a number = reselect slices with
    ``<target>_bbox_ratio > threshold`` from ``*_slices_info.json`` (the threshold study)."""
    organs: List[str] = field(default_factory=lambda: list(ORGANS))
    """organ_detection only: organs to keep."""

    def __post_init__(self) -> None:
        if self.task not in TASKS and self.task != MISSING:
            raise ConfigError(f"unknown dataset task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.sample_ratio <= 0:
            raise ConfigError(f"sample_ratio must be positive, got {self.sample_ratio}")
        unknown = sorted(set(self.organs) - set(ORGANS))
        if unknown:
            raise ConfigError(f"unknown organs {unknown}; expected a subset of {list(ORGANS)}")


@dataclass
class RunConfig:
    """Everything about one run that is not the model or the data."""

    output_dir: str = "output/run"
    seed: int = 42
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    # --- optimisation (paper §3.8; release batch 16) ---
    max_epoch: int = 50
    iters_per_epoch: Optional[int] = None
    """None = an epoch is one full pass over the mixed data; the release used 1000 iterations."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in total (smoke tests, interrupted-run tests)."""
    batch_size: int = 16
    """Per-process micro-batch."""
    grad_accum_steps: int = 1
    init_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    amp: str = "auto"
    """auto (bf16 autocast on GPU, none on CPU) | bf16 | fp16 (with GradScaler) | none."""
    num_workers: int = 2
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
    compile_pad_to_multiple_of: int = 64
    """With ``compile``: training prompts are padded to a multiple of this length (padding is
    masked: the loss is unchanged). 64 keeps two shapes at full size (320, 384) but pads a
    322-token batch by 19 %; a smaller multiple pads less and relies on dynamic shapes."""
    log_interval: int = 10
    resume: Optional[str] = None
    """None | auto (latest checkpoint in output_dir) | path of a checkpoint folder."""
    validate: bool = True
    """Evaluate on the ``val`` split at the end of every epoch and keep the best checkpoint."""
    val_max_samples: Optional[int] = None
    # --- evaluation ---
    eval_split: str = "test"
    eval_batch_size: int = 16
    eval_instruction: Optional[str] = None
    """Detection instruction of evaluation, ``{}`` = the target (``pancreas``, ``pancreatic
    tumor``, ...). None = the paper's first instruction ``[refer] Give me the location of the {}``
    (also used in training). The zero-shot MiniGPT-v2 baseline uses the release's wording."""

    def __post_init__(self) -> None:
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ConfigError(f"run.amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.eval_instruction is not None and self.eval_instruction.count("{}") != 1:
            raise ConfigError(
                f"run.eval_instruction needs exactly one {{}} for the target, got {self.eval_instruction!r}"
            )
        if self.eval_split not in ("train", "val", "test"):
            raise ConfigError(f"run.eval_split must be train, val or test, got {self.eval_split!r}")
        for name in ("batch_size", "grad_accum_steps", "eval_batch_size", "max_epoch", "compile_pad_to_multiple_of"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"run.{name} must be positive, got {getattr(self, name)}")


CASCADE_STAGES = ("pancreas_detection", "tumor_classification", "tumor_detection")
AGGREGATIONS = ("auto", "max", "top_k_mean")


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
class CascadeConfig:
    """``eval_cascade.py`` and the demo's three-stage mode (``cascade.stages`` set)."""

    stages: CascadeStagesConfig = field(default_factory=CascadeStagesConfig)
    threshold: Optional[float] = None
    """P(tumor) at or above which stage 3 is asked for a box and a volume is called tumor;
    None = chosen on the ``val`` volumes (Youden's J of the patient scores), never on test."""
    aggregation: str = "auto"
    """Patient score from the slices' P(tumor): ``max``, ``top_k_mean`` (mean of the ``top_k``
    largest) or ``auto`` (the one with the higher patient AUC on ``val``)."""
    top_k: int = 3
    crop_margin: int = 0
    """Pixels added around the predicted pancreas box: the ``--margin`` of the TC folder stage 2
    was trained on (``preprocessing tc``'s default is 0)."""
    bootstrap: int = 1000
    """Bootstrap replicates (over volumes) of the patient-level CIs; 0 = none."""
    max_volumes: Optional[int] = None
    """Scan at most this many volumes per folder and split (evenly spaced by name; quick runs such
    as the quickstart); None = all."""

    def __post_init__(self) -> None:
        if self.max_volumes is not None and self.max_volumes <= 0:
            raise ConfigError(f"cascade.max_volumes must be positive or null, got {self.max_volumes}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"cascade.aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"cascade.threshold must be in [0, 1] or null, got {self.threshold}")
        if self.top_k <= 0:
            raise ConfigError(f"cascade.top_k must be positive, got {self.top_k}")
        if self.crop_margin < 0:
            raise ConfigError(f"cascade.crop_margin must be >= 0, got {self.crop_margin}")
        if self.bootstrap < 0:
            raise ConfigError(f"cascade.bootstrap must be >= 0, got {self.bootstrap}")


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
        ConfigError: unknown key, wrong type, missing required value or invalid value; the
            message names the file and the key.
    """
    schema = OmegaConf.structured(Config)
    source = "defaults"
    try:
        merged = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            source = str(path)
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if options:
            source += " + --options " + " ".join(options)
            bad = [o for o in options if "=" not in o]
            if bad:
                raise ConfigError(f"--options expects key=value, got {bad}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(options)))
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
    from minigpt4.cli import add_debug_argument  # every entry point: errors as one line unless --debug

    add_debug_argument(parser)
