"""run.compile (regional torch.compile of every decoder layer / EVA block) and the optimizer.

The fast tests compile with the ``aot_eager`` backend (graph capture + AOTAutograd, no code
generation); the inductor test generates C++ kernels and takes about a minute on one CPU core.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from minigpt4.config import load_config
from minigpt4.models.minigpt_v2 import MiniGPTPancreas
from minigpt4.training.trainer import build_optimizer
from tests.test_model import _loss_and_trainable_grads, _nonzero_lora_b
from tests.test_train import data, run_train, step_losses  # noqa: F401  (module fixture)
from tests.tiny import build_tiny_model, tiny_images

torch.set_num_threads(1)

INSTRUCTIONS = ["[refer] Where is the pancreas?", "[vqa] Is a pancreatic tumor visible in the image?"]
ANSWERS = ["{<12><34><56><78>}", "yes"]


def _eager_and_compiled(backend: str):
    """(loss, grads) of one training forward+backward, eager then compiled, on identical models."""
    results = []
    for compiled in (False, True):
        model = build_tiny_model(**{"lora.dropout": 0.0})
        _nonzero_lora_b(model)
        if compiled:
            model.compile_regions(pad_to_multiple_of=64, backend=backend)
        model.train()
        results.append(_loss_and_trainable_grads(model, lambda: model(tiny_images(), INSTRUCTIONS, ANSWERS).loss))
        assert model.compiled == compiled
        if compiled:  # generation runs the compiled layers eagerly and still works
            model.eval()
            with model.eager_layers():
                assert len(model.generate(tiny_images(), INSTRUCTIONS, max_new_tokens=2)) == 2
    return results


def _assert_close(eager, compiled, rtol):
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    assert torch.allclose(loss_c, loss_e, rtol=rtol, atol=1e-6)
    assert set(grads_c) == set(grads_e)
    for name in grads_e:
        assert torch.allclose(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5), name


def test_compiled_regions_give_the_eager_loss_and_gradients_aot_eager():
    torch._dynamo.reset()
    eager, compiled = _eager_and_compiled("aot_eager")
    _assert_close(eager, compiled, rtol=1e-6)


def _inductor_available() -> bool:
    try:
        import torch._inductor  # noqa: F401
    except Exception:
        return False
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _inductor_available(), reason="torch inductor or a C++ compiler (g++) is not available")
def test_compiled_regions_give_the_eager_loss_and_gradients_inductor():
    torch._dynamo.reset()
    eager, compiled = _eager_and_compiled("inductor")
    _assert_close(eager, compiled, rtol=1e-5)


def test_train_with_run_compile_pads_and_equals_eager(data, tmp_path, monkeypatch):  # noqa: F811
    torch._dynamo.reset()
    common = ("model.vision.trainable=false", "run.iters_per_epoch=1", "run.max_steps=1", "run.val_max_samples=2")
    run_train(data, tmp_path / "eager", *common)
    calls = []
    original = MiniGPTPancreas.compile_regions

    def compile_regions(self, pad_to_multiple_of=64, backend="inductor"):
        calls.append(pad_to_multiple_of)
        original(self, pad_to_multiple_of, backend="aot_eager")  # inductor: see the slow test above

    monkeypatch.setattr(MiniGPTPancreas, "compile_regions", compile_regions)
    run_train(data, tmp_path / "compiled", *common, "run.compile=true", "run.compile_pad_to_multiple_of=32")
    assert calls == [32]
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1]
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5)
    # validation (generation under eager_layers) ran and the checkpoint is written as usual
    assert (tmp_path / "compiled" / "val_metrics.jsonl").is_file()
    assert (tmp_path / "compiled" / "checkpoint_epoch_0" / "model.safetensors").is_file()


def test_adamw_decays_matrices_only_and_is_not_fused_on_cpu():
    model = build_tiny_model()
    optimizer = build_optimizer(model, load_config(None, ["run.weight_decay=0.05", "run.init_lr=1e-4"]))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len([p for p in model.parameters() if p.requires_grad])
    assert not decay["fused"] and decay["lr"] == 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW is used on CUDA only (no GPU here)")
def test_adamw_is_fused_on_cuda():
    model = build_tiny_model(device="cuda")
    assert build_optimizer(model, load_config()).param_groups[0]["fused"] is True
