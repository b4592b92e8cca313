"""MiniGPT-v2 for pancreas CT slices (SPEC §2–3), readable top to bottom.

The data flow, with full-size shapes (B images, 448 px)::

    images (B, 3, 448, 448)
      → visual_encoder   EVA ViT-g/14, 39 blocks, frozen        (B, 1 + 1024, 1408)
      → ln_vision        LayerNorm, identity affine, frozen     (B, 1 + 1024, 1408)
      → drop CLS, merge 4 consecutive tokens (1×4 strips)       (B, 256, 5632)
      → llama_proj       Linear(5632 → 4096), trainable         (B, 256, 4096)
      → splice into the token embeddings at the image positions of the prompt
        "<s>[INST] <Img>[256 slots]</Img> {instruction} [/INST] {answer}</s>"
      → llama_model      LLaMA-2 with LoRA adapters (peft), base frozen

Prompts come from :mod:`minigpt4.prompts` only (the one builder for training and inference):
right padding for training, left padding for generation. Trainable tensors are the LoRA
factors and ``llama_proj``; everything else stays frozen *and in eval mode* even after
``model.train()``. ``model.vision.trainable: true`` (off by default; a deviation for tiny models
trained from scratch) adds the ViT's weights to the trainable set, kept in fp32.

Example::

    model = build_model(cfg.model, device="cpu")
    out = model(images, ["[refer] Where is the pancreas?"], ["{<12><34><56><78>}"])
    out.loss.backward()
    model.generate(images, ["[refer] Where is the pancreas?"])   # ['{<12><34><56><78>}']
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.config import ModelConfig, TextConfig
from minigpt4.data.transforms import ImageTransform
from minigpt4.models.eva_vit import EvaViT, load_eva_weights
from minigpt4.prompts import build_prompt_tokens, pad_prompt_batch
from minigpt4.tokenizer import Tokenizer, load_tokenizer
from minigpt4.utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

LLAMA_SOURCE = "Llama-2-7b-chat-hf from https://huggingface.co/meta-llama/Llama-2-7b-chat-hf (~13.5 GB, license required)"
_PEFT_ADAPTER = "default"
# transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away)
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass
class MiniGPTOutput:
    """What :meth:`MiniGPTPancreas.forward` returns."""

    loss: Optional[torch.Tensor]  # scalar mean cross-entropy over answer tokens (+ </s>)
    logits: torch.Tensor  # (B, L, vocab)
    labels: torch.Tensor  # (B, L), IGNORE_INDEX outside the answers


def merge_visual_tokens(tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """Concatenate each run of ``merge`` consecutive tokens (row-major 1×merge strips).

    (B, N, C) → (B, N / merge, merge · C); token ``j`` of the output is
    ``cat(tokens[:, merge·j], …, tokens[:, merge·j + merge − 1])`` along the channels, as
    MiniGPT-v2's ``view(bs, pn / 4, hs * 4)``.
    """
    B, N, C = tokens.shape
    if N % merge:
        raise ValueError(f"{N} visual tokens are not divisible by merge_tokens={merge}")
    return tokens.reshape(B, N // merge, merge * C)


def stable_name(name: str) -> str:
    """A parameter name without peft's adapter segment (``lora_A.default.weight`` → ``lora_A.weight``).

    This is also the naming of peft 0.2, used by the MiniGPT-v2 and MiniGPT-Pancreas releases.
    """
    return name.replace(f".{_PEFT_ADAPTER}.", ".")


class MiniGPTPancreas(nn.Module):
    """EVA ViT-g → merge 4 → ``llama_proj`` → LLaMA-2 + LoRA.

    Build it with :func:`build_model`; the constructor takes ready parts and loads nothing.

    Args:
        cfg: the model config (sizes, LoRA, merge, generation length).
        llama: the bare ``LlamaForCausalLM`` (random or pretrained); LoRA is attached here.
        tokenizer: the matching tokenizer (None only for parameter counting on the meta device).
        dtype: dtype of the frozen parts (ViT, LLaMA base); trainable tensors stay fp32.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        llama: LlamaForCausalLM,
        tokenizer: Optional[Tokenizer],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_transform = ImageTransform(cfg.vision.image_size)
        self.num_visual_tokens = cfg.num_visual_tokens
        self.gradient_checkpointing = False
        # Frozen LoRA deltas merged into the base weights (see checkpoints.merge_lora_into_base);
        # kept so that a project checkpoint can reproduce its base exactly.
        self.merged_lora: list[dict] = []

        # a trained tower stays fp32 like every other trained tensor (AMP casts it on the fly)
        self.visual_encoder = EvaViT(cfg.vision).to(torch.float32 if cfg.vision.trainable else dtype)
        # BLIP-2's ln_vision is never trained nor stored anywhere: identity affine (SPEC §2)
        self.ln_vision = nn.LayerNorm(cfg.vision.width).to(dtype)
        hidden = llama.config.hidden_size
        self.llama_proj = nn.Linear(cfg.vision.width * cfg.merge_tokens, hidden)  # fp32: trained

        for part in (self.visual_encoder, self.ln_vision, llama):
            part.requires_grad_(False)
        if cfg.vision.trainable:
            self.visual_encoder.requires_grad_(True)
        lora = PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # autocast_adapter_dtype: LoRA factors in fp32 even on a bf16/fp16 base
        with warnings.catch_warnings():  # peft calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            self.llama_model = get_peft_model(llama, lora, autocast_adapter_dtype=True)
        self.train(False)

    # ------------------------------------------------------------------ parts
    @property
    def llama(self) -> LlamaForCausalLM:
        """The LLaMA inside the peft wrapper (shares its parameters)."""
        return self.llama_model.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen parts (the LLaMA base; the ViT too unless it is trained)."""
        return self.ln_vision.weight.dtype

    def train(self, mode: bool = True) -> "MiniGPTPancreas":
        """Train mode for the trainable parts only; frozen parts stay in eval mode.

        A trainable ViT (``model.vision.trainable``) follows ``mode`` (it has no dropout, so
        this changes nothing numerically either).

        LoRA dropout follows ``mode``. With gradient checkpointing, the decoder layers' own
        ``training`` flag follows ``mode`` too because HF only checkpoints in training mode;
        LLaMA has no dropout (attention_dropout 0), so this changes nothing numerically.
        """
        super().train(mode)
        self.visual_encoder.train(mode and self.cfg.vision.trainable)
        self.ln_vision.eval()
        for name, module in self.llama_model.named_modules():
            module.training = mode and "lora_dropout" in name
        if self.gradient_checkpointing:
            for layer in self.llama.model.layers:
                layer.training = mode
        return self

    def enable_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute LLaMA decoder layers in the backward pass (less memory, ~30 % slower)."""
        llama = self.llama
        new_api = hasattr(llama, "activation_checkpointing_enable")  # transformers >= 5.2x
        if enable and new_api:
            llama.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enable:
            llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif new_api:
            llama.activation_checkpointing_disable()
        else:
            llama.gradient_checkpointing_disable()
        self.gradient_checkpointing = enable
        self.train(self.training)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``{stable name: tensor}`` of LoRA factors and ``llama_proj`` (detached, same storage).

        Names: ``llama_proj.weight``, ``llama_proj.bias`` and
        ``llama_model.base_model.model.model.layers.{i}.self_attn.{q,k}_proj.lora_{A,B}.weight``;
        with ``model.vision.trainable`` also every ``visual_encoder.*`` tensor.
        """
        return {stable_name(n): p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ image → tokens
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) → projected visual tokens (B, N/merge, hidden) in the LLaMA dtype.

        A frozen tower runs without autograd (only ``llama_proj`` is differentiated); a trainable
        one (``model.vision.trainable``) is differentiated too.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        size = self.cfg.vision.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size} (model.vision.image_size), got {tuple(images.shape[-2:])}")
        trained = self.cfg.vision.trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(trained):
            tower = self.visual_encoder(images.to(self.device, self.visual_encoder.pos_embed.dtype))
            tokens = self.ln_vision(tower.to(self.ln_vision.weight.dtype))  # (B, 1+N, C)
        tokens = merge_visual_tokens(tokens[:, 1:], self.cfg.merge_tokens)  # drop CLS
        projected = self.llama_proj(tokens.to(self.llama_proj.weight.dtype))
        return projected.to(self.llama.get_input_embeddings().weight.dtype)

    def embed_inputs(self, input_ids: torch.Tensor, image_mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the visual tokens written at the ``image_mask`` positions.

        Args:
            input_ids: (B, L) prompt ids (image slots hold pad ids).
            image_mask: (B, L) bool, True at the image slots.
            visual: (B, N, hidden) projected visual tokens.
        Returns:
            (B, L, hidden) input embeddings.
        Raises:
            ValueError: the number of image slots and of images / visual tokens disagree.
        """
        slots = image_mask.sum(dim=1)
        if input_ids.shape[0] != visual.shape[0] or bool((slots != visual.shape[1]).any()):
            raise ValueError(
                f"image placeholders and images disagree: {input_ids.shape[0]} prompts with "
                f"{slots.tolist()} image slots, but {visual.shape[0]} images of {visual.shape[1]} visual tokens"
            )
        embeds = self.llama.get_input_embeddings()(input_ids)
        mask = image_mask.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, visual.to(embeds.dtype))

    # ------------------------------------------------------------------ prompts
    def tokenize(
        self,
        instructions: Sequence[str],
        answers: Optional[Sequence[str]] = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Prompts (and answers) → padded batch on the model device (see ``pad_prompt_batch``)."""
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer (meta device)")
        if answers is not None and len(answers) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
        samples = [
            build_prompt_tokens(
                self.tokenizer,
                instruction,
                self.num_visual_tokens,
                answer=None if answers is None else answers[i],
                max_answer_tokens=self.cfg.max_txt_len,
            )
            for i, instruction in enumerate(instructions)
        ]
        batch = pad_prompt_batch(samples, self.tokenizer.pad_id, padding_side)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _prepare(self, images: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if images.shape[0] != batch["input_ids"].shape[0]:
            raise ValueError(f"{images.shape[0]} images for {batch['input_ids'].shape[0]} prompts")
        return self.embed_inputs(batch["input_ids"], batch["image_mask"], self.encode_images(images))

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, instructions: Sequence[str], answers: Sequence[str]) -> MiniGPTOutput:
        """Teacher-forced forward pass; loss on the answer tokens and their ``</s>`` only.

        Args:
            images: (B, 3, S, S) normalised images (``model.image_transform``).
            instructions: B instructions, e.g. ``'[refer] Where is the pancreas?'``.
            answers: B answers, e.g. ``'{<12><34><56><78>}'`` or ``'yes'``.
        """
        batch = self.tokenize(instructions, answers, padding_side="right")
        embeds = self._prepare(images, batch)
        out = self.llama_model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        return MiniGPTOutput(loss=out.loss, logits=out.logits, labels=batch["labels"])

    # ------------------------------------------------------------------ inference
    @staticmethod
    def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
        # with left padding, real tokens must start at position 0 like an unpadded prompt
        return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    @torch.no_grad()
    def generate_ids(self, images: torch.Tensor, instructions: Sequence[str], max_new_tokens: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with a KV cache; (B, T) new token ids, ``pad_id`` after ``</s>``."""
        assert self.tokenizer is not None
        max_new_tokens = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        batch = self.tokenize(instructions, padding_side="left")
        embeds = self._prepare(images, batch)
        attention = batch["attention_mask"]
        positions = self._positions(attention)
        embed_tokens = self.llama.get_input_embeddings()
        finished = torch.zeros(len(instructions), dtype=torch.bool, device=self.device)
        out_ids, cache = [], None
        for _ in range(max_new_tokens):
            out = self.llama_model(
                inputs_embeds=embeds,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{_CACHE_KW: cache},
            )
            cache = getattr(out, _CACHE_KW)
            next_ids = out.logits[:, -1].argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.tokenizer.pad_id), next_ids)
            out_ids.append(next_ids)
            finished |= next_ids == self.tokenizer.eos_id
            if bool(finished.all()):
                break
            embeds = embed_tokens(next_ids[:, None])
            attention = torch.cat((attention, attention.new_ones(len(next_ids), 1)), dim=1)
            positions = positions[:, -1:] + 1
        if not out_ids:
            return torch.zeros(len(instructions), 0, dtype=torch.long, device=self.device)
        return torch.stack(out_ids, dim=1)

    def generate(self, images: torch.Tensor, instructions: Sequence[str], max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy answers, batched with left padding (equal to one-by-one generation).

        Args:
            images: (B, 3, S, S); instructions: B strings.
            max_new_tokens: default ``cfg.max_new_tokens`` (20, SPEC §3).
        Returns:
            B answers, decoded up to the first ``</s>``, stripped.
        """
        ids = self.generate_ids(images, instructions, max_new_tokens)
        answers = []
        for row in ids.tolist():
            if self.tokenizer.eos_id in row:
                row = row[: row.index(self.tokenizer.eos_id)]
            answers.append(self.tokenizer.decode(row).strip())
        return answers

    @torch.no_grad()
    def yes_probability(self, images: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) at the first answer token, shape (B,).

        P(yes) sums the probabilities of every casing variant of the word that is one piece
        (``yes Yes YES``, with and without the leading-space piece; :func:`casing_piece_ids`), and
        likewise P(no): an untuned model answering ``Yes`` puts its mass on ``▁Yes``, not ``▁yes``.
        """
        from minigpt4.tokenizer import casing_piece_ids

        assert self.tokenizer is not None
        yes_ids, no_ids = casing_piece_ids(self.tokenizer, "yes"), casing_piece_ids(self.tokenizer, "no")
        if not yes_ids or not no_ids:
            raise ValueError(f"{self.tokenizer}: no single piece spells yes or no; P(yes) is undefined")
        batch = self.tokenize(questions, padding_side="left")
        embeds = self._prepare(images, batch)
        out = self.llama_model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=self._positions(batch["attention_mask"]),
            use_cache=False,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()
        # log of summed probabilities; the softmax normaliser cancels in the ratio
        log_yes = torch.logsumexp(logits[:, yes_ids], dim=-1)
        log_no = torch.logsumexp(logits[:, no_ids], dim=-1)
        return torch.sigmoid(log_yes - log_no)


# ---------------------------------------------------------------------- building
def llama_config(text: TextConfig, tokenizer: Optional[Tokenizer]) -> LlamaConfig:
    """A ``LlamaConfig`` from the sizes in ``model.text`` (random-init models)."""
    return LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        bos_token_id=1 if tokenizer is None else tokenizer.bos_id,
        eos_token_id=2 if tokenizer is None else tokenizer.eos_id,
        pad_token_id=None if tokenizer is None else tokenizer.pad_id,
        tie_word_embeddings=False,
        # std 1/sqrt(hidden) (≈0.016 at 4096, the usual 0.02) keeps the logits of tiny random models
        # O(1), so that tests can overfit through LoRA + llama_proj with a frozen lm_head
        initializer_range=text.hidden_size**-0.5,
        attn_implementation="sdpa",
    )


