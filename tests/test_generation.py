"""Decoding through HF ``generate(inputs_embeds=..., attention_mask=...)`` (as MiniGPT-v2) and
the typed ``model.generation`` section: greedy by default, beams and sampling by config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from minigpt4.config import ConfigError, DecodingConfig, load_config
from minigpt4.models.llama import llama_config
from minigpt4.models.minigpt_v2 import MiniGPTPancreas, build_model
from tests.tiny import build_tiny_model, tiny_images, tiny_model_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

# three prompts of different lengths, so the batch is left-padded
INSTRUCTIONS = [
    "[refer] Where is the pancreas?",
    "[refer] From this image, tell me the location of the pancreatic tumor",
    "[vqa] Is a pancreatic tumor visible in the image?",
]


@pytest.fixture(scope="module")
def model() -> MiniGPTPancreas:
    # LoRA B is zero at init: give the adapters and projection some weight so that the
    # image and LoRA paths both matter for the tokens
    model = build_tiny_model(**{"lora.dropout": 0.0})
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.llama_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


@torch.no_grad()
def reference_greedy_ids(model: MiniGPTPancreas, images, instructions, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding written out (what the hand-written loop before HF ``generate`` did), one
    prompt at a time (no padding at all, no cache), with ``</s>`` forbidden as the first token."""
    rows = []
    for i, instruction in enumerate(instructions):
        batch = model.tokenize([instruction], padding_side="left")
        embeds = model._prepare(images[i : i + 1], batch)  # (1, L, hidden)
        out_ids: list[int] = []
        for step in range(max_new_tokens):  # no KV cache: the whole sequence every step
            logits = model.llama_model(inputs_embeds=embeds, use_cache=False).logits[0, -1].clone()
            if step == 0:
                logits[model.tokenizer.eos_id] = -float("inf")
            next_id = int(logits.argmax())
            out_ids.append(next_id)
            if next_id == model.tokenizer.eos_id:
                break
            next_embed = model.llama.get_input_embeddings()(torch.tensor([[next_id]], device=embeds.device))
            embeds = torch.cat((embeds, next_embed), dim=1)
        rows.append(out_ids)
    width = max(len(r) for r in rows)
    return torch.tensor([r + [model.tokenizer.pad_id] * (width - len(r)) for r in rows])


def test_left_padded_batch_of_three_equals_the_reference_loop(model):
    images = tiny_images(3, seed=2)
    batch = model.tokenize(INSTRUCTIONS, padding_side="left")
    assert (batch["attention_mask"] == 0).any(dim=1).tolist().count(True) == 2  # two rows are padded
    ids = model.generate_ids(images, INSTRUCTIONS, max_new_tokens=12)
    expected = reference_greedy_ids(model, images, INSTRUCTIONS, 12)
    print("greedy ids:", ids.tolist())
    assert torch.equal(ids, expected)
    # batched == one by one, as strings too
    singles = [model.generate(images[i : i + 1], [INSTRUCTIONS[i]], max_new_tokens=12)[0] for i in range(3)]
    assert model.generate(images, INSTRUCTIONS, max_new_tokens=12) == singles


def test_first_token_is_never_end_of_sequence(model):
    """MiniGPT-v2's ``min_length=1``: with ``</s>`` the most likely first token, the answer is
    still one token long (the old loop returned an empty string here)."""
    eos = model.tokenizer.eos_id
    calls: list[int] = []

    def favour_eos(module, args, output):
        calls.append(output.shape[1])
        output = output.clone()
        output[..., eos] += 1e4
        return output

    handle = model.llama.lm_head.register_forward_hook(favour_eos)
    try:
        ids = model.generate_ids(tiny_images(2), INSTRUCTIONS[:2], max_new_tokens=5)
    finally:
        handle.remove()
    assert ids.shape == (2, 2) and len(calls) == 2  # prompt + one cached step, then all rows ended
    assert (ids[:, 0] != eos).all() and (ids[:, 1] == eos).all()


