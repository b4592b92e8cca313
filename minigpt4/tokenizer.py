"""SentencePiece tokenizer: the real LLaMA-2 ``tokenizer.model`` or the project's tiny one.

Both go through the same class, so the tiny CPU models in tests tokenise exactly like the real
model does (``encode`` adds SentencePiece's dummy-prefix space and never a BOS; the prompt
builder in :mod:`minigpt4.prompts` adds the one BOS).

The tiny tokenizer (vocabulary :data:`TINY_VOCAB_SIZE`) is trained offline and deterministically
on the project's own text: the prompt templates, the target names, ``yes``/``no``, digits and
``{<x1><y1><x2><y2>}`` boxes. Digits and ``<``, ``>``, ``{``, ``}`` are single pieces so boxes
tokenise like they do with LLaMA-2, and byte fallback keeps any other text encodable. It is
cached in :func:`minigpt4.utils.cache_dir` under a hash of its training text and settings.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import sentencepiece as spm

from minigpt4.io import to_json, write_bytes_atomic
from minigpt4.utils import cache_dir
from minigpt4 import prompts

TINY_VOCAB_SIZE = 512
# Special ids follow LLaMA-2 (unk 0, bos 1, eos 2); the tiny model also has a real pad piece.
_TINY_TRAINER_ARGS = dict(
    vocab_size=TINY_VOCAB_SIZE,
    model_type="bpe",
    character_coverage=1.0,
    split_digits=True,
    byte_fallback=True,
    user_defined_symbols=["<", ">", "{", "}"],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    num_threads=1,
    shuffle_input_sentence=False,
    input_sentence_size=0,
    max_sentence_length=4096,
    hard_vocab_limit=True,
    minloglevel=2,  # the trainer logs every piece otherwise
)


class Tokenizer:
    """Thin wrapper over :class:`sentencepiece.SentencePieceProcessor`.

    Attributes:
        bos_id, eos_id, pad_id: special ids. LLaMA-2 has no pad piece: ``pad_id`` is then the
            unk id (0); padded positions are masked out and never carry loss, so any id works.
        vocab_size: number of pieces.
        path: the ``tokenizer.model`` file (None for a tokenizer built from bytes).
    """

    def __init__(self, model: Union[str, os.PathLike, bytes]) -> None:
        self.path: Optional[Path] = None
        if isinstance(model, (bytes, bytearray)):
            self.sp = spm.SentencePieceProcessor(model_proto=bytes(model))
        else:
            self.path = Path(model)
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"tokenizer file not found: {self.path} (the LLaMA-2 tokenizer.model ships with "
                    "Llama-2-7b-chat-hf; set model.text.tokenizer or model.text.path)"
                )
            self.sp = spm.SentencePieceProcessor()
            try:
                self.sp.Load(str(self.path))
            except (OSError, RuntimeError) as err:
                raise ValueError(f"{self.path}: not a SentencePiece model ({err})") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.vocab_size: int = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Text → ids, without BOS/EOS."""
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text; special ids (bos/eos/pad) are dropped."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special])

    def pieces(self, text: str) -> list[str]:
        """Text → pieces (debugging, tests)."""
        return self.sp.encode(text, out_type=str)

    def __repr__(self) -> str:
        source = str(self.path) if self.path else "in-memory"
        return f"Tokenizer({source}, vocab_size={self.vocab_size})"


def tiny_training_text() -> list[str]:
    """The sentences the tiny tokenizer is trained on (deterministic)."""
    # Local import: prompts imports torch only, no cycle, but keep this module light to import.

    lines: list[str] = []
    for target in prompts.TARGET_NAMES.values():
        for template in prompts.DETECTION_TEMPLATES:
            instruction = template.format(target)
            lines.append(prompts.PROMPT_BEFORE_IMAGE + " " + prompts.PROMPT_AFTER_IMAGE.format(instruction))
    for question in prompts.CLASSIFICATION_QUESTIONS:
        lines.append(prompts.PROMPT_BEFORE_IMAGE + " " + prompts.PROMPT_AFTER_IMAGE.format(question))
    lines += ["yes", "no", "Yes", "No", "yes.", "no."] * 8
    lines.append(" ".join(str(d) for d in range(10)))
    # boxes on the 0-100 grid from a fixed linear sequence (no RNG: identical everywhere)
    value = 7
    for _ in range(400):
        coords = []
        for _ in range(4):
            value = (value * 37 + 11) % 101
            coords.append(value)
        lines.append("{" + "".join(f"<{v}>" for v in coords) + "}")
    lines.append("{<0><0><0><0>}")
    return lines


def _tiny_key(lines: Sequence[str]) -> str:
    payload = to_json({"text": list(lines), "args": _TINY_TRAINER_ARGS, "spm": spm.__version__}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def train_tiny_tokenizer_bytes(lines: Optional[Sequence[str]] = None) -> bytes:
    """Train the tiny SentencePiece model in memory and return its serialized bytes."""
    lines = list(lines) if lines is not None else tiny_training_text()
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, **_TINY_TRAINER_ARGS)
    return buffer.getvalue()


def tiny_tokenizer_path() -> Path:
    """Path of the cached tiny ``tokenizer.model``; trained (a second or so) when absent."""
    lines = tiny_training_text()
    path = Path(cache_dir("tokenizers")) / f"tiny-{TINY_VOCAB_SIZE}-{_tiny_key(lines)}.model"
    if not path.is_file():
        write_bytes_atomic(path, train_tiny_tokenizer_bytes(lines))
    return path


def load_tokenizer(tokenizer_path: Optional[str] = None, text_path: Optional[str] = None) -> Tokenizer:
    """The tokenizer a text config asks for (``model.text.tokenizer`` / ``model.text.path``).

    ``tokenizer_path`` wins; else ``<text_path>/tokenizer.model``; else the tiny tokenizer.
    """
    if tokenizer_path is not None:
        return Tokenizer(tokenizer_path)
    if text_path is not None:
        path = Path(text_path) / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: tokenizer.model not found in the LLaMA-2 folder {text_path} "
                "(download Llama-2-7b-chat-hf from https://huggingface.co/meta-llama/Llama-2-7b-chat-hf)"
            )
        return Tokenizer(path)
    return Tokenizer(tiny_tokenizer_path())


def casing_piece_ids(tokenizer: Tokenizer, word: str) -> list[int]:
    """Ids of the single pieces that spell ``word`` in its casing variants (``yes``, ``Yes``,
    ``YES``), with and without SentencePiece's leading-space mark ``▁``; variants that are not
    one piece of the vocabulary are left out (their first piece, e.g. ``▁Y``, starts other words).

    LLaMA-2: ``casing_piece_ids(t, "yes")`` → ids of ``yes ▁yes Yes ▁Yes YES ▁YES``.
    """
    unk = tokenizer.sp.unk_id()
    ids: list[int] = []
    for variant in dict.fromkeys((word.lower(), word.capitalize(), word.upper())):
        for piece in (variant, "\u2581" + variant):
            piece_id = tokenizer.sp.piece_to_id(piece)
            if piece_id != unk and tokenizer.sp.id_to_piece(piece_id) == piece and piece_id not in ids:
                ids.append(piece_id)
    return ids