def load_llama(text: TextConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """LLaMA-2 from a local Hugging Face folder (never downloads)."""
    path = Path(text.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LLaMA-2 folder not found or incomplete (no config.json): {path}; get {LLAMA_SOURCE}")
    kwargs: dict = {"dtype": dtype, "local_files_only": True, "attn_implementation": "sdpa"}
    if text.quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError(
                f"model.text.quantization={text.quantization} needs bitsandbytes (pip install '.[quant]')"
            ) from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=text.quantization == "8bit", load_in_4bit=text.quantization == "4bit", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}
    llama = LlamaForCausalLM.from_pretrained(str(path), **kwargs)
    return llama if text.quantization != "none" else llama.to(device)


def build_model(
    cfg: ModelConfig,
    device: Union[str, torch.device] = "cpu",
    load_weights: bool = True,
    tokenizer: Optional[Tokenizer] = None,
) -> MiniGPTPancreas:
    """Build the model described by ``cfg`` and load every weight file it names.

    Order: tokenizer → EVA (``vision.weights``) → LLaMA (``text.path``) → LoRA attached →
    ``init_from`` → ``ckpt`` (both through :func:`minigpt4.models.checkpoints.load_weights`).
    Parts without a weight file are randomly initialised from ``cfg.seed``. Nothing is
    downloaded.

    Args:
        cfg: ``config.model``.
        device: ``cpu``, ``cuda[:N]``, ``auto`` or ``meta`` (meta: no tokenizer, no weights,
            no memory; for parameter counting).
        load_weights: False skips every weight file (tests, benchmarks).
        tokenizer: use this tokenizer instead of the configured one (its vocabulary may be
            smaller than the LLaMA's).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    meta = device.type == "meta"
    configured = tokenizer is None
    if meta:
        load_weights = False
    elif tokenizer is None:
        tokenizer = load_tokenizer(cfg.text.tokenizer, cfg.text.path)
    # a random LLaMA must match the configured tokenizer; a passed-in tokenizer (benchmarks)
    # only needs to fit in the vocabulary (checked below)
    if configured and tokenizer is not None and cfg.text.path is None and tokenizer.vocab_size != cfg.text.vocab_size:
        raise ValueError(
            f"model.text.vocab_size={cfg.text.vocab_size} but the tokenizer {tokenizer.path} has "
            f"{tokenizer.vocab_size} pieces; set model.text.vocab_size={tokenizer.vocab_size}"
        )

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        if load_weights and cfg.text.path is not None:
            llama = load_llama(cfg.text, dtype, device)
            with torch.device(device):
                model = MiniGPTPancreas(cfg, llama, tokenizer, dtype)
        else:
            with torch.device(device):
                llama = LlamaForCausalLM(llama_config(cfg.text, tokenizer)).to(dtype)
                model = MiniGPTPancreas(cfg, llama, tokenizer, dtype)
    if tokenizer is not None and tokenizer.vocab_size > model.llama.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than the LLaMA vocabulary "
            f"({model.llama.config.vocab_size})"
        )
    if load_weights:
        if cfg.vision.weights is not None:
            load_eva_weights(model.visual_encoder, cfg.vision.weights)
        from minigpt4.models.checkpoints import load_weights as load_checkpoint_weights

        for path in (cfg.init_from, cfg.ckpt):
            if path is not None:
                load_checkpoint_weights(model, path)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model