def test_beams_and_sampling_are_config_choices(model):
    images = tiny_images(2, seed=3)
    greedy = model.generate_ids(images, INSTRUCTIONS[:2], max_new_tokens=6)
    # one beam and top_p=1 sampling at a tiny temperature is greedy again
    near_greedy = DecodingConfig(max_new_tokens=6, do_sample=True, temperature=1e-4)
    torch.manual_seed(0)
    assert torch.equal(model.generate_ids(images, INSTRUCTIONS[:2], decoding=near_greedy), greedy)
    # sampling at temperature 5 is seeded by torch's RNG
    hot = DecodingConfig(max_new_tokens=6, do_sample=True, temperature=5.0, top_p=0.9, repetition_penalty=1.05)
    torch.manual_seed(1)
    first = model.generate_ids(images, INSTRUCTIONS[:2], decoding=hot)
    torch.manual_seed(1)
    assert torch.equal(model.generate_ids(images, INSTRUCTIONS[:2], decoding=hot), first)
    draws = set()
    for seed in range(4):
        torch.manual_seed(seed)
        draws.add(tuple(model.generate_ids(images, INSTRUCTIONS[:2], decoding=hot)[0].tolist()))
    assert len(draws) > 1
    # 3 beams: one answer per prompt within the length limit, and the HF settings as configured
    beams = DecodingConfig(max_new_tokens=6, num_beams=3)
    beam_ids = model.generate_ids(images, INSTRUCTIONS[:2], decoding=beams)
    assert beam_ids.shape[0] == 2 and 1 <= beam_ids.shape[1] <= 6
    hf = model.generation_config(beams)
    assert (hf.num_beams, hf.do_sample, hf.min_new_tokens, hf.max_new_tokens) == (3, False, 1, 6)
    assert (hf.eos_token_id, hf.pad_token_id) == (model.tokenizer.eos_id, model.tokenizer.pad_id)
    # greedy settings carry no sampling values (HF would warn about them)
    assert model.generation_config().temperature in (None, 1.0) and model.generation_config().do_sample is False


