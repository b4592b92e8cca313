"""The exported adapter's README gives the token stream the weights were trained on, generated
from the prompt builder (issue 25, item 7): its recipe, run, equals ``build_prompt_tokens``."""

from __future__ import annotations

import re

import pytest
import torch

from minigpt4.commands.export import main as export_main
from minigpt4.models.checkpoints import save_checkpoint
from minigpt4.models.minigpt_v2 import build_model
from minigpt4.prompts import build_prompt_tokens
from minigpt4.tokenizer import load_tokenizer
from tests.test_tokenizer import LLAMA2
from tests.tiny import tiny_model_config


@pytest.fixture(scope="module")
def readme(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("export")
    save_checkpoint(build_model(tiny_model_config()), folder / "ckpt")
    assert export_main(["--ckpt", str(folder / "ckpt"), "--out", str(folder / "peft")]) == 0
    return (folder / "peft" / "README.md").read_text()


def _recipe(readme: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    return next(b for b in blocks if "instruction = " in b)


@pytest.mark.parametrize("which", ["tiny", "llama2"])
def test_the_readme_recipe_builds_the_training_stream(readme, which):
    if which == "llama2" and not LLAMA2.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not found at {LLAMA2}")
    tok = load_tokenizer(str(LLAMA2)) if which == "llama2" else load_tokenizer()
    scope = {"tok": tok}
    exec(_recipe(readme), scope)  # noqa: S102 - the README's own lines, run as a PEFT user would
    expected = build_prompt_tokens(tok, scope["instruction"], 256)
    assert scope["ids"] == expected.input_ids.tolist()
    assert list(scope["image_slots"]) == torch.nonzero(expected.image_mask).flatten().tolist()
    if which == "llama2":  # the two spaces before [/INST]: an extra '▁' (29871), as MiniGPT-v2 trained
        assert 29871 in scope["ids"][-6:]


def test_the_readme_does_not_give_the_release_stream_as_the_prompt(readme):
    recipe = _recipe(readme)
    assert "'</Img> {}  [/INST]'" in recipe and "tok.bos_id] * 1" in recipe
    # the one-string release form is named only as what not to do
    line = next(x for x in readme.splitlines() if "<s>[INST] <Img>…</Img> {instruction} [/INST]" in x)
    assert "another stream and changes the answers" in line
