"""The MiniGPT-v2 stack on the tiny CPU config: shapes, freezing, prompt splice, decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt4.models.minigpt_v2 import MiniGPTPancreas, build_model, merge_visual_tokens
from minigpt4.prompts import IGNORE_INDEX, build_prompt_tokens, pad_prompt_batch
from minigpt4.tokenizer import casing_piece_ids, load_tokenizer
from tests.tiny import build_tiny_model, tiny_images, tiny_model_config

torch.set_num_threads(1)

INSTRUCTIONS = ["[refer] Where is the pancreas?", "[vqa] Is a pancreatic tumor visible in the image?"]
ANSWERS = ["{<12><34><56><78>}", "yes"]


@pytest.fixture(scope="module")
def model() -> MiniGPTPancreas:
    return build_tiny_model()


def test_tiny_sizes(model):
    assert model.num_visual_tokens == 16
    assert model.llama_proj.in_features == 64 * 4 and model.llama_proj.out_features == 64
    assert len(model.visual_encoder.blocks) == 2 and len(model.llama.model.layers) == 2
    assert model.tokenizer.vocab_size == 512 == model.llama.config.vocab_size
    assert model.image_transform.image_size == 112
    # ln_vision is an identity affine and never trained
    assert torch.equal(model.ln_vision.weight, torch.ones(64)) and torch.equal(model.ln_vision.bias, torch.zeros(64))


def test_merge_visual_tokens_hand_built():
    tokens = torch.arange(8 * 2, dtype=torch.float32).reshape(1, 8, 2)  # token t = (2t, 2t+1)
    merged = merge_visual_tokens(tokens, 4)
    expected = torch.tensor([[[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]], dtype=torch.float32)
    assert torch.equal(merged, expected)
    with pytest.raises(ValueError, match="not divisible"):
        merge_visual_tokens(torch.zeros(1, 6, 2), 4)


def test_encode_images_uses_row_major_1x4_strips(model):
    """Visual token j is the concatenation of 4 horizontally adjacent patches of one grid row."""
    images = tiny_images(1)
    with torch.no_grad():
        patches = model.ln_vision(model.visual_encoder(images))[0, 1:]  # (64, C), drop CLS
        grid = patches.reshape(8, 8, -1)  # (row, col, C), row-major patch order
        strips = [torch.cat([grid[j // 2, 4 * (j % 2) + k] for k in range(4)]) for j in range(16)]
        expected = model.llama_proj(torch.stack(strips))
        assert torch.allclose(model.encode_images(images)[0], expected, atol=1e-6)


def test_forward_backward_only_lora_and_projection_get_gradients(model):
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        out = model(tiny_images(), INSTRUCTIONS, ANSWERS)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        out.loss.backward()
    finally:
        model.eval()
    with_grad = {n.replace(".default.", ".") for n, p in model.named_parameters() if p.grad is not None}
    expected = {"llama_proj.weight", "llama_proj.bias"} | {
        f"llama_model.base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("q_proj", "k_proj")
        for ab in ("A", "B")
    }
    assert with_grad == expected == set(model.trainable_state_dict())
    assert model.llama_proj.weight.grad.abs().sum() > 0
    for part in (model.visual_encoder, model.ln_vision):
        assert not any(p.requires_grad for p in part.parameters())
    base = [n for n, p in model.llama.named_parameters() if ".lora_" not in n]
    assert base and not any(p.requires_grad for n, p in model.llama.named_parameters() if ".lora_" not in n)
    model.zero_grad(set_to_none=True)


def test_trainable_vision_option_trains_saves_and_loads_the_vit(tmp_path):
    """``model.vision.trainable`` (off by default, the paper's frozen EVA) adds every ViT tensor to
    the trainable set: gradients, train mode, fp32 on a bf16 base, checkpoint round trip."""
    from minigpt4.models.checkpoints import load_weights, save_checkpoint

    model = build_tiny_model(**{"vision.trainable": True})
    vit_names = {f"visual_encoder.{n}" for n, _ in model.visual_encoder.named_parameters()}
    assert len(vit_names) == 2 + 2 + 2 * 13  # patch conv w/b, cls + pos, 13 tensors per block
    model.train()
    try:
        assert all(m.training for m in model.visual_encoder.modules()) and not model.ln_vision.training
        model(tiny_images(), INSTRUCTIONS, ANSWERS).loss.backward()
    finally:
        model.eval()
    assert not any(m.training for m in model.modules())
    with_grad = {n.replace(".default.", ".") for n, p in model.named_parameters() if p.grad is not None}
    lora_and_proj = {"llama_proj.weight", "llama_proj.bias"} | {
        f"llama_model.base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2) for m in ("q_proj", "k_proj") for ab in ("A", "B")
    }
    assert with_grad == lora_and_proj | vit_names == set(model.trainable_state_dict())
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.ln_vision.parameters())
    assert not any(p.requires_grad for n, p in model.llama.named_parameters() if ".lora_" not in n)

    # the checkpoint carries the trained ViT and loads it back, also into a frozen-ViT config
    with torch.no_grad():
        for p in model.visual_encoder.parameters():
            p.add_(0.01)
    save_checkpoint(model, tmp_path / "ckpt")
    for trainable in (True, False):
        target = build_tiny_model(seed=3, **{"vision.trainable": trainable})
        report = load_weights(target, tmp_path / "ckpt")
        assert not report.missing and not report.unexpected and set(report.loaded) >= vit_names
        for (name, a), b in zip(model.visual_encoder.named_parameters(), target.visual_encoder.parameters()):
            assert torch.equal(a, b), name
        assert torch.equal(target.llama_proj.weight, model.llama_proj.weight)
    # a checkpoint without ViT tensors (frozen run, MiniGPT-v2 stage 3) still starts a trainable-ViT run
    frozen = build_tiny_model()
    save_checkpoint(frozen, tmp_path / "frozen")
    target = build_tiny_model(seed=3, **{"vision.trainable": True})
    before = target.visual_encoder.pos_embed.detach().clone()
    report = load_weights(target, tmp_path / "frozen")
    assert not report.missing and not set(report.loaded) & vit_names
    assert torch.equal(target.visual_encoder.pos_embed, before)
    # on a bf16 base the trained ViT stays fp32 like every trained tensor
    bf16 = build_tiny_model(dtype="bf16", **{"vision.trainable": True})
    assert bf16.dtype == torch.bfloat16 and bf16.visual_encoder.pos_embed.dtype == torch.float32
    assert torch.isfinite(bf16(tiny_images(), INSTRUCTIONS, ANSWERS).loss)


def test_train_mode_keeps_frozen_parts_in_eval(model):
    model.train()
    try:
        assert model.training and model.llama_proj.training
        assert not any(m.training for m in model.visual_encoder.modules())
        assert not model.ln_vision.training
        dropout = {n for n, m in model.llama_model.named_modules() if m.training}
        assert dropout and all("lora_dropout" in n for n in dropout)
        assert not any(m.training for m in model.llama.model.layers)
    finally:
        model.eval()
    assert not any(m.training for m in model.modules())


def test_loss_is_mean_cross_entropy_over_answer_tokens(model):
    images = tiny_images()
    with torch.no_grad():
        out = model(images, INSTRUCTIONS, ANSWERS)
    labels = out.labels
    # the answer + </s> are the only supervised tokens
    tok = model.tokenizer
    for row, answer in enumerate(ANSWERS):
        supervised = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert supervised == tok.encode(answer) + [tok.eos_id]
    # logits only at the positions predicting an answer token, in row-major order
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    assert torch.equal(out.targets, targets)
    assert out.logits.shape == (len(targets), model.llama.config.vocab_size)
    manual = F.cross_entropy(out.logits.float(), targets)
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # changing only the answer changes the loss; the prompt alone carries none
    with torch.no_grad():
        other = model(images, INSTRUCTIONS, ["{<0><0><0><0>}", "no"])
    assert not torch.allclose(out.loss, other.loss)


def test_image_placeholders_and_images_must_agree(model):
    batch = pad_prompt_batch([build_prompt_tokens(model.tokenizer, "[vqa] x", 15)], model.tokenizer.pad_id, "right")
    visual = torch.zeros(1, 16, 64)
    with pytest.raises(ValueError, match="image placeholders and images disagree"):
        model.embed_inputs(batch["input_ids"], batch["image_mask"], visual)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        model(tiny_images(3), INSTRUCTIONS, ANSWERS)
    with pytest.raises(ValueError, match="112x112"):
        model(torch.zeros(2, 3, 56, 56), INSTRUCTIONS, ANSWERS)


def test_visual_tokens_are_spliced_at_the_image_positions(model):
    images = tiny_images(1)
    batch = model.tokenize(INSTRUCTIONS[:1], padding_side="left")
    visual = model.encode_images(images)
    embeds = model.embed_inputs(batch["input_ids"], batch["image_mask"], visual)
    mask = batch["image_mask"][0]
    assert torch.equal(embeds[0, mask], visual[0])
    text = model.llama.get_input_embeddings()(batch["input_ids"])[0]
    assert torch.equal(embeds[0, ~mask], text[~mask])


def _overfit(model, images, instructions, answers, steps=80):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(images, instructions, answers).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_overfit_then_batched_generation_equals_one_by_one():
    torch.manual_seed(0)
    model = build_tiny_model(**{"lora.dropout": 0.0, "max_new_tokens": 24})
    images = tiny_images(3, seed=1)
    instructions = [INSTRUCTIONS[0], "[refer] Where can I locate the liver?", INSTRUCTIONS[1]]
    answers = ["{<12><34><56><78>}", "{<3><40><9><77>}", "yes"]
    losses = _overfit(model, images, instructions, answers)
    assert losses[-1] < 0.2 * losses[0]
    batched = model.generate(images, instructions)
    singles = [model.generate(images[i : i + 1], [instructions[i]])[0] for i in range(3)]
    assert batched == singles == answers
    # max_new_tokens caps the length: 3 pieces of "{<12>" are '{', '<', '1' (+ the dummy prefix)
    short = model.generate(images[:1], instructions[:1], max_new_tokens=3)
    assert answers[0].startswith(short[0]) and len(short[0]) < len(answers[0])
    # P(yes) for the sample trained on "yes"
    p_yes = model.yes_probability(images[2:], instructions[2:])
    assert p_yes.shape == (1,) and p_yes.item() > 0.9


def test_yes_probability_sums_the_casing_variants_at_the_first_answer_token(model):
    images = tiny_images()
    questions = [INSTRUCTIONS[1], "[vqa] Does the pancreas in the picture have a tumor?"]
    p = model.yes_probability(images, questions)
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())
    # tiny vocabulary: '▁yes' '▁Yes' are pieces ('yes' alone and any 'YES' are not);
    # 'no' '▁no' 'No' '▁No' are pieces
    pieces = model.tokenizer.sp.id_to_piece
    yes_ids, no_ids = casing_piece_ids(model.tokenizer, "yes"), casing_piece_ids(model.tokenizer, "no")
    assert [pieces(i) for i in yes_ids] == ["\u2581yes", "\u2581Yes"]
    assert [pieces(i) for i in no_ids] == ["no", "\u2581no", "No", "\u2581No"]
    for i in range(2):
        with torch.no_grad():
            out = model(images[i : i + 1], questions[i : i + 1], ["yes"])
        assert out.targets[0] == yes_ids[0]  # answer-only logits: row 0 predicts the first answer token
        probs = out.logits[0].float().softmax(-1)
        p_yes, p_no = probs[yes_ids].sum(), probs[no_ids].sum()
        assert torch.allclose(p[i], p_yes / (p_yes + p_no), atol=1e-5)
        # the old rule (▁yes vs ▁no only) gives another number: the variants carry mass
        only_lower = probs[yes_ids[0]] / (probs[yes_ids[0]] + probs[no_ids[1]])
        assert abs(float(p[i]) - float(only_lower)) > 1e-4


def test_casing_piece_ids_on_the_real_llama2_tokenizer():
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizer" / "llama2" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not found at {path} (../shared/data is absent)")
    llama2 = load_tokenizer(str(path))
    # yes ▁yes Yes ▁Yes YES ▁YES / no ▁no No ▁No NO ▁NO (ids read off the vocabulary by hand)
    assert casing_piece_ids(llama2, "yes") == [3582, 4874, 8241, 3869, 21143, 22483]
    assert casing_piece_ids(llama2, "no") == [1217, 694, 3782, 1939, 6632, 11698]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model = build_tiny_model(**{"lora.dropout": 0.0, "gradient_checkpointing": checkpointing})
        with torch.no_grad():  # non-zero B so LoRA gradients are non-trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
        model.train()
        if checkpointing:
            assert all(layer.gradient_checkpointing and layer.training for layer in model.llama.model.layers)
        out = model(tiny_images(), INSTRUCTIONS, ANSWERS)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and len(grads_a) == 10
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_vocab_size_must_match_tiny_tokenizer():
    with pytest.raises(ValueError, match="model.text.vocab_size=1000 but the tokenizer"):
        build_model(tiny_model_config(**{"text.vocab_size": 1000}), device="cpu")


def test_release_lora_targets_are_one_config_line_away():
    model = build_tiny_model(**{"lora.target_modules": ["q_proj", "v_proj"]})
    names = set(model.trainable_state_dict())
    assert "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in names
    assert not any("k_proj" in n for n in names)


def test_bf16_frozen_parts_keep_fp32_trainables():
    model = build_tiny_model(dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.llama.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in model.trainable_state_dict().values())
    out = model(tiny_images(), INSTRUCTIONS, ANSWERS)
    assert torch.isfinite(out.loss)


def test_missing_weight_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="eva_vit_g.pth"):
        build_model(tiny_model_config(**{"vision.weights": str(tmp_path / "eva_vit_g.pth")}))
    with pytest.raises(FileNotFoundError, match="Llama-2-7b-chat-hf"):
        build_model(tiny_model_config(**{"text.path": str(tmp_path / "Llama-2-7b-chat-hf")}),
                    tokenizer=build_tiny_model().tokenizer)
    with pytest.raises(FileNotFoundError, match="checkpoint_stage3.pth"):
        build_model(tiny_model_config(init_from=str(tmp_path / "checkpoint_stage3.pth")))


def test_llama_loads_from_a_local_hf_folder_with_its_tokenizer(tmp_path):
    """``text.path`` goes through ``from_pretrained`` (local only) and ``<path>/tokenizer.model``."""
    import shutil

    from minigpt4.tokenizer import tiny_tokenizer_path

    from transformers import LlamaForCausalLM

    from minigpt4.models.llama import llama_config

    torch.manual_seed(3)
    source = LlamaForCausalLM(llama_config(tiny_model_config().text, None))
    folder = tmp_path / "Llama-2-tiny-hf"
    source.save_pretrained(folder)
    shutil.copy(tiny_tokenizer_path(), folder / "tokenizer.model")
    model = build_model(tiny_model_config(**{"text.path": str(folder)}))
    assert model.tokenizer.path == folder / "tokenizer.model"
    for name, weight in source.state_dict().items():
        peft_name = name.replace(".q_proj.weight", ".q_proj.base_layer.weight").replace(".k_proj.weight", ".k_proj.base_layer.weight")
        assert torch.equal(model.llama.state_dict()[peft_name], weight), name
    assert model.llama.model.embed_tokens.weight.dtype == torch.float32


def _full_logits_loss(model, images, instructions, answers, pad_to_multiple_of=None):
    """The previous computation: HF's shifted loss over full (B, L, vocab) logits."""
    batch = model.tokenize(instructions, answers, "right", pad_to_multiple_of=pad_to_multiple_of)
    embeds = model.embed_inputs(batch["input_ids"], batch["image_mask"], model.encode_images(images))
    return model.llama_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    ).loss


