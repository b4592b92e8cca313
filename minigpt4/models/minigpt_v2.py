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
factors of the trainable adapter and ``llama_proj``; everything else stays frozen *and in eval
mode* even after ``model.train()``.

``model.vision.trainable: true`` (off by default; a deviation for tiny models trained from
scratch) adds the ViT's weights to the trainable set, kept in fp32.

LoRA adapters form a stack on one never-modified base: the trainable adapter plus frozen named
adapters (:mod:`minigpt4.models.adapters`: :meth:`~MiniGPTPancreas.add_lora_adapter`,
:meth:`~MiniGPTPancreas.set_active_adapters`, :meth:`~MiniGPTPancreas.adapter_stack`,
:meth:`~MiniGPTPancreas.adapters_disabled`). The LLaMA itself comes from :mod:`minigpt4.models.llama`.

Example::

    model = build_model(cfg.model, device="cpu")
    out = model(images, ["[refer] Where is the pancreas?"], ["{<12><34><56><78>}"])
    out.loss.backward()
    model.generate(images, ["[refer] Where is the pancreas?"])   # ['{<12><34><56><78>}']
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LlamaForCausalLM

from minigpt4.config import DecodingConfig, ModelConfig
from minigpt4.data.transforms import ImageTransform
from minigpt4.models.adapters import LoraAdapterStack
from minigpt4.models.eva_vit import EvaViT, cast_vision_weights, load_eva_weights
from minigpt4.models.llama import llama_config, load_llama
from minigpt4.models.lora_names import PEFT_ADAPTER, stable_name
from minigpt4.prompts import IGNORE_INDEX, build_prompt_tokens, pad_prompt_batch
from minigpt4.tokenizer import Tokenizer, load_tokenizer
from minigpt4.utils import resolve_device, resolve_dtype
from minigpt4.tokenizer import casing_piece_ids
from minigpt4.models.checkpoints import load_weights as load_checkpoint_weights

log = logging.getLogger(__name__)


@dataclass
class MiniGPTOutput:
    """What :meth:`MiniGPTPancreas.forward` returns.

    Logits exist only at the T positions whose next token is supervised (the answer tokens and
    their ``</s>``, ≈ 40 of ≈ 322 per full-size sample), in row-major order: ``logits[k]``
    predicts ``targets[k]``, the k-th non-ignored entry of ``labels[:, 1:]``.
    """

    loss: Optional[torch.Tensor]  # scalar mean cross-entropy over answer tokens (+ </s>)
    logits: Optional[torch.Tensor]  # (T, vocab) at the answer positions only
    labels: torch.Tensor  # (B, L), IGNORE_INDEX outside the answers
    targets: Optional[torch.Tensor] = None  # (T,) the answer token ids the logits predict


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


