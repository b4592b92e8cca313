"""The LLaMA-2 inside :class:`~minigpt4.models.minigpt_v2.MiniGPTPancreas`: random-init from the
sizes in ``model.text``, or loaded from a local Hugging Face folder (never downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt4.config import TextConfig
from minigpt4.tokenizer import Tokenizer

LLAMA_SOURCE = "Llama-2-7b-chat-hf from https://huggingface.co/meta-llama/Llama-2-7b-chat-hf (~13.5 GB, license required)"


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
    # decoding is set by model.generation alone: LLaMA-2-chat's generation_config.json samples
    # (temperature 0.6, top-p 0.9), and HF fills every setting a call leaves open from it
    llama.generation_config = HFGenerationConfig(
        bos_token_id=llama.config.bos_token_id,
        eos_token_id=llama.config.eos_token_id,
        pad_token_id=llama.config.pad_token_id,
    )
    return llama if text.quantization != "none" else llama.to(device)