def _loss_and_trainable_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _nonzero_lora_b(model):
    with torch.no_grad():  # non-zero B so that the LoRA A gradients are non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))


def test_answer_position_loss_equals_full_logits_loss_with_gradients():
    model = build_tiny_model(**{"lora.dropout": 0.0})
    _nonzero_lora_b(model)
    model.train()
    images = tiny_images(3, seed=2)
    instructions = [INSTRUCTIONS[0], INSTRUCTIONS[1], "[refer] Where can I locate the liver?"]
    answers = ["{<12><34><56><78>}", "yes", "{<3><40><9><77>}"]  # different lengths: right padding
    new_loss, new_grads = _loss_and_trainable_grads(model, lambda: model(images, instructions, answers).loss)
    old_loss, old_grads = _loss_and_trainable_grads(model, lambda: _full_logits_loss(model, images, instructions, answers))
    assert torch.allclose(new_loss, old_loss, rtol=1e-6, atol=1e-6)
    assert set(new_grads) == set(old_grads) and any("llama_proj" in n for n in new_grads)
    assert sum("lora_A" in n for n in new_grads) == sum("lora_B" in n for n in new_grads) == 4  # 2 layers × q, k
    for name, grad in new_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, old_grads[name], rtol=1e-4, atol=1e-6), name


