"""The one prompt builder: token layout, image placeholders, loss mask and padding sides."""

import random

import pytest
import torch

from minigpt4.prompts import (
    CLASSIFICATION_QUESTIONS,
    DETECTION_TEMPLATES,
    IGNORE_INDEX,
    build_prompt_tokens,
    classification_question,
    detection_instruction,
    pad_prompt_batch,
    prompt_text,
    prompt_wording,
)


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary: enough to check positions exactly."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return " ".join(inverse[i] for i in ids if i in inverse)


def test_paper_instruction_lists():
    assert len(DETECTION_TEMPLATES) == 8 and len(CLASSIFICATION_QUESTIONS) == 8
    assert detection_instruction("pancreas") == "[refer] Give me the location of the pancreas"
    assert classification_question() == "[vqa] Does the pancreas in the image present a tumor?"
    rng = random.Random(0)
    drawn = {detection_instruction("liver", rng) for _ in range(200)}
    assert drawn == {t.format("liver") for t in DETECTION_TEMPLATES}
    # MiniGPT-v2's training text: two spaces before [/INST]; the release's inference text: one
    assert prompt_text("[vqa] Q?") == "[INST] <Img><ImageHere></Img> [vqa] Q?  [/INST]"
    assert prompt_text("[vqa] Q?", "release") == "[INST] <Img><ImageHere></Img> [vqa] Q? [/INST]"


def test_training_sequence_layout_and_loss_mask():
    tok = WordTokenizer()
    sample = build_prompt_tokens(tok, "[refer] where?", num_image_tokens=3, answer="{<1><2><3><4>}")
    words = ["[INST]", "<Img>"]
    after = ["</Img>", "[refer]", "where?", "[/INST]"]
    ids = sample.input_ids.tolist()
    # BOS, "[INST] <Img>", 3 image slots, "</Img> [refer] where? [/INST]", answer, EOS
    assert len(ids) == 1 + 2 + 3 + 4 + 1 + 1
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:3]) == " ".join(words)
    assert tok.decode(ids[6:10]) == " ".join(after)
    assert sample.image_mask.tolist() == [False] * 3 + [True] * 3 + [False] * 6
    assert ids[3:6] == [tok.pad_id] * 3
    # loss only on the answer token and its </s>
    assert sample.labels.tolist() == [IGNORE_INDEX] * 10 + ids[10:]


def test_generation_prompt_ends_after_inst():
    tok = WordTokenizer()
    sample = build_prompt_tokens(tok, "[vqa] tumor?", num_image_tokens=2)
    assert tok.decode(sample.input_ids[-1:].tolist()) == "[/INST]"
    assert (sample.labels == IGNORE_INDEX).all()


def test_padding_sides():
    tok = WordTokenizer()
    short = build_prompt_tokens(tok, "a", num_image_tokens=1, answer="x")
    long = build_prompt_tokens(tok, "a b c", num_image_tokens=1, answer="x")
    right = pad_prompt_batch([short, long], tok.pad_id, "right")
    left = pad_prompt_batch([short, long], tok.pad_id, "left")
    n, m = len(short.input_ids), len(long.input_ids)
    assert right["input_ids"].shape == left["input_ids"].shape == (2, m)
    assert right["attention_mask"][0].tolist() == [1] * n + [0] * (m - n)
    assert left["attention_mask"][0].tolist() == [0] * (m - n) + [1] * n
    assert torch.equal(left["input_ids"][0, m - n :], short.input_ids)
    assert torch.equal(right["labels"][0, :n], short.labels)
    assert (right["labels"][0, n:] == IGNORE_INDEX).all()
    assert left["image_mask"].sum() == right["image_mask"].sum() == 2
    with pytest.raises(ValueError, match="padding_side"):
        pad_prompt_batch([short], 0, "middle")


def test_pad_to_multiple_of_rounds_the_length_up_with_masked_unlabelled_padding():
    tok = WordTokenizer()
    short = build_prompt_tokens(tok, "a", num_image_tokens=1, answer="x")
    long = build_prompt_tokens(tok, "a b c", num_image_tokens=1, answer="x")
    m = len(long.input_ids)
    plain = pad_prompt_batch([short, long], tok.pad_id, "right")
    padded = pad_prompt_batch([short, long], tok.pad_id, "right", pad_to_multiple_of=8)
    assert m % 8 and padded["input_ids"].shape == (2, -(-m // 8) * 8)
    for key in plain:  # the first m columns are the plain batch; the rest is masked padding
        assert torch.equal(padded[key][:, :m], plain[key])
    assert (padded["attention_mask"][:, m:] == 0).all() and (padded["labels"][:, m:] == IGNORE_INDEX).all()
    assert not padded["image_mask"][:, m:].any() and (padded["input_ids"][:, m:] == tok.pad_id).all()
    exact = pad_prompt_batch([long], tok.pad_id, "right", pad_to_multiple_of=m)
    assert exact["input_ids"].shape == (1, m)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be positive"):
        pad_prompt_batch([short], tok.pad_id, "right", pad_to_multiple_of=0)


def test_release_wording_puts_two_bos_in_front_and_asks_the_releases_questions():
    tok = WordTokenizer()
    paper = build_prompt_tokens(tok, "[vqa] tumor?", num_image_tokens=2)
    release = build_prompt_tokens(tok, "[vqa] tumor?", num_image_tokens=2, wording="release")
    assert release.input_ids.tolist() == [tok.bos_id] + paper.input_ids.tolist()  # words: spaces do not count
    assert release.image_mask.tolist() == [False] + paper.image_mask.tolist()
    assert prompt_wording("release").detection_template.format("pancreas") == "[refer] give me the location of the pancreas"
    assert prompt_wording("release").classification_question == (
        "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?")
    assert prompt_wording("paper").classification_question == CLASSIFICATION_QUESTIONS[0]
    with pytest.raises(ValueError, match="paper, release"):
        build_prompt_tokens(tok, "x", 1, wording="chat")
