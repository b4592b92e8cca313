"""The one prompt builder shared by training, evaluation and the demo (SPEC §3).

A sequence is MiniGPT-v2's training stream, token for token::

    <s> [INST] <Img> [256 image embeddings] </Img> {instruction}  [/INST] {answer}</s>

MiniGPT-v2 trains on its template ``[INST] {} [/INST]`` around its datasets' instruction
``<Img><ImageHere></Img> {} `` (with a trailing space), so two spaces stand before ``[/INST]``;
the text is tokenised in two pieces split at the image, each with SentencePiece's dummy-prefix
space and no BOS, and one BOS is put in front. LLaMA-2's SentencePiece keeps both spaces: an extra
``▁`` (id 29871) before ``▁[/INST]``. Training and inference use this one stream, so they cannot
drift. ``model.prompts.wording: release`` instead gives the MiniGPT-Pancreas release's evaluation
wording and inference stream (its conversation template: a literal ``<s>`` after the tokenizer's
own BOS, i.e. two BOS, and one space before ``[/INST]``), for the zero-shot MiniGPT-v2 baseline.

Only the answer tokens and its ``</s>`` carry loss. Image embeddings occupy placeholder
positions marked by ``image_mask``; the model writes the projected visual tokens there (the
HF-llava pattern), so padding on either side never shifts them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch

IGNORE_INDEX = -100

DETECTION_TEMPLATES = (
    "[refer] Give me the location of the {}",
    "[refer] Give me the position of the {}",
    "[refer] Where is the {}?",
    "[refer] Where is located the {} in this image?",
    "[refer] Which is the position of the {}?",
    "[refer] From this image, tell me the location of the {}",
    "[refer] Could you tell me the location of the {}?",
    "[refer] Where can I locate the {}?",
)

CLASSIFICATION_QUESTIONS = (
    "[vqa] Does the pancreas in the image present a tumor?",
    "[vqa] Is there a tumor in the pancreas shown in the image?",
    "[vqa] Can you see a tumor in the pancreas in this picture?",
    "[vqa] Does the image show a tumor in the pancreas?",
    "[vqa] Is a pancreatic tumor visible in the image?",
    "[vqa] Is the pancreas in this image showing signs of a tumor?",
    "[vqa] Is the pancreas in the image affected by a tumor?",
    "[vqa] Does the pancreas in the picture have a tumor?",
)

# The MiniGPT-Pancreas release evaluated detection with this lowercase wording (its eval datasets,
# ``f"[refer] give me the location of the {sent}"``) and tumor classification with this question
# (its TC eval dataset); the zero-shot MiniGPT-v2 baseline is sensitive to wording, so
# eval_configs/minigptv2_baseline.yaml asks with them (model.prompts.wording: release).
RELEASE_EVAL_TEMPLATE = "[refer] give me the location of the {}"
RELEASE_EVAL_QUESTION = "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?"

# target names as they appear in instructions, per task / organ
TARGET_NAMES = {
    "pancreas": "pancreas",
    "tumor": "pancreatic tumor",
    "liver": "liver",
    "kidney": "kidney",
    "spleen": "spleen",
}

IMAGE_PLACEHOLDER = "<ImageHere>"
# MiniGPT-v2's training text: "[INST] {} [/INST]" around "<Img><ImageHere></Img> {} " (two spaces)
TRAINING_PROMPT = "[INST] <Img><ImageHere></Img> {}  [/INST]"
# the release's inference text: its conversation roles "<s>[INST] " and " [/INST]" around
# "<Img><ImageHere></Img> {}" (one space); the "<s>" is a second BOS (PromptWording.bos_count)
RELEASE_INFERENCE_PROMPT = "[INST] <Img><ImageHere></Img> {} [/INST]"
PROMPT_BEFORE_IMAGE, PROMPT_AFTER_IMAGE = TRAINING_PROMPT.split(IMAGE_PLACEHOLDER)


@dataclass(frozen=True)
class PromptWording:
    """What evaluation asks and how every prompt is laid out in tokens (``model.prompts.wording``).

    Attributes:
        name: ``paper`` (default) or ``release``.
        prompt: the text around the image, ``<ImageHere>`` = the image, ``{}`` = the instruction.
        bos_count: BOS ids in front of the prompt.
        detection_template: the evaluation's detection instruction (``{}`` = the target);
            ``run.eval_instruction`` overrides it.
        classification_question: the evaluation's yes/no question.
    """

    name: str
    prompt: str
    bos_count: int
    detection_template: str
    classification_question: str


WORDINGS = {
    "paper": PromptWording("paper", TRAINING_PROMPT, 1, DETECTION_TEMPLATES[0], CLASSIFICATION_QUESTIONS[0]),
    "release": PromptWording("release", RELEASE_INFERENCE_PROMPT, 2, RELEASE_EVAL_TEMPLATE, RELEASE_EVAL_QUESTION),
}


def prompt_wording(name: str) -> PromptWording:
    """The :class:`PromptWording` called ``name`` (``model.prompts.wording``)."""
    if name not in WORDINGS:
        raise ValueError(f"prompt wording must be one of {', '.join(WORDINGS)}, got {name!r}")
    return WORDINGS[name]


def detection_instruction(target: str, rng: Optional[random.Random] = None, template: Optional[str] = None) -> str:
    """A detection instruction for ``target`` (an instruction name such as ``'pancreatic tumor'``).

    With ``rng`` one of the 8 paper templates is drawn (training); without, ``template`` (one
    ``{}`` for the target, ``run.eval_instruction``) or else the first paper template is used
    (evaluation and the demo's quick buttons).
    """
    if rng is not None:
        return rng.choice(DETECTION_TEMPLATES).format(target)
    return (DETECTION_TEMPLATES[0] if template is None else template).format(target)


def classification_question(rng: Optional[random.Random] = None) -> str:
    """A yes/no tumor question: random in training, the first one for evaluation."""
    return rng.choice(CLASSIFICATION_QUESTIONS) if rng is not None else CLASSIFICATION_QUESTIONS[0]


def prompt_text(instruction: str, wording: str = "paper") -> str:
    """Human-readable form of the prompt (logs, demo); the image is shown as ``<ImageHere>``."""
    before, after = prompt_wording(wording).prompt.split(IMAGE_PLACEHOLDER)
    return before + IMAGE_PLACEHOLDER + after.format(instruction)


def token_recipe(num_image_tokens: int, wording: str = "paper") -> list[str]:
    """Python lines that build the token stream :func:`build_prompt_tokens` builds (for a PEFT
    user outside this project, e.g. an export's README): they need ``tok`` (``encode`` without BOS,
    ``bos_id``, ``pad_id``) and ``instruction``, and leave ``ids`` (placeholders where the visual
    tokens go) and ``image_slots``. Generated from :data:`WORDINGS`, so it cannot drift."""
    layout = prompt_wording(wording)
    before, after = layout.prompt.split(IMAGE_PLACEHOLDER)
    return [
        f"before = [tok.bos_id] * {layout.bos_count} + tok.encode({before!r})",
        f"after = tok.encode({after!r}.format(instruction))",
        f"image_slots = range(len(before), len(before) + {num_image_tokens})  # the visual tokens go here",
        f"ids = before + [tok.pad_id] * {num_image_tokens} + after",
    ]


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class PromptTokens:
    """One tokenised sample. All tensors are 1-D of the same length L."""

    input_ids: torch.Tensor  # (L,) long; image positions hold pad_id
    image_mask: torch.Tensor  # (L,) bool; True where visual tokens go
    labels: torch.Tensor  # (L,) long; IGNORE_INDEX except answer + </s>


def build_prompt_tokens(
    tokenizer: TextTokenizer,
    instruction: str,
    num_image_tokens: int,
    answer: Optional[str] = None,
    max_answer_tokens: Optional[int] = None,
    wording: str = "paper",
) -> PromptTokens:
    """Tokenise one prompt (and answer, for training).

    The text before and after the image is encoded separately (each piece with SentencePiece's
    dummy-prefix space, as MiniGPT-v2 does), BOS ids in front; the answer is encoded on its own and
    followed by ``</s>``. Without ``answer`` the sequence ends after ``[/INST]`` (generation input).
    ``wording``: ``paper`` (MiniGPT-v2's training stream) or ``release`` (see :data:`WORDINGS`).
    """
    layout = prompt_wording(wording)
    before_text, after_text = layout.prompt.split(IMAGE_PLACEHOLDER)
    before = [tokenizer.bos_id] * layout.bos_count + tokenizer.encode(before_text)
    after = tokenizer.encode(after_text.format(instruction))
    ids = before + [tokenizer.pad_id] * num_image_tokens + after
    image_mask = [False] * len(before) + [True] * num_image_tokens + [False] * len(after)
    labels = [IGNORE_INDEX] * len(ids)
    if answer is not None:
        answer_ids = tokenizer.encode(answer)
        if max_answer_tokens is not None:
            answer_ids = answer_ids[: max_answer_tokens - 1]
        answer_ids = answer_ids + [tokenizer.eos_id]
        ids += answer_ids
        image_mask += [False] * len(answer_ids)
        labels += answer_ids
    return PromptTokens(
        input_ids=torch.tensor(ids, dtype=torch.long),
        image_mask=torch.tensor(image_mask, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
    )


def pad_prompt_batch(
    samples: Sequence[PromptTokens], pad_id: int, padding_side: str, pad_to_multiple_of: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """Stack samples into a batch: right padding for training, left padding for generation.

    ``pad_to_multiple_of`` rounds the length L up (``run.compile``: a compiled layer sees few
    distinct shapes, so it recompiles a bounded number of times). Padding is masked and carries
    no labels, so it does not change the loss.

    Returns ``input_ids`` (B, L), ``attention_mask`` (B, L), ``image_mask`` (B, L), ``labels`` (B, L).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    length = max(len(s.input_ids) for s in samples)
    if pad_to_multiple_of is not None:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(samples), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        "image_mask": torch.zeros((len(samples), length), dtype=torch.bool),
        "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
    }
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        batch["input_ids"][row, span] = s.input_ids
        batch["attention_mask"][row, span] = 1
        batch["image_mask"][row, span] = s.image_mask
        batch["labels"][row, span] = s.labels
    return batch