def test_a_sampling_generation_config_in_the_llama_folder_does_not_leak(tmp_path):
    """LLaMA-2-chat's generation_config.json samples (temperature 0.6, top-p 0.9); evaluation
    must stay greedy, so ``model.generation`` alone decides."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from minigpt4.tokenizer import tiny_tokenizer_path

    cfg = tiny_model_config(**{"lora.dropout": 0.0})
    torch.manual_seed(4)
    source = LlamaForCausalLM(llama_config(cfg.text, None))
    source.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9, max_length=4096
    )
    folder = tmp_path / "Llama-2-tiny-chat-hf"
    source.save_pretrained(folder)
    shutil.copy(tiny_tokenizer_path(), folder / "tokenizer.model")
    assert '"do_sample": true' in (folder / "generation_config.json").read_text()
    model = build_model(tiny_model_config(**{"text.path": str(folder), "lora.dropout": 0.0})).eval()
    assert model.llama.generation_config.do_sample is not True
    images = tiny_images(2, seed=6)
    runs = []
    for seed in range(3):
        torch.manual_seed(seed)
        runs.append(model.generate_ids(images, INSTRUCTIONS[:2], max_new_tokens=8))
    assert all(torch.equal(r, runs[0]) for r in runs)
    assert torch.equal(runs[0], reference_greedy_ids(model, images, INSTRUCTIONS[:2], 8))


def test_generation_section_and_the_old_max_new_tokens_key(tmp_path):
    cfg = load_config(ROOT / "eval_configs/stage1_pancreas_detection.yaml")
    gen = cfg.model.generation
    assert (gen.max_new_tokens, gen.num_beams, gen.do_sample, gen.strategy, gen.free_text) == (20, 1, False, "greedy", None)
    # the old spelling still works (old configs, --options) and moves to generation
    old = load_config(ROOT / "eval_configs/stage1_pancreas_detection.yaml", ["model.max_new_tokens=6"])
    assert old.model.generation.max_new_tokens == 6 and old.model.max_new_tokens is None
    assert tiny_model_config(max_new_tokens=5).generation.max_new_tokens == 5
    new = load_config(ROOT / "eval_configs/stage1_pancreas_detection.yaml", ["model.generation.num_beams=4"])
    assert new.model.generation.strategy == "beam"
    # the demo samples its free-text answers like the release's demo; detection stays greedy
    demo = load_config(ROOT / "eval_configs/demo.yaml").model.generation
    assert demo.strategy == "greedy" and demo.max_new_tokens == 20
    free = demo.free_text
    assert (free.do_sample, free.temperature, free.top_p, free.repetition_penalty, free.num_beams) == (True, 0.6, 0.9, 1.05, 1)
    with pytest.raises(ConfigError, match="top_p"):
        load_config(ROOT / "eval_configs/demo.yaml", ["model.generation.top_p=0"])
    with pytest.raises(ConfigError, match="generation.nucleus"):
        load_config(ROOT / "eval_configs/demo.yaml", ["model.generation.nucleus=0.9"])
    # every shipped config uses the new section
    for folder in ("train_configs", "eval_configs"):
        for path in sorted((ROOT / folder).glob("*.yaml")):
            text = path.read_text()
            assert "\n  max_new_tokens:" not in text, f"{path}: use model.generation.max_new_tokens"
            load_config(path)


def test_demo_samples_free_text_only(tmp_path):
    """``model.generation.free_text`` reaches the model for free text; boxes and yes/no stay greedy."""
    import numpy as np

    from minigpt4.data.transforms import ImageTransform
    from minigpt4.demo.service import DemoService

    class RecordingModel:
        image_transform = ImageTransform(28)

        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def generate(self, images, instructions, max_new_tokens=None, decoding=None):
            self.calls.append((instructions[0], max_new_tokens, decoding))
            return ["{<10><20><30><40>}" if instructions[0].startswith("[refer]") else "a pancreas"]

        def yes_probability(self, images, questions):
            return torch.full((len(questions),), 0.5)

    sampling = load_config(ROOT / "eval_configs/demo.yaml").model.generation.free_text
    model = RecordingModel()
    service = DemoService(model, max_new_tokens=20, text_decoding=sampling)
    image = np.full((40, 40), 100, dtype=np.uint8)
    service.ask(image, "[refer] Give me the location of the pancreas")
    service.ask(image, "What organ is in the middle?")
    assert model.calls == [
        ("[refer] Give me the location of the pancreas", 20, None),
        ("What organ is in the middle?", None, sampling),
    ]
    assert sampling.max_new_tokens == 500 and sampling.strategy == "sample"


def test_model_prompts_follow_the_configured_wording():
    """``model.prompts.wording`` reaches the model's one tokenisation path (training batches and
    generation): the release's stream has a second BOS, the rest is the paper's."""
    paper = build_tiny_model(**{"lora.dropout": 0.0})
    release = build_tiny_model(**{"lora.dropout": 0.0, "prompts.wording": "release"})
    question = "[vqa] Is a pancreatic tumor visible in the image?"
    ids_paper = paper.tokenize([question], padding_side="left")["input_ids"][0].tolist()
    ids_release = release.tokenize([question], padding_side="left")["input_ids"][0].tolist()
    bos = paper.tokenizer.bos_id
    assert ids_release == [bos] + ids_paper and ids_paper.count(bos) == 1
    train_batch = release.tokenize([question], ["yes"])
    assert train_batch["input_ids"][0, :2].tolist() == [bos, bos]
    # the extra BOS changes what the model sees: not the same logits for the answer
    images = tiny_images(1)
    with torch.no_grad():
        assert not torch.allclose(paper(images, [question], ["yes"]).logits, release(images, [question], ["yes"]).logits)
