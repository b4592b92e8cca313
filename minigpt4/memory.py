"""Predicted peak GPU memory of one training step, and the memory-preferred batch/checkpoint plan.

``python -m minigpt4.inspect --cfg-path CFG --memory`` prints every term. Three figures are
predicted: ``peak`` = ``torch.cuda.max_memory_allocated()`` of a training step (forward + backward
+ AdamW) under bf16 autocast on CUDA; ``reserved`` = ``max_memory_reserved()`` (the peak plus the
caching allocator's reserve, :data:`ALLOCATOR_RESERVE`); ``device`` = reserved + the CUDA context
(:data:`CUDA_CONTEXT_GIB`), what the card must hold. A plan fits when ``device`` ≤
:data:`BUDGET_GIB` (an A100-40GB, the paper's GPU).

The arithmetic, full size (EVA ViT-g + LLaMA-2-7B, LoRA r 64 on q,k, started from MiniGPT-v2
stage 3), batch B, sequence L::

    static   = frozen params × 2 B (bf16)                  7.725e9 × 2  = 14.39 GiB
             + trainables × 4 B (fp32)                     5.66e7 × 4   =  0.21 GiB
             + grads + 2 AdamW moments (fp32)              5.66e7 × 12  =  0.63 GiB
             + autocast bf16 copies of trainables          5.66e7 × 2   =  0.11 GiB
             + stacked frozen q,v adapter (fp32)           3.36e7 × 4   =  0.13 GiB
               and its bf16 copies, saved for backward     3.36e7 × 2   =  0.06 GiB (per micro-batch)
    per token per LLaMA layer (saved for backward, bf16 autocast, frozen base; CUDA):
        q, k (after rotary), v, attention output            4 × 4096 × 2 = 32,768
        attention logsumexp (fp32)                          32 × 4       =    128
        MLP gate, up, SiLU(gate) (for SiLU and ·)           3 × 11008 × 2 = 66,048
        2 RMSNorms: fp32 input copy + rsqrt                 2 × (4096 × 4 + 4) = 32,776
        LoRA, per trained target: bf16 input of A, A output 2 × (4096 + 64) × 2 = 16,640
            + dropout mask: CUDA's fused dropout keeps a bool mask   2 × 4096 × 1 =  8,192
              (CPU's dropout keeps an fp32 noise tensor, 2 × 4096 × 4 = 32,768; none at dropout 0)
                                                            -------------------- 156,552 B (CUDA)
        + rotary cos/sin, 2 × 128 × 2 = 512 B per token, one storage shared by every layer
        (CPU: 181,128 + 512 = 181,640 = :data:`MEASURED_LAYER_BYTES_PER_TOKEN`, measured at full
        width by :func:`measure_layer_saved_bytes`; the frozen q,v adapter saves no per-token
        tensor: its input needs no gradient of a weight. Both checked by ``tests/test_memory.py``.)
    activations = B × L × (layers_kept × 156,552 + layers_checkpointed × 4096 × 2 + 512)
                  + one layer recomputed during backward when any layer is checkpointed
    backward workspace ≈ one layer's activations (the gradients of its intermediates)
    head     = final norm (fp32 copies) + lm_head and cross-entropy at the ≈ 40 answer
               positions only: T × vocab × (2 + 4 + 4) B (bf16 logits, fp32 copy, log-softmax)
    frozen EVA, no grad: one block's transient tensors, (6 × 1408 + 2 × 6144) × 2 B per token,
               × 1025 tokens × B, at a time when no LLaMA activation exists yet

    peak     = static + max(EVA transient, activations + workspace + head)
    reserved = peak × (1 + ALLOCATOR_RESERVE);   device = reserved + CUDA context

Batch 16 × 326 tokens without checkpointing: peak ≈ 41.1 GiB, device ≈ 43.6 GiB (does not fit);
batch 8 × gradient accumulation 2: peak ≈ 28.3 GiB, device ≈ 30.2 GiB (fits, nothing recomputed): the default of every full-size
config in ``train_configs/`` (:func:`preferred_plan`). ``benchmarks/gpu_full_size.py`` records
the measured allocated and reserved peaks next to these predictions (with its own 322 tokens).

Sequence length: 256 visual tokens + the longest prompt (30 text tokens for detection, 33 for
classification, LLaMA-2 tokenizer) + the answer budget (40 tokens for detection, as the
benchmarks; 2 for ``yes``/``no`` + ``</s>``); ``run.compile`` pads to a multiple of 64.

Expected error (:data:`EXPECTED_ERROR`), not yet checked on a GPU: allocated peak ±8 % in eager
mode (the per-token figure is exact on CPU; CUDA kernels' own workspaces, SDPA's mask and the
cuBLAS workspace are not modelled); compiled layers may save less (fused elementwise ops), so the
prediction is an upper bound there; reserved ±15 % (fragmentation depends on the allocation
order); the context ±0.3 GiB (driver and library versions). ``python benchmarks/run_all.py
--import-device DIR`` prints measured ÷ predicted for each case of the first GPU run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from minigpt4.config import DETECTION_TASKS, Config, ModelConfig
from minigpt4.models.llama import llama_config

GIB = 2**30
BUDGET_GIB = 39.5
"""Device budget of an A100-40GB (the paper's GPU; ``total_memory`` ≈ 39.4–39.6 GiB): a plan
fits when its predicted ``device`` figure (allocated peak + allocator reserve + CUDA context) is
at most this."""
CUDA_CONTEXT_GIB = 0.5
"""CUDA context, cuBLAS/cuDNN handles and kernels (outside the caching allocator's figures)."""
ALLOCATOR_RESERVE = 0.05
"""Reserved above the allocated peak by the caching allocator (block rounding, fragmentation)."""
EXPECTED_ERROR = {"peak": 0.08, "reserved": 0.15, "device": 0.15}
"""Relative error the predictions are expected to stay within on a GPU (eager, bf16 autocast)."""
MEASURED_LAYER_BYTES_PER_TOKEN = 181_640
"""Bytes saved for backward per token by one full-size LLaMA decoder layer with LoRA r 64 on q,k
(dropout 0.05) under bf16 autocast: measured on CPU with :func:`measure_layer_saved_bytes`
(2026-11-27, torch 2.14.1, transformers 5.24); equals :func:`layer_bytes_per_token` on ``cpu``
+ :data:`ROTARY_BYTES_PER_TOKEN`. CPU dropout keeps fp32 noise: 32,768 B of this figure."""
DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": 4}
"""Bytes per element of the tensor dropout saves for backward: CUDA's fused kernel keeps a bool
mask, the CPU kernel an fp32 noise tensor (LoRA inputs are fp32)."""
PROMPT_TOKENS = {"detection": 30, "classification": 33}
"""Longest instruction text incl. ``<s>[INST] <Img></Img> … [/INST]`` in LLaMA-2 tokens."""
ANSWER_TOKENS = {"detection": 40, "classification": 2}
"""Answer budget incl. ``</s>``: a box is 16 tokens; 40 = the benchmarks' conservative length."""
EVA_TRANSIENT_WIDTHS = (6, 2)
"""EVA block transient per token: 6 × width (x, norm, qkv, attention out) + 2 × mlp_hidden (fc1, GELU)."""
MINIGPT_V2_ADAPTER = {"r": 64, "targets": ("q_proj", "v_proj")}
"""The LoRA of MiniGPT-v2's stage-3 checkpoint, stacked frozen on every model started from it
(``model.init_from``; the stage checkpoints carry it on)."""


def _act_bytes(cfg: ModelConfig) -> int:
    """Bytes of one activation element: bf16/fp16 under autocast on a GPU, fp32 for ``dtype: fp32``."""
    return 4 if cfg.dtype == "fp32" else 2


def rotary_bytes_per_token(cfg: ModelConfig) -> int:
    """cos + sin of one token: computed once per forward and shared by every layer."""
    return 2 * (cfg.text.hidden_size // cfg.text.num_heads) * _act_bytes(cfg)


def layer_bytes_per_token(cfg: ModelConfig, device: str = "cuda") -> int:
    """Bytes one LLaMA decoder layer saves for backward per token (see the module docstring).

    ``device``: ``cuda`` (bool dropout mask) or ``cpu`` (fp32 dropout noise), as
    :data:`DROPOUT_MASK_BYTES`; no mask at ``lora.dropout`` 0. The shared rotary cos/sin are not
    included (:func:`rotary_bytes_per_token`).
    """
    t, a = cfg.text, _act_bytes(cfg)
    lora_in = {"down_proj": t.intermediate_size}  # every other target reads the hidden state
    attention = 4 * t.hidden_size * a + t.num_heads * 4
    mlp = 3 * t.intermediate_size * a
    norms = 2 * (t.hidden_size * 4 + 4)
    mask = DROPOUT_MASK_BYTES[device] if cfg.lora.dropout > 0 else 0
    lora = sum((lora_in.get(m, t.hidden_size) + cfg.lora.r) * a + lora_in.get(m, t.hidden_size) * mask
               for m in cfg.lora.target_modules)
    return attention + mlp + norms + lora


def stacked_adapter_params(cfg: ModelConfig) -> int:
    """Parameters of the frozen adapters a run starting from ``init_from`` carries: MiniGPT-v2's
    stage-3 q,v LoRA (:data:`MINIGPT_V2_ADAPTER`) when ``init_from`` is set, else 0."""
    if cfg.init_from is None:
        return 0
    t, r = cfg.text, MINIGPT_V2_ADAPTER["r"]
    return t.num_layers * len(MINIGPT_V2_ADAPTER["targets"]) * r * (t.hidden_size + t.hidden_size)


def sequence_length(cfg: Config) -> int:
    """Training sequence length of the config's longest task (padded as ``run.compile`` pads)."""
    tasks = {d.task for d in cfg.datasets.values()} or {"pancreas_detection"}
    kinds = {"detection" if task in DETECTION_TASKS else "classification" for task in tasks}
    length = max(cfg.model.num_visual_tokens + PROMPT_TOKENS[k] + ANSWER_TOKENS[k] for k in kinds)
    if cfg.run.compile:
        length = math.ceil(length / 64) * 64
    return length


def answer_tokens(cfg: Config) -> int:
    tasks = {d.task for d in cfg.datasets.values()} or {"pancreas_detection"}
    return max(ANSWER_TOKENS["detection" if t in DETECTION_TASKS else "classification"] for t in tasks)


def checkpointed_layers(num_layers: int, gradient_checkpointing: bool, every: int) -> list[int]:
    """Indices of the checkpointed decoder layers: 0, every, 2·every, … (all with ``every`` 1)."""
    return list(range(0, num_layers, every)) if gradient_checkpointing else []


@dataclass(frozen=True)
class Plan:
    """One way to run the effective batch: micro-batch × accumulation, checkpointing."""

    batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    checkpoint_every: int = 1


def predict_memory(cfg: Config, counts: dict, plan: Optional[Plan] = None, seq_len: Optional[int] = None,
                   device: str = "cuda") -> dict:
    """Predicted peak GPU memory of a training step, in GiB, with its parts.

    Args:
        cfg: the run's config (model sizes, tasks, ``run.batch_size``, ``run.compile``, ``init_from``).
        counts: ``trainable_params`` and ``total_params`` (:func:`minigpt4.inspect.model_report`,
            without stacked adapters); optional ``stacked_adapter_params`` (frozen stacked LoRA,
            fp32), default :func:`stacked_adapter_params` of the config.
        plan: batch/checkpointing to predict for; None = the config's own.
        seq_len: tokens per sample actually run (a benchmark's own prompt); None = the config's
            longest (:func:`sequence_length`, padded when compiled).
        device: ``cuda`` or ``cpu`` dropout semantics (:func:`layer_bytes_per_token`).
    Returns:
        ``{"peak", "reserved", "device": GiB, "parts": {name: GiB}, "batch_size", "seq_len",
        "checkpointed_layers", "bytes_per_token_per_layer", "budget", "fits", "expected_error"}``.
    """
    m, t = cfg.model, cfg.model.text
    if plan is None:
        plan = Plan(cfg.run.batch_size, cfg.run.grad_accum_steps, m.gradient_checkpointing, m.checkpoint_every)
    a = _act_bytes(m)
    frozen_bytes = 4 if m.dtype == "fp32" else 2
    trainable = counts["trainable_params"]
    frozen = counts["total_params"] - trainable
    stacked = counts.get("stacked_adapter_params", stacked_adapter_params(m))
    B, L = plan.batch_size, seq_len if seq_len is not None else sequence_length(cfg)
    tokens = B * L
    ckpt = len(checkpointed_layers(t.num_layers, plan.gradient_checkpointing, plan.checkpoint_every))
    per_token = layer_bytes_per_token(m, device)
    per_layer = per_token * tokens
    parts = {
        "weights": frozen * frozen_bytes + trainable * 4,
        "grads_and_adamw": trainable * 4 * 3,
        "autocast_copies": trainable * a,
        # frozen adapter: fp32 factors + their autocast copies, saved for backward (not cached:
        # autocast caches casts of grad-requiring leaves only)
        "stacked_adapters": stacked * 4 + (stacked * a if a < 4 else 0),
    }
    activations = (t.num_layers - ckpt) * per_layer + ckpt * t.hidden_size * a * tokens
    activations += tokens * rotary_bytes_per_token(m)
    if ckpt:
        activations += per_layer  # the layer being recomputed in backward
    answer_positions = B * answer_tokens(cfg)
    head = tokens * (2 * t.hidden_size * 4 + t.hidden_size * a) + answer_positions * (
        t.hidden_size * a + t.vocab_size * (a + 4 + 4)
    )
    v = m.vision
    projection = B * m.num_visual_tokens * v.width * m.merge_tokens * a
    eva = B * (1 + v.num_patches) * (EVA_TRANSIENT_WIDTHS[0] * v.width + EVA_TRANSIENT_WIDTHS[1] * v.mlp_hidden) * a
    llm = activations + per_layer + head + projection  # + per_layer: backward workspace
    parts.update({"llama_activations": activations, "backward_workspace": per_layer, "head_and_projection":
                  head + projection, "eva_transient": eva})
    peak = sum(parts[k] for k in ("weights", "grads_and_adamw", "autocast_copies", "stacked_adapters")) + max(eva, llm)
    parts["allocator_reserve"] = peak * ALLOCATOR_RESERVE
    parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    reserved = peak + parts["allocator_reserve"]
    total = reserved + parts["cuda_context"]
    return {
        "peak": round(peak / GIB, 2), "reserved": round(reserved / GIB, 2), "device": round(total / GIB, 2),
        "parts": {k: round(val / GIB, 3) for k, val in parts.items()},
        "batch_size": B, "grad_accum_steps": plan.grad_accum_steps, "seq_len": L,
        "checkpointed_layers": ckpt, "bytes_per_token_per_layer": per_token,
        "rotary_bytes_per_token": rotary_bytes_per_token(m), "stacked_adapter_params": stacked,
        "dropout_semantics": device, "budget": BUDGET_GIB, "fits": total / GIB <= BUDGET_GIB,
        "expected_error": dict(EXPECTED_ERROR),
    }


def recomputed_fraction(cfg: ModelConfig, plan: Plan) -> float:
    """Share of the LLaMA decoder forward that checkpointing recomputes (0 = nothing)."""
    n = cfg.text.num_layers
    return len(checkpointed_layers(n, plan.gradient_checkpointing, plan.checkpoint_every)) / n


def candidate_plans(effective_batch: int, every: Sequence[int] = (8, 4, 3, 2, 1)) -> list[Plan]:
    """Every micro-batch dividing ``effective_batch`` × (no checkpointing, every n-th layer)."""
    plans = []
    for micro in sorted((b for b in range(1, effective_batch + 1) if effective_batch % b == 0), reverse=True):
        plans.append(Plan(micro, effective_batch // micro, False))
        plans += [Plan(micro, effective_batch // micro, True, n) for n in every]
    return plans


def preferred_plan(cfg: Config, counts: dict, effective_batch: int = 16, budget_gib: float = BUDGET_GIB) -> Plan:
    """The plan whose predicted ``device`` figure fits ``budget_gib`` with the fewest recomputed FLOPs, then the largest micro-batch.

    Until a GPU measurement says which is faster, recomputation is taken as the cost and a smaller
    micro-batch as free (at ≥ 8 × 326 tokens per matmul an H100 is still busy).
    """
    fitting = [p for p in candidate_plans(effective_batch) if predict_memory(cfg, counts, p)["device"] <= budget_gib]
    if not fitting:
        raise ValueError(f"no plan of effective batch {effective_batch} fits {budget_gib} GiB")
    return min(fitting, key=lambda p: (recomputed_fraction(cfg.model, p), -p.batch_size))


def measure_layer_saved_bytes(
    cfg: ModelConfig, seq_lens: Sequence[int] = (4, 12), dtype: str = "bf16"
) -> float:
    """Bytes saved for backward per token by one LLaMA decoder layer with LoRA, measured on CPU.

    Builds a one-layer LLaMA of ``cfg.text``'s widths (vocabulary 128: the embedding is not
    measured) with the config's LoRA, runs the layer in training mode under ``dtype`` autocast on a
    grad-requiring input, and counts the bytes of the distinct storages autograd saves
    (``torch.autograd.graph.saved_tensors_hooks``), frozen weights excluded. The slope between two
    sequence lengths removes per-layer constants (the autocast copies of the LoRA factors).
    """
    import dataclasses
    import warnings

    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM


    text = dataclasses.replace(cfg.text, num_layers=1, vocab_size=128)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    with torch.device("meta"):  # no random init of 200 M parameters: only shapes matter
        llama = LlamaForCausalLM(llama_config(text, None)).to(torch_dtype)
    llama = llama.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llama.parameters():  # values do not change what is saved; zeros avoid uninitialised NaNs
            p.zero_()
        llama.model.rotary_emb.inv_freq.copy_(
            1.0 / (10000 ** (torch.arange(0, text.hidden_size // text.num_heads, 2).float() / (text.hidden_size // text.num_heads))))
    llama.requires_grad_(False)
    lora = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(llama, lora, autocast_adapter_dtype=True)
    for name, module in model.named_modules():  # as MiniGPTPancreas.train(): only LoRA dropout trains
        module.training = "lora_dropout" in name
    base = model.get_base_model().model
    layer = base.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(length: int) -> int:
        seen: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.randn(1, length, text.hidden_size, generator=generator).to(torch_dtype).requires_grad_(True)
        positions = torch.arange(length)[None]
        with torch.autocast("cpu", dtype=torch_dtype, enabled=torch_dtype != torch.float32):
            rotary = base.rotary_emb(x, positions)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        del out
        return sum(seen.values())

    short, long = seq_lens
    return (saved_bytes(long) - saved_bytes(short)) / (long - short)