def test_padding_to_a_multiple_of_64_does_not_change_the_loss():
    model = build_tiny_model(**{"lora.dropout": 0.0})
    images = tiny_images()
    with torch.no_grad():
        plain = model(images, INSTRUCTIONS, ANSWERS)
        model.pad_to_multiple_of = 64
        try:
            padded = model(images, INSTRUCTIONS, ANSWERS)
        finally:
            model.pad_to_multiple_of = None
    assert plain.labels.shape[1] % 64 and padded.labels.shape[1] % 64 == 0
    assert torch.equal(padded.targets, plain.targets)
    assert torch.allclose(padded.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(padded.logits, plain.logits, atol=1e-5)


def test_cached_tower_tokens_give_the_same_loss_as_images(model):
    images = tiny_images()
    with torch.no_grad():
        tower = model.encode_tower(images)
        assert tower.shape == (2, 1 + 64, 64)
        assert torch.equal(model.project_visual(tower), model.encode_images(images))
        from_images = model(images, INSTRUCTIONS, ANSWERS).loss
        from_tower = model(None, INSTRUCTIONS, ANSWERS, tower_tokens=tower).loss
    assert torch.equal(from_images, from_tower)
    with pytest.raises(ValueError, match="either images or tower_tokens"):
        model(images, INSTRUCTIONS, ANSWERS, tower_tokens=tower)
    with pytest.raises(ValueError, match=r"tower tokens must be \(B, 65, 64\)"):
        model(None, INSTRUCTIONS, ANSWERS, tower_tokens=tower[:, 1:])


@pytest.mark.parametrize("autocast", [False, True])
def test_only_the_loss_is_kept_through_backward(model, autocast):
    """The trainer keeps ``model(...).loss`` only: then nothing holds the (T, vocab) logits during
    backward (the loss's graph keeps the log-softmax, not the logits)."""
    import gc
    import weakref

    seen: list = []
    hook = model.llama.lm_head.register_forward_hook(lambda module, args, output: seen.append(weakref.ref(output)))
    try:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(tiny_images(2), INSTRUCTIONS[:2], ["{<12><34><56><78>}", "yes"]).loss
        gc.collect()
        assert len(seen) == 1 and seen[0]() is None  # freed before backward
        loss.backward()
        held = model(tiny_images(2), INSTRUCTIONS[:2], ["{<12><34><56><78>}", "yes"])
        assert seen[1]() is held.logits  # the check can fail: an output that is kept is seen alive
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
