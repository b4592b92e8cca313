"""The SentencePiece tokenizer: the tiny offline one and the real LLaMA-2 one, same code path."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt4.boxes import format_box, parse_box
from minigpt4.prompts import (
    DETECTION_TEMPLATES,
    IGNORE_INDEX,
    RELEASE_EVAL_QUESTION,
    RELEASE_EVAL_TEMPLATE,
    build_prompt_tokens,
    classification_question,
)
from minigpt4.tokenizer import TINY_VOCAB_SIZE, Tokenizer, load_tokenizer, tiny_tokenizer_path, train_tiny_tokenizer_bytes

LLAMA2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "llama2" / "tokenizer.model"
BOX = "{<12><34><56><78>}"


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def llama2() -> Tokenizer:
    if not LLAMA2.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not found at {LLAMA2} (../shared/data is absent)")
    return load_tokenizer(str(LLAMA2))


def test_tiny_tokenizer_is_deterministic_and_cached(tmp_path, monkeypatch):
    assert train_tiny_tokenizer_bytes() == train_tiny_tokenizer_bytes()
    monkeypatch.setenv("MINIGPT_PANCREAS_CACHE", str(tmp_path))
    path = tiny_tokenizer_path()
    assert path.parent == tmp_path / "tokenizers" and path.read_bytes() == train_tiny_tokenizer_bytes()
    mtime = path.stat().st_mtime_ns
    assert tiny_tokenizer_path() == path and path.stat().st_mtime_ns == mtime  # reused, not retrained


def test_tiny_tokenizer_specials_and_box_pieces(tiny):
    assert (tiny.vocab_size, tiny.bos_id, tiny.eos_id, tiny.pad_id) == (TINY_VOCAB_SIZE, 1, 2, 3)
    # every digit and bracket is its own piece, so boxes tokenise as the real model sees them
    assert tiny.pieces(BOX) == ["▁", "{", "<", "1", "2", ">", "<", "3", "4", ">", "<", "5", "6", ">", "<", "7", "8", ">", "}"]
    assert len(tiny.encode("yes")) == 1 and len(tiny.encode("no")) == 1


@pytest.mark.parametrize("text", [BOX, "{<0><0><0><0>}", "{<100><7><99><100>}", "yes", "no",
                                  DETECTION_TEMPLATES[3].format("pancreatic tumor"), "Ünïcode ✓ text 42 !"])
def test_tiny_round_trip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_real_llama2_tokenizer_round_trips_prompts_and_boxes(llama2):
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id, llama2.pad_id) == (32000, 1, 2, 0)
    for text in [BOX, format_box((0, 0, 0, 0)), classification_question(), DETECTION_TEMPLATES[7].format("spleen"),
                 "[INST] <Img>", "</Img> [refer] Where is the pancreas? [/INST]"]:
        assert llama2.decode(llama2.encode(text)) == text
    assert parse_box(llama2.decode(llama2.encode(BOX))) == (12, 34, 56, 78)
    assert llama2.encode("yes") == [4874] and llama2.encode("no") == [694]  # '▁yes', '▁no'
    # LLaMA-2 splits numbers into digits too
    assert [p for p in llama2.pieces("<12>") if p.isdigit()] == ["1", "2"]


def test_prompt_builder_with_real_tokenizer(llama2):
    tokens = build_prompt_tokens(llama2, "[refer] Where is the pancreas?", 256, answer=BOX)
    ids = tokens.input_ids.tolist()
    assert ids[0] == 1 and ids.count(1) == 1  # exactly one BOS
    assert int(tokens.image_mask.sum()) == 256
    answer = [t for t in tokens.labels.tolist() if t != IGNORE_INDEX]
    assert answer == llama2.encode(BOX) + [2]
    assert llama2.decode(answer) == BOX


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        load_tokenizer(None, str(tmp_path / "Llama-2-7b-chat-hf"))
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")


# --- the stream MiniGPT-v2 trained on, token for token -----------------------------------------
# Upstream (Vision-CAIR/MiniGPT-4), restated as text: MiniGPTv2's prompt_template "[INST] {} [/INST]"
# (chat_template: True in its fine-tuning configs) wraps its datasets' instruction
# "<Img><ImageHere></Img> {} " (trailing space included); prompt_wrap splits the text at
# "<ImageHere>" and tokenises each piece with add_special_tokens=False, forward() puts one BOS in
# front, and the answer is tokenised as answer + end_sym "</s>" (a special token: the EOS id). Its
# transformers 4.30 slow LlamaTokenizer encodes each piece between special tokens with
# SentencePiece as is (dummy-prefix space included), so the raw SentencePiece processor is used here.
UPSTREAM_TEMPLATE = "[INST] {} [/INST]"
UPSTREAM_INSTRUCTION = "<Img><ImageHere></Img> {} "
# The release's evaluation: conversation roles "<s>[INST] " / " [/INST]" around "<Img><ImageHere></Img> {}",
# the first piece tokenised with add_special_tokens=True (the tokenizer's BOS, then "<s>" = BOS again).
RELEASE_ROLES = ("<s>[INST] ", " [/INST]")
N_IMAGE = 256


def _upstream_pieces(sp, text: str, bos: int) -> list[list[int]]:
    """Each piece of ``text`` split at the image, encoded the upstream way ("<s>" → BOS)."""
    pieces = []
    for piece in text.split("<ImageHere>"):
        ids = []
        for k, chunk in enumerate(piece.split("<s>")):
            ids += ([bos] if k else []) + (sp.encode(chunk) if chunk else [])
        pieces.append(ids)
    return pieces


def upstream_training_ids(sp, instruction: str, answer: str, pad: int) -> list[int]:
    before, after = _upstream_pieces(sp, UPSTREAM_TEMPLATE.format(UPSTREAM_INSTRUCTION.format(instruction)), sp.bos_id())
    return [sp.bos_id()] + before + [pad] * N_IMAGE + after + sp.encode(answer) + [sp.eos_id()]


def release_inference_ids(sp, question: str, pad: int) -> list[int]:
    text = RELEASE_ROLES[0] + "<Img><ImageHere></Img> {}".format(question) + RELEASE_ROLES[1]
    before, after = _upstream_pieces(sp, text, sp.bos_id())
    return [sp.bos_id()] + before + [pad] * N_IMAGE + after


@pytest.mark.parametrize("instruction, answer", [
    (DETECTION_TEMPLATES[0].format("pancreas"), BOX),
    (classification_question(), "yes"),
])
def test_training_and_inference_streams_are_minigpt_v2s_training_stream(llama2, instruction, answer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    expected = upstream_training_ids(sp, instruction, answer, llama2.pad_id)
    tokens = build_prompt_tokens(llama2, instruction, N_IMAGE, answer=answer)
    assert tokens.input_ids.tolist() == expected
    # the piece our stream lacked: '▁' (29871) right before '▁[', '/', 'INST', ']'
    end = tokens.input_ids.tolist().index(llama2.eos_id) - len(llama2.encode(answer))
    assert tokens.input_ids.tolist()[end - 5:end] == [29871, 518, 29914, 25580, 29962]
    assert int(tokens.image_mask.sum()) == N_IMAGE and tokens.image_mask.tolist().index(True) == 7
    # inference: the same stream up to [/INST], nothing else
    prompt = build_prompt_tokens(llama2, instruction, N_IMAGE)
    assert prompt.input_ids.tolist() == expected[:end]


@pytest.mark.parametrize("question", [RELEASE_EVAL_TEMPLATE.format("pancreas"), RELEASE_EVAL_QUESTION])
def test_release_wording_is_the_releases_inference_stream_with_its_second_bos(llama2, question):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    ids = build_prompt_tokens(llama2, question, N_IMAGE, wording="release").input_ids.tolist()
    assert ids == release_inference_ids(sp, question, llama2.pad_id)
    assert ids[:2] == [1, 1] and ids[-5:] != [29871, 518, 29914, 25580, 29962] and ids[-4:] == [518, 29914, 25580, 29962]