class MiniGPTPancreas(LoraAdapterStack, nn.Module):
    """EVA ViT-g → merge 4 → ``llama_proj`` → LLaMA-2 + LoRA.

    Build it with :func:`build_model`; the constructor takes ready parts and loads nothing.

    Args:
        cfg: the model config (sizes, LoRA, merge, generation length).
        llama: the bare ``LlamaForCausalLM`` (random or pretrained); LoRA is attached here.
        tokenizer: the matching tokenizer (None only for parameter counting on the meta device).
        dtype: dtype of the frozen parts (ViT, LLaMA base); trainable tensors stay fp32.
        empty_vision: build the ViT on the meta device (no memory, no random init) because its
            weights are loaded next (:func:`~minigpt4.models.eva_vit.load_eva_weights` assigns them).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        llama: LlamaForCausalLM,
        tokenizer: Optional[Tokenizer],
        dtype: torch.dtype = torch.float32,
        empty_vision: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_transform = ImageTransform(cfg.vision.image_size)
        self.num_visual_tokens = cfg.num_visual_tokens
        self.gradient_checkpointing = False
        self.compiled = False  # compile_regions() was called
        # set by compile_regions(): training prompts are padded to a multiple of this length
        self.pad_to_multiple_of: Optional[int] = None
        # name → what adapter_stack() reports; insertion order is the stack order
        self._adapters: dict[str, dict] = {}
        self._trainable_adapter = PEFT_ADAPTER

        # MiniGPT-v2's precision policy: only Conv/Linear weights in `dtype`, LayerNorms, position
        # embedding and residual stream fp32; a trained tower is all fp32 (AMP casts on the fly)
        with torch.device("meta") if empty_vision else contextlib.nullcontext():
            tower = EvaViT(cfg.vision)
        self.visual_encoder = cast_vision_weights(tower, torch.float32 if cfg.vision.trainable else dtype)
        # BLIP-2's ln_vision is never trained nor stored anywhere: identity affine (SPEC §2), fp32
        self.ln_vision = nn.LayerNorm(cfg.vision.width)
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
        self._adapters[PEFT_ADAPTER] = {
            "name": PEFT_ADAPTER, "targets": sorted(cfg.lora.target_modules), "r": cfg.lora.r,
            "alpha": float(cfg.lora.alpha), "source": None, "sha256": None, "trainable": True,
        }
        self._refreeze_adapters()
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
        """dtype of the frozen parts: the LLaMA base, the ViT's Conv/Linear weights (unless trained)."""
        return self.llama.get_input_embeddings().weight.dtype

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
        # only the trainable adapter's dropout: frozen adapters compute exactly what they computed
        trained_dropout = f"lora_dropout.{self._trainable_adapter}"
        for name, module in self.llama_model.named_modules():
            module.training = mode and name.endswith(trained_dropout)
        if self.gradient_checkpointing:
            for layer in self.llama.model.layers:
                layer.training = mode
        return self

    def enable_gradient_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute LLaMA decoder layers in the backward pass (less memory, ~30 % slower with all layers).

        Args:
            enable: checkpoint (True) or keep every activation (False).
            every: checkpoint layers 0, every, 2·every, … only (``model.checkpoint_every``);
                the other layers keep their activations and cost no recomputation.
        """
        if every <= 0:
            raise ValueError(f"checkpoint every must be positive, got {every}")
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
        if enable:
            # HF switches every layer on (its own every_n_layers is newer than transformers 5.17):
            # switch the skipped layers off again through the same per-layer flag
            for index, layer in enumerate(llama.model.layers):
                layer.gradient_checkpointing = index % every == 0
        self.gradient_checkpointing = enable
        self.train(self.training)

    def compile_regions(self, pad_to_multiple_of: int = 64, backend: str = "inductor") -> None:
        """``run.compile``: ``torch.compile`` each LLaMA decoder layer and each EVA block on its own.

        Regional compilation: identical blocks share one compiled graph (compile time of one
        block, not of the whole model), and most of the step's memory-bound elementwise work
        (RMSNorm, rotary, SiLU·mul, LoRA scaling, residuals) is fused. Compiled in place
        (``nn.Module.compile``), so parameter names and checkpoints are unchanged. Training prompts
        are padded to a multiple of ``pad_to_multiple_of`` so that few shapes (and recompiles)
        occur. The trainer validates under :meth:`eager_layers`. ``backend``: a
        ``torch.compile`` backend (``aot_eager`` in tests: graph capture without code generation).
        """
        for block in self.visual_encoder.blocks:
            block.compile(backend=backend)
        for layer in self.llama.model.layers:
            layer.compile(backend=backend)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.compiled = True

    def eager_layers(self):
        """Context in which compiled layers run eagerly (``torch.compiler.set_stance``, torch ≥ 2.6).

        For generation during training: decoding shapes (one new token, a growing KV cache,
        per-layer cache indices) would recompile every layer many times for a short validation pass.
        """
        if self.compiled and hasattr(torch.compiler, "set_stance"):
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``{stable name: parameter}`` of everything trained (see :meth:`trainable_state_dict`)."""
        return {stable_name(n, self._trainable_adapter): p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``{stable name: tensor}`` of the trainable adapter's LoRA factors and ``llama_proj``
        (detached, same storage). Frozen stacked adapters are not in it.

        Names: ``llama_proj.weight``, ``llama_proj.bias`` and
        ``llama_model.base_model.model.model.layers.{i}.self_attn.{q,k}_proj.lora_{A,B}.weight``;
        with ``model.vision.trainable`` also every ``visual_encoder.*`` tensor.
        """
        return {name: p.detach() for name, p in self.trainable_parameters().items()}

    # ------------------------------------------------------------------ image → tokens
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) → projected visual tokens (B, N/merge, hidden) in the LLaMA dtype.

        ``project_visual(encode_tower(images))``; the frozen-feature cache
        (``run.cache_visual_features``) stores what ``encode_tower`` returns and calls
        ``project_visual`` itself.
        """
        return self.project_visual(self.encode_tower(images))

    def encode_tower(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) → ViT + ``ln_vision`` tokens (B, 1 + N, C), CLS first.

        A frozen tower runs without autograd; a trainable one (``model.vision.trainable``) is
        differentiated when grad is enabled.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        size = self.cfg.vision.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size} (model.vision.image_size), got {tuple(images.shape[-2:])}")
        trained = self.cfg.vision.trainable and torch.is_grad_enabled()
        with torch.set_grad_enabled(trained):
            tower = self.visual_encoder(images.to(self.device, torch.float32))  # (B, 1+N, C) fp32
            return self.ln_vision(tower.float())  # fp32 like BLIP-2's LayerNorm subclass

    def project_visual(self, tower_tokens: torch.Tensor) -> torch.Tensor:
        """Tower tokens (B, 1 + N, C) → drop CLS, merge, ``llama_proj`` → (B, N/merge, hidden) in the LLaMA dtype."""
        expected = (1 + self.cfg.vision.num_patches, self.cfg.vision.width)
        if tower_tokens.ndim != 3 or tuple(tower_tokens.shape[1:]) != expected:
            raise ValueError(f"tower tokens must be (B, {expected[0]}, {expected[1]}), got {tuple(tower_tokens.shape)}")
        tokens = merge_visual_tokens(tower_tokens[:, 1:].to(self.device), self.cfg.merge_tokens)  # drop CLS
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
        pad_to_multiple_of: Optional[int] = None,
        to_device: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Prompts (and answers) → padded batch on the model device (see ``pad_prompt_batch``);
        ``to_device=False`` leaves it on the CPU."""
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
                wording=self.cfg.prompts.wording,
            )
            for i, instruction in enumerate(instructions)
        ]
        batch = pad_prompt_batch(samples, self.tokenizer.pad_id, padding_side, pad_to_multiple_of=pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in batch.items()} if to_device else batch

    def _prepare(
        self, images: Optional[torch.Tensor], batch: dict[str, torch.Tensor], tower_tokens: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if (images is None) == (tower_tokens is None):
            raise ValueError("pass either images or tower_tokens (cached ViT features), not both or neither")
        source = images if images is not None else tower_tokens
        if source.shape[0] != batch["input_ids"].shape[0]:
            raise ValueError(f"{source.shape[0]} images for {batch['input_ids'].shape[0]} prompts")
        visual = self.encode_images(images) if images is not None else self.project_visual(tower_tokens)
        return self.embed_inputs(batch["input_ids"], batch["image_mask"], visual)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        images: Optional[torch.Tensor],
        instructions: Sequence[str],
        answers: Sequence[str],
        tower_tokens: Optional[torch.Tensor] = None,
    ) -> MiniGPTOutput:
        """Teacher-forced forward pass; loss on the answer tokens and their ``</s>`` only.

        The decoder runs to its last hidden states (B, L, hidden); ``lm_head`` and the
        cross-entropy are applied only at the T positions whose next token is supervised, so
        the full (B, L, vocab) logits never exist (at full size: ≈ 40 of ≈ 322 positions, and
        no 2.6 GB fp32 logits tensor held through backward at batch 16). The loss equals HF's
        shifted mean cross-entropy over all answer tokens of the batch.

        Args:
            images: (B, 3, S, S) normalised images (``model.image_transform``), or None with
                ``tower_tokens``.
            instructions: B instructions, e.g. ``'[refer] Where is the pancreas?'``.
            answers: B answers, e.g. ``'{<12><34><56><78>}'`` or ``'yes'``.
            tower_tokens: (B, 1 + N, C) cached ``encode_tower`` output instead of ``images``.
        """
        cpu_batch = self.tokenize(
            instructions, answers, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of, to_device=False
        )
        # answer positions found on the CPU: no device sync in the middle of the step
        labels = cpu_batch["labels"]  # (B, L)
        length = labels.shape[1]
        rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # position t predicts token t+1
        flat_positions = (rows * length + cols).to(self.device, non_blocking=True)  # (T,) into (B·L)
        targets = labels[rows, cols + 1].to(self.device, non_blocking=True)  # (T,)
        batch = {k: v.to(self.device) for k, v in cpu_batch.items()}
        embeds = self._prepare(images, batch, tower_tokens)
        hidden = self.llama.model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state  # (B, L, hidden), after the final norm
        answer_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_positions)  # (T, hidden)
        logits = self.llama.lm_head(answer_hidden)  # (T, vocab)
        loss = F.cross_entropy(logits.float(), targets)  # fp32 like HF's ForCausalLMLoss
        return MiniGPTOutput(loss=loss, logits=logits, labels=batch["labels"], targets=targets)

    # ------------------------------------------------------------------ inference
    @staticmethod
    def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
        # with left padding, real tokens must start at position 0 like an unpadded prompt
        return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def generation_config(self, decoding: Optional[DecodingConfig] = None, max_new_tokens: Optional[int] = None) -> HFGenerationConfig:
        """The HF ``GenerationConfig`` for ``decoding`` (default ``cfg.generation``).

        Every setting is explicit, so nothing comes from the LLaMA folder's own defaults.
        ``min_new_tokens=1`` keeps ``</s>`` from being the first token (MiniGPT-v2 passes
        ``min_length=1``), so an answer is never empty.
        """
        assert self.tokenizer is not None
        decoding = self.cfg.generation if decoding is None else decoding
        settings = {
            "max_new_tokens": decoding.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "min_new_tokens": 1,
            "num_beams": decoding.num_beams,
            "do_sample": decoding.do_sample,
            "bos_token_id": self.tokenizer.bos_id,
            "eos_token_id": self.tokenizer.eos_id,
            "pad_token_id": self.tokenizer.pad_id,
        }
        if decoding.do_sample:  # set only when sampling: HF warns about unused sampling settings
            settings.update(temperature=decoding.temperature, top_p=decoding.top_p)
        if decoding.repetition_penalty != 1.0:
            settings["repetition_penalty"] = decoding.repetition_penalty
        return HFGenerationConfig(**settings)

    @torch.no_grad()
    def generate_ids(
        self,
        images: Optional[torch.Tensor],
        instructions: Sequence[str],
        max_new_tokens: Optional[int] = None,
        decoding: Optional[DecodingConfig] = None,
        tower_tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """HF ``generate(inputs_embeds=..., attention_mask=...)`` on the peft model, as MiniGPT-v2.

        Prompts are left-padded; HF derives the position ids from the attention mask, so every
        prompt starts at position 0 and a batch gives the answers of one-by-one generation.
        ``tower_tokens`` (B, 1 + N, C) (``encode_tower`` output, e.g. from the feature cache)
        replace ``images``, as in :meth:`forward`.

        Returns:
            (B, T) new token ids only (no prompt), ``pad_id`` after a row's ``</s>``.
        """
        batch = self.tokenize(instructions, padding_side="left")
        embeds = self._prepare(images, batch, tower_tokens)
        with warnings.catch_warnings():
            # a repetition penalty sees the new tokens only (no prompt ids): so in MiniGPT-v2 too
            warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")
            return self.llama_model.generate(
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                generation_config=self.generation_config(decoding, max_new_tokens),
            )

    def generate(
        self,
        images: Optional[torch.Tensor],
        instructions: Sequence[str],
        max_new_tokens: Optional[int] = None,
        decoding: Optional[DecodingConfig] = None,
        tower_tokens: Optional[torch.Tensor] = None,
    ) -> list[str]:
        """Answers, batched with left padding (greedy by default: equal to one-by-one generation).

        Args:
            images: (B, 3, S, S), or None with ``tower_tokens``; instructions: B strings.
            max_new_tokens: default ``decoding.max_new_tokens`` (20, SPEC §3).
            decoding: greedy / beams / sampling settings; default ``cfg.generation``.
            tower_tokens: (B, 1 + N, C) ``encode_tower`` output instead of ``images``.
        Returns:
            B answers, decoded up to the first ``</s>``, stripped.
        """
        ids = self.generate_ids(images, instructions, max_new_tokens, decoding, tower_tokens)
        answers = []
        for row in ids.tolist():
            if self.tokenizer.eos_id in row:
                row = row[: row.index(self.tokenizer.eos_id)]
            answers.append(self.tokenizer.decode(row).strip())
        return answers

    @torch.no_grad()
    def yes_probability(
        self, images: Optional[torch.Tensor], questions: Sequence[str], tower_tokens: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) at the first answer token, shape (B,).

        ``images`` (B, 3, S, S), or None with ``tower_tokens`` (B, 1 + N, C) as in :meth:`generate`.

        P(yes) sums the probabilities of every casing variant of the word that is one piece
        (``yes Yes YES``, with and without the leading-space piece; :func:`casing_piece_ids`), and
        likewise P(no): an untuned model answering ``Yes`` puts its mass on ``▁Yes``, not ``▁yes``.
        """
        assert self.tokenizer is not None
        yes_ids, no_ids = casing_piece_ids(self.tokenizer, "yes"), casing_piece_ids(self.tokenizer, "no")
        if not yes_ids or not no_ids:
            raise ValueError(f"{self.tokenizer}: no single piece spells yes or no; P(yes) is undefined")
        batch = self.tokenize(questions, padding_side="left")
        embeds = self._prepare(images, batch, tower_tokens)
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

    # a ViT whose weights are loaded below is built empty (meta) and filled by assignment: at full
    # size this saves 4 GB of fp32 random init next to the loaded LLaMA (peak host memory)
    empty_vision = load_weights and cfg.vision.weights is not None
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        if load_weights and cfg.text.path is not None:
            llama = load_llama(cfg.text, dtype, device)
            with torch.device(device):
                model = MiniGPTPancreas(cfg, llama, tokenizer, dtype, empty_vision=empty_vision)
        else:
            with torch.device(device):
                llama = LlamaForCausalLM(llama_config(cfg.text, tokenizer)).to(dtype)
                model = MiniGPTPancreas(cfg, llama, tokenizer, dtype, empty_vision=empty_vision)
    if tokenizer is not None and tokenizer.vocab_size > model.llama.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than the LLaMA vocabulary "
            f"({model.llama.config.vocab_size})"
        )
    if load_weights:
        if cfg.vision.weights is not None:
            load_eva_weights(model.visual_encoder, cfg.vision.weights, device=device)

        for path in (cfg.init_from, cfg.ckpt):
            if path is not None:
                load_checkpoint_weights(model, path)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(every=cfg.checkpoint_every)
    return model
