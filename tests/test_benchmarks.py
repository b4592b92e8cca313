"""benchmarks/run_all.py: the report writer on fake benchmark JSONs, and the subprocess runner.

No benchmark is timed here: the figures are made up so that every ratio in the report can be
checked by hand (e.g. pipeline 4.2 s CPU / floor 3.5 s CPU = 1.20×).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


run_all = _load_run_all()

STATUS = {"date": "2025-01-02T03:04:05+00:00", "commit": "abc1234", "returncode": 0, "seconds": 61.0, "cpu_s": 58.0,
          "load_before": 1.5, "load_mean": 2.5, "load_max": 3.5, "command": "python benchmarks/x.py --n 4"}
PREPROCESS = {"volumes": 4, "size": 512, "slices": 100, "pngs": 171, "cores": 2, "repeat": 2,
              "floor": {"wall_s": 5.0, "cpu_s": 3.5},
              "one_worker": {"wall_s": 6.0, "cpu_s": 4.2, "slices_per_s": 28.5, "read_s": 2.0, "stats_s": 0.5,
                             "write_s": 3.5},
              "many_workers": {"workers": 2, "wall_s": 4.0, "slices_per_s": 42.75},
              "ratio_wall": 1.2, "ratio_cpu": 1.2, "speedup_workers": 1.5}
TRAIN = {"size": "tiny", "device": "cpu", "batch_size": 16, "workers": 0, "steps_measured": 25,
         "samples_per_s": 30.0, "data_fraction": 0.25}
EVAL = {"device": "CPU, 2 threads", "full_size": False, "build_s": 1.0, "max_new_tokens": 20,
        "rows": [{"batch": 1, "samples": 32, "seconds": 32.0, "samples_per_s": 1.0, "mean_answer_tokens": 19.5,
                  "same_answers_as_first": 1.0},
                 {"batch": 16, "samples": 32, "seconds": 6.4, "samples_per_s": 5.0, "mean_answer_tokens": 19.5,
                  "same_answers_as_first": 1.0}]}
TC = {"data": "/tmp/tc", "n_train": 1600, "n_test": 400, "test_yes_fraction": 0.6,
      "results": {"hist_gbm": {"accuracy": 0.84, "auc": 0.9, "n": 400, "seconds": 2.0},
                  "cnn_3layer": {"accuracy": 0.78, "auc": 0.85, "n": 400, "seconds": 60.0}}}
GPU = {"gpu": "NVIDIA H200", "torch": "2.14.1", "date": "2025-01-01", "seq_len": 322, "seq_len_compiled": 384,
       "flops_per_sample": 10.9e12, "flops_per_sample_cached": 9.0e12, "peak_flops": 989e12, "complete": True,
       "default_plan": {"batch": 8, "grad_accum": 2},
       "rows": [{"batch": 16, "grad_accum": 1, "checkpoint_every": 0, "checkpointing": "off", "compile": False,
                 "feature_cache": False, "seq_len": 322, "step_s": 1.6, "samples_per_s": 10.0, "peak_gib": 45.0,
                 "reserved_gib": 47.0, "predicted_gib": 44.9, "predicted_reserved_gib": 47.1, "mfu": 0.11, "status": "ok"},
                {"batch": 8, "grad_accum": 2, "checkpoint_every": 0, "checkpointing": "off", "compile": False,
                 "feature_cache": False, "seq_len": 322, "step_s": 2.0, "samples_per_s": 8.0, "peak_gib": 30.0,
                 "reserved_gib": 33.0, "predicted_gib": 30.1, "predicted_reserved_gib": 31.6, "mfu": 0.09, "status": "ok"},
                {"batch": 16, "grad_accum": 1, "checkpoint_every": 3, "checkpointing": "every 3", "compile": True,
                 "feature_cache": True, "seq_len": 384, "oom": True, "predicted_gib": 36.0, "predicted_reserved_gib": 37.8, "status": "oom"},
                {"batch": 16, "grad_accum": 1, "checkpoint_every": 1, "checkpointing": "all layers", "compile": True,
                 "feature_cache": False, "seq_len": 384, "skipped": "deadline: 40 s left, a compile or recompile needs 90 s",
                 "predicted_gib": 20.0, "predicted_reserved_gib": 21.0, "status": "skipped"}]}
TRAIN_30 = {"steps": 30, "image_size": 448, "batch_size": 8, "grad_accum_steps": 2, "first_loss": 10.5,
            "last_loss": 4.25, "loss_falls": True, "samples_per_s": 9.5}


def _write_results(folder: Path, benches: dict, gpu: bool = False) -> None:
    run = {"date": "2025-01-02 03:04 UTC", "mode": "default", "seconds": 300.0, "commit": "abc1234",
           "machine": {"cpu": "Test CPU 9000", "cores": 2, "cpu_count": 2, "ram_gib": 24.0, "os": "Linux-test"},
           "versions": {"python": "3.11.9", "torch": "2.14.1", "transformers": "5.24.0", "peft": "0.21.2",
                        "numpy": "2.3.0"},
           "benches": benches}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_all.json").write_text(json.dumps(run))
    for name, data in (("preprocess", PREPROCESS), ("train", TRAIN), ("eval", EVAL), ("tc", TC)):
        (folder / f"{name}.json").write_text(json.dumps(data))
    if gpu:
        (folder / "gpu_full_size.json").write_text(json.dumps(GPU))
        (folder / "train_30_steps.json").write_text(json.dumps(TRAIN_30))


def _report(tmp_path: Path, benches: dict, gpu: bool = False) -> str:
    results, out = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    _write_results(results, benches, gpu)
    assert run_all.main(["--report-only", "--results", str(results), "--out", str(out)]) == 0
    return out.read_text()


def test_report_has_every_section_with_same_run_ratios(tmp_path):
    text = _report(tmp_path, {name: dict(STATUS) for name in ("preprocess", "train", "eval", "tc")})
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == ["# Benchmarks", "## Machine and versions", "## Summary", "## Preprocessing",
                        "## Training (tiny model, CPU)", "## Evaluation (tiny model, CPU)",
                        "## Tumor-classification baselines (real crops, CPU)", "## GPU (full size)"]
    # header: date, machine, versions, commit, load
    assert "| date | 2025-01-02 03:04 UTC |" in text
    assert "| machine | Test CPU 9000, 2 usable cores (2 logical), 24.0 GiB RAM |" in text
    for row in ("| Python | 3.11.9 |", "| torch | 2.14.1 |", "| transformers | 5.24.0 |", "| peft | 0.21.2 |",
                "| numpy | 2.3.0 |", "| git commit | abc1234 |"):
        assert row in text
    assert "load average while the benchmarks ran: 2.5–2.5" in text
    # preprocessing: 4.2 / 3.5 CPU = 1.20×, 2 workers 4.0 / 5.0 wall = 0.80× of the floor
    assert "| floor (read volumes + encode/write the same PNGs) | 5.00 s | 3.50 s | 1 |" in text
    assert "**1.20× (CPU)**" in text and "| 0.80× (wall); speed-up 1.50× over 1 worker |" in text
    assert "Best of 2 interleaved repeats." in text
    assert "reading 2.00 s, slice statistics and boxes 0.50 s" in text
    # training: 30 samples/s with 25 % data wait → 40 compute-only, ratio 0.75
    assert "| training loop (data loading + step) | 30.0 | 0.75× of compute-only |" in text
    assert "| compute only (loop minus waiting for data) | 40.0 | 1 |" in text
    assert "Data loading is **25.0 %**" in text
    # evaluation: 5.0 / 1.0 = 5.0×, answers unchanged
    assert "| 16 | 5.00 | **5.0×** | 19.5 | 100 % |" in text and "Batching changed no answer." in text
    # TC: majority class 0.6 → 0.84 / 0.6 = 1.40×
    assert "| majority class (`yes`) | 0.600 | 1 | 0.500 | – |" in text
    assert "| crop size + intensity histogram → gradient boosting | 0.840 | 1.40× | 0.900 | 2 s |" in text
    # summary rows carry the same ratios
    assert "| I/O floor: 3.50 s CPU | 1.20× |" in text
    assert "| batch 1: 1.00 samples/s | 5.0× |" in text
    assert "| majority class: 0.600 | 1.40× |" in text
    # per-benchmark load and command lines
    assert "1-minute load average 1.5 before, 2.5 mean / 3.5 max while it ran" in text
    assert "Command: `python benchmarks/x.py --n 4`" in text
    # hand-written notes kept
    assert "release's scripts spend about 9.4 s on 4 such volumes" in text
    assert "≈ 95 % of the time is spent in `model.generate`" in text
    # GPU: not run → the exact command
    gpu = text.split("## GPU (full size)")[1]
    assert "**Not yet measured**" in gpu and run_all.GPU_COMMAND in gpu
    assert run_all.GPU_COMMAND == "python benchmarks/gpu_full_size.py --json benchmarks/results/gpu_full_size.json"


def test_report_keeps_gpu_figures_and_names_the_card(tmp_path):
    text = _report(tmp_path, {name: dict(STATUS) for name in ("preprocess", "train", "eval", "tc")}, gpu=True)
    gpu = text.split("## GPU (full size)")[1]
    assert "Not yet measured" not in gpu
    assert ("Card: **NVIDIA H200**; torch 2.14.1; measured 2025-01-01; sequence 322 tokens (384 compiled); model "
            "FLOPs/sample 10.90 TFLOP (9.00 with cached ViT features); dense bf16 peak 989 TFLOP/s.") in gpu
    assert "| 16 × 1 | off | off | off | 322 | 10.00 | 1.600 | 45.0 | 44.9 | 47.0 | 47.1 | 11.0 % |" in gpu
    assert "| 8 × 2 | off | off | off | 322 | 8.00 | 2.000 | 30.0 | 30.1 | 33.0 | 31.6 | 9.0 % |" in gpu
    assert "| 16 × 1 | every 3 | on | on | 384 | OOM | | | 36.0 | | 37.8 | |" in gpu
    assert ("| 16 × 1 | all layers | on | off | 384 | skipped: deadline: 40 s left, a compile or recompile needs 90 s "
            "| | | 20.0 | | 21.0 | |") in gpu
    # the default plan (8 × 2, eager, no cache): reserved 33.0 + 0.5 GiB context fits the 39.5 GiB of an A100-40GB
    assert ("Default training config (batch 8 × accumulation 2, no checkpointing): allocated peak 30.0 GiB (predicted "
            "30.1); fits an A100-40GB: yes.") in gpu
    # memory model check: 45.0 / 44.9 = 1.002 (within 8 %), 33.0 / 31.6 = 1.044 (within 15 %)
    assert "| 16 × 1, checkpointing off, compile off, cache off | 1.002 | yes | 0.998 | yes |" in gpu
    assert "| 8 × 2, checkpointing off, compile off, cache off | 0.997 | yes | 1.044 | yes |" in gpu
    assert "Partial" not in gpu
    assert ("30 optimizer steps of real `train.py` at full size (random weights, synthetic phantoms at 448 px, batch "
            "8 × accumulation 2): loss 10.500 (mean of the first 5 steps) → 4.250 (last 5): **falls**") in gpu
    broken = {**TRAIN_30, "first_loss": None, "last_loss": None, "loss_falls": False, "losses": [9.5, "nan"],
              "complete": False, "stopped": None}
    assert run_all.render_device_train(broken).endswith("batch 8 × accumulation 2): **a loss was not finite** (9.5, nan …).")


def test_failed_skipped_and_unrun_benchmarks_do_not_show_stale_figures(tmp_path):
    failed = {**STATUS, "returncode": 1, "error": "exit status 1\nTraceback (most recent call last):\nValueError: boom"}
    text = _report(tmp_path, {"preprocess": dict(STATUS), "eval": failed,
                              "tc": {"date": "d", "commit": "c", "skipped": "the real TC crops are absent"}})
    evaluation = text.split("## Evaluation (tiny model, CPU)")[1].split("## Tumor")[0]
    assert "**Failed** — exit status 1." in evaluation and "ValueError: boom" in evaluation
    assert "5.0×" not in text  # eval.json exists but belongs to no successful run
    assert "Skipped: the real TC crops are absent." in text
    assert "Not run in this report" in text.split("## Training (tiny model, CPU)")[1].split("## Evaluation")[0]
    summary = text.split("## Summary")[1].split("## Preprocessing")[0]
    assert "| Evaluation (tiny model, CPU) | not measured (see below) | | |" in summary
    assert "| I/O floor: 3.50 s CPU | 1.20× |" in summary


def test_report_only_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert run_all.main(["--report-only", "--results", str(tmp_path), "--out", str(tmp_path / "B.md")]) == 2
    assert "run_all.json: no earlier run" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def _fake_bench(tmp_path: Path, body: str) -> "run_all.Bench":
    script = tmp_path / "fake_bench.py"
    script.write_text("import argparse, json, sys, time\n"
                      "p = argparse.ArgumentParser(); p.add_argument('--n', type=int); p.add_argument('--json')\n"
                      "a = p.parse_args()\n" + body)
    return run_all.Bench("fake", "Fake", str(script), default=(), quick=())


def test_run_bench_collects_json_and_load(tmp_path):
    bench = _fake_bench(tmp_path, "print('hello', a.n)\njson.dump({'n': a.n}, open(a.json, 'w'))\n")
    (tmp_path / "fake.json").write_text('{"n": -1}')  # an earlier run's figures must go
    status = run_all.run_bench(bench, ["--n", "7"], tmp_path, timeout=60, tmp=tmp_path, echo=False)
    assert status["returncode"] == 0 and "error" not in status
    assert json.loads((tmp_path / "fake.json").read_text()) == {"n": 7}
    assert (tmp_path / "fake.log").read_text() == "hello 7\n"
    assert status["command"].endswith("fake_bench.py --n 7")
    assert status["load_max"] >= status["load_mean"] >= 0 and status["seconds"] > 0


def test_run_bench_reports_failure_and_timeout(tmp_path):
    bench = _fake_bench(tmp_path, "print('step 1')\nsys.exit('broken input: x.nii.gz')\n")
    (tmp_path / "fake.json").write_text('{"n": -1}')
    status = run_all.run_bench(bench, [], tmp_path, timeout=60, tmp=tmp_path, echo=False)
    assert status["returncode"] == 1 and not (tmp_path / "fake.json").exists()
    assert status["error"].splitlines() == ["exit status 1", "step 1", "broken input: x.nii.gz"]

    slow = _fake_bench(tmp_path, "print('started', flush=True)\ntime.sleep(60)\n")
    status = run_all.run_bench(slow, [], tmp_path, timeout=1, tmp=tmp_path, echo=False)
    assert status["error"].startswith("timed out after 1 s") and status["seconds"] < 30


def test_machine_and_versions_are_filled():
    m, v = run_all.machine_info(), run_all.versions()
    assert m["cores"] >= 1 and m["cpu"] and (m["ram_gib"] is None or m["ram_gib"] > 0)
    assert set(v) == {"python", "torch", "transformers", "peft", "numpy"}
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]


def test_every_bench_script_accepts_json_and_the_run_all_sizes():
    """Each CPU script parses run_all's default and quick arguments plus --json (parse only, via --help)."""
    for bench in run_all.BENCHES:
        source = (ROOT / bench.script).read_text()
        assert '"--json"' in source, f"{bench.script} has no --json option"
        for option in {a for a in (*bench.default, *bench.quick) if a.startswith("--")}:
            assert f'"{option}"' in source, f"{bench.script} has no {option} option"


def test_tc_input_is_imported_from_the_shared_crops_or_skipped(tmp_path, monkeypatch):
    if not (run_all.TC_CROPS / "labels.csv").is_file():
        pytest.skip(f"real TC crops absent ({run_all.TC_CROPS})")
    args, reason = run_all._prepare_tc(tmp_path)
    assert reason is None and args == ["--data", str(tmp_path / "tc")]
    assert (tmp_path / "tc" / "manifest.json").is_file()
    monkeypatch.setattr(run_all, "TC_CROPS", tmp_path / "nowhere")
    args, reason = run_all._prepare_tc(tmp_path / "other")
    assert args == [] and "real TC crops are absent" in reason and "nowhere/labels.csv" in reason


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


gpu = _load_script("gpu_full_size")


def test_gpu_cases_in_order_of_value_and_exact_card_peaks():
    cases = gpu.cases()
    assert len(cases) == 16
    # the default of train_configs/stage1_pancreas_detection.yaml first, eager then compiled
    assert cases[:2] == [gpu.Case(8, 2, 0, False, False), gpu.Case(8, 2, 0, True, False)]
    # then every eager variant (the feature cache, batch 16 with partial checkpointing, ...), then
    # the compiled ones: no eager case waits behind a compile the deadline may cut
    assert cases[2:4] == [gpu.Case(8, 2, 0, False, True), gpu.Case(16, 1, 3, False, False)]
    assert [c.compile for c in cases] == [False, True] + [False] * 7 + [True] * 7
    # the feature cache reuses the compiled graphs of its batch and checkpointing: no new compile budget
    assert gpu.Case(8, 2, 0, True, True).graph_key == gpu.Case(8, 2, 0, True, False).graph_key
    assert gpu.Case(16, 1, 3, True, False).graph_key != gpu.Case(16, 1, 0, True, False).graph_key
    assert {(c.batch, c.grad_accum, c.checkpointing, c.compile, c.feature_cache) for c in cases} == {
        (b, a, ck, comp, cache) for b, a, ck in ((16, 1, "off"), (16, 1, "every 3"), (16, 1, "all layers"), (8, 2, "off"))
        for comp in (False, True) for cache in (False, True)}
    dry = gpu.cases(dry_run=True)
    assert dry[:2] == [gpu.Case(1, 2, 0, False, False), gpu.Case(1, 2, 0, True, False)]
    assert [c.compile for c in dry].count(True) == 1 and len(dry) == 9
    assert gpu.cases((False,))[0] == gpu.Case(8, 2, 0, False, False)
    for name, peak in (("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-40GB", 312e12)):
        assert gpu.peak_flops(name) == peak, name
    for unknown in ("NVIDIA H100", "NVIDIA H200 Super", "Tesla T4", "NVIDIA GH200 480GB", ""):
        assert gpu.peak_flops(unknown) is None, unknown  # never a guess
    for script in ("run_device.sh", "fetch_wheels.sh"):  # shell syntax
        assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu" / script)]).returncode == 0


def test_full_size_training_flops_by_hand():
    from minigpt4.config import ModelConfig

    qv = {"targets": ["q_proj", "v_proj"], "r": 64}
    terms = gpu.train_flops(ModelConfig(), 322, 40, qv)
    eva_tokens = 1025
    assert terms["eva_forward"] == 39 * (2 * (4 * 1408**2 + 2 * 1408 * 6144) * eva_tokens + 4 * eva_tokens**2 * 1408) \
        + 2 * 3 * 14**2 * 1408 * 1024  # 39 blocks (BLIP-2 drops EVA-CLIP-g's 40th) + patch embedding
    assert terms["llama_linear_forward_and_input_grad"] == 2 * 2 * 32 * (4 * 4096**2 + 3 * 4096 * 11008) * 322
    assert terms["attention_forward_and_backward"] == 3 * 4 * 32 * 322**2 * 4096  # backward 2× the forward
    assert terms["lm_head_answer_positions"] == 2 * 2 * 4096 * 32000 * 40  # the 40 answer positions only
    assert terms["lora_trained"] == 3 * 2 * 64 * 8192 * 2 * 32 * 322  # q,k r 64: forward + 2× backward
    assert terms["lora_frozen_stacked"] == 2 * 2 * 64 * 8192 * 2 * 32 * 322  # q,v: forward + activation grads
    assert terms["projection_forward_and_weight_grad"] == 2 * 2 * 5632 * 4096 * 256
    assert terms["total"] == pytest.approx(10.92e12, rel=0.005)
    padded = gpu.train_flops(ModelConfig(), 384, 40, qv)  # compiled: the padded tokens run too
    assert padded["llama_linear_forward_and_input_grad"] == terms["llama_linear_forward_and_input_grad"] / 322 * 384
    assert padded["eva_forward"] == terms["eva_forward"] and padded["total"] / terms["total"] == pytest.approx(1.155, abs=0.002)
    assert gpu.train_flops(ModelConfig(), 322, 40, qv, with_vit=False)["total"] == terms["total"] - terms["eva_forward"]


def test_flops_equal_a_flop_counter_on_a_tiny_model():
    """train_flops / generation_flops against torch's FlopCounterMode on a tiny model with a stacked
    frozen q,v adapter: equal except the attention terms (SDPA on CPU is not counted), computed here."""
    from torch.utils.flop_counter import FlopCounterMode

    from minigpt4.prompts import build_prompt_tokens
    from tests.tiny import build_tiny_model

    torch = pytest.importorskip("torch")
    model = build_tiny_model(**{"lora.dropout": 0.0})
    stacked = gpu.stack_random_adapter(model, 4)
    assert stacked == {"targets": ["q_proj", "v_proj"], "r": 4, "params": 2 * 2 * 2 * 4 * 64}
    cfg, instruction, answer = model.cfg, "[refer] where is the pancreas?", "{<10><20><30><40>}"
    eva_attention = 4 * cfg.vision.depth * (1 + cfg.vision.num_patches) ** 2 * cfg.vision.width
    sample = build_prompt_tokens(model.tokenizer, instruction, model.num_visual_tokens, answer=answer)
    length, answers = len(sample.input_ids), int((sample.labels != -100).sum())
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 112, 112), [instruction] * 2, [answer] * 2).loss.backward()
    llama_attention = 3 * 4 * cfg.text.num_layers * length**2 * cfg.text.hidden_size
    expected = gpu.train_flops(cfg, length, answers, stacked)["total"] - eva_attention - llama_attention
    assert counter.get_total_flops() / 2 == expected

    model.eval()
    prompt = len(build_prompt_tokens(model.tokenizer, instruction, model.num_visual_tokens).input_ids)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        new = model.generate_ids(torch.randn(1, 3, 112, 112), [instruction], max_new_tokens=6).shape[1]
    attention = 4 * cfg.text.num_layers * cfg.text.hidden_size * (prompt**2 + sum(prompt + j for j in range(1, new)))
    assert counter.get_total_flops() == gpu.generation_flops(cfg, prompt, new, stacked) - eva_attention - attention


def test_a_non_finite_loss_fails_the_case(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.tiny import build_tiny_model

    model = build_tiny_model()
    case = gpu.Case(1, 2, 0, False, False)
    row = gpu.run_case(model, case, 1, 0, "[refer] where is the pancreas?", "{<1><2><3><4>}", "cpu")
    assert row["status"] == "ok" and len(row["losses"]) == 2 and row["samples_per_s"] > 0
    with torch.no_grad():
        model.llama_proj.weight.fill_(float("nan"))
    row = gpu.run_case(model, case, 1, 0, "[refer] where is the pancreas?", "{<1><2><3><4>}", "cpu")
    assert row["status"] == "failed" and row["error"].startswith("non-finite loss")
    assert row["losses"] == ["nan", "nan"]  # strict JSON: the name, not a bare NaN


def test_a_compile_error_skips_the_remaining_compiled_cases(tmp_path, monkeypatch):
    """Each finished case is in the JSON at once; after a compile error no compiled case runs again."""
    order = [gpu.Case(1, 2, 0, False, False), gpu.Case(1, 2, 0, True, False), gpu.Case(2, 1, 0, True, False),
             gpu.Case(2, 1, 0, False, False)]
    out = tmp_path / "g.json"
    seen = []

    def fake_case(model, case, steps, warmup, instruction, answer, device):
        seen.append((case, json.loads(out.read_text())["rows"]))  # the JSON holds the cases before this one
        if case.compile:
            raise RuntimeError("BackendCompilerFailed: inductor boom")
        return {**gpu.dataclasses.asdict(case), "checkpointing": case.checkpointing, "status": "ok", "losses": [1.0],
                "step_s": 1.0, "samples_per_s": 2.0, "peak_gib": None, "reserved_gib": None}

    monkeypatch.setattr(gpu, "cases", lambda *a, **k: order)
    monkeypatch.setattr(gpu, "run_case", fake_case)
    monkeypatch.delenv("MINIGPT_DEADLINE", raising=False)
    assert gpu.main(["--dry-run", "--json", str(out)]) == 1  # a compile error is an error: non-zero
    result = json.loads(out.read_text())
    assert result["outcome"] == "failed"
    assert [c for c, _ in seen] == order[:2] + order[3:]  # the second compiled case never ran
    assert [len(rows) for _, rows in seen] == [0, 1, 3]
    assert [r["status"] for r in result["rows"]] == ["ok", "failed", "skipped", "ok"]
    assert "inductor boom" in result["rows"][1]["error"]
    assert result["rows"][2]["skipped"].startswith("compile failed earlier (RuntimeError: BackendCompilerFailed")
    assert result["complete"] is True and result["stopped"] is None


def _run_device(tmp_path, *args, wait=True):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("MINIGPT_DEADLINE", None)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu" / "run_device.sh"), "--dry-run", *args]
    if not wait:
        return out, subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
    return out, subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_device_deadline_leaves_a_partial_json(tmp_path):
    """--deadline-s 45 (the pre-flight's real imports included): the matrix stops after the cases
    that fit (the compiled one needs 90 s), the steps after it are cut, and both JSON files say
    complete: false while holding what finished (≈ 45 s)."""
    out, done = _run_device(tmp_path, "--deadline-s", "45")
    # only the deadline stopped it: exit 0, and device_run.json says so
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads((out / "device_run.json").read_text())
    assert status["complete"] is False and status["stopped"] == "deadline (45 s)" and status["deadline_s"] == 45
    assert status["outcome"] == "deadline" and status["failed_steps"] == []
    assert "gpu_full_size" in status["cut_by_deadline"]  # its compiled case never fits 45 s
    steps = {s["step"]: s for s in status["steps"]}
    matrix_step = steps["gpu_full_size"]
    matrix = json.loads((out / "gpu_full_size.json").read_text())
    assert matrix_step["deadline"] is True and "failed" not in matrix_step  # cut by time: not an error
    if matrix_step["returncode"] == 0:  # it stopped starting cases before its deadline
        assert matrix_step["note"].startswith("deadline:") and matrix["stopped"].startswith("deadline:")
        assert matrix["outcome"] == "deadline"
    else:  # a case overran its deadline on a loaded CPU: the step's time limit stopped it (SIGTERM, JSON flushed)
        assert matrix_step["returncode"] == 124 and matrix_step["note"].startswith("stopped at its limit of")
        assert matrix["stopped"].startswith("SIGTERM after")
    # the later steps run while time is left: on a fast CPU they all fit, on a loaded one they are cut
    cascade_step = steps["cascade_full_size"]
    if cascade_step["note"].startswith("skipped: deadline"):
        assert "cascade_full_size" in status["cut_by_deadline"] and not (out / "cascade_full_size.json").exists()
    else:
        assert cascade_step["returncode"] == 0 and (out / "cascade_full_size.json").is_file()
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in out.iterdir())  # readable by others
    assert matrix["complete"] is False
    finished = [r for r in matrix["rows"] if r["status"] == "ok"]
    assert finished and finished[0]["batch"] == 1 and finished[0]["grad_accum"] == 2  # the default came first
    assert all(r["samples_per_s"] > 0 and len(r["losses"]) == r["grad_accum"] for r in finished)  # 1 step each
    # the compiled default needs 90 s for its compile: skipped, said why
    compiled = next(r for r in matrix["rows"] if r["compile"])
    assert compiled["status"] == "skipped" and "a compile or recompile needs 90 s" in compiled["skipped"]


@pytest.mark.slow
def test_run_device_sigterm_flushes_what_is_done(tmp_path):
    """SIGTERM once the first case is in gpu_full_size.json: both JSON files keep it, complete: false."""
    import signal
    import time

    out, proc = _run_device(tmp_path, wait=False)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            path = out / "gpu_full_size.json"
            if path.is_file() and json.loads(path.read_text())["rows"]:
                break
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    status = json.loads((out / "device_run.json").read_text())
    assert status["complete"] is False and status["stopped"] == "SIGTERM"
    assert status["steps"][-1] == {**status["steps"][-1], "step": "gpu_full_size", "returncode": None,
                                   "note": "interrupted by SIGTERM"}
    matrix = json.loads((out / "gpu_full_size.json").read_text())
    assert matrix["complete"] is False and matrix["stopped"].startswith("SIGTERM after")
    assert matrix["rows"][0]["status"] == "ok" and matrix["rows"][0]["batch"] == 1


def test_import_device_copies_partial_results_and_checks_memory(tmp_path, capsys):
    """A fabricated, partial device folder (made here in tmp, never a committed result)."""
    results = tmp_path / "results"
    _write_results(results, {name: dict(STATUS) for name in ("preprocess", "train", "eval", "tc")})
    (results / "cascade_full_size.json").write_text('{"stale": true}')  # an earlier device run's file
    device = tmp_path / "device_out"
    device.mkdir()
    partial = {**GPU, "complete": False, "stopped": "SIGTERM after 2 cases", "rows": GPU["rows"][:2]}
    (device / "gpu_full_size.json").write_text(json.dumps(partial))
    (device / "device_run.json").write_text(json.dumps({
        "date": "2025-01-01 10:00", "nvidia_smi": "NVIDIA H200, 143771 MiB, 570.1", "deadline_s": 520,
        "complete": False, "stopped": "SIGTERM",
        "steps": [{"step": "gpu_full_size", "returncode": None, "seconds": 200, "note": "interrupted by SIGTERM"}]}))
    (device / "run_device.log").write_text("log\n")
    md = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--import-device", str(device), "--results", str(results), "--out", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "imported device_run.json (partial)" in printed and "imported gpu_full_size.json (partial)" in printed
    assert ("memory model: 8 × 2, checkpointing off, compile off, cache off: peak measured 30.00 GiB / predicted "
            "30.10 = 0.997 (within the expected error)") in printed
    assert json.loads((results / "gpu_full_size.json").read_text()) == partial
    assert not (results / "cascade_full_size.json").exists()  # not this run's
    gpu_text = md.read_text().split("## GPU (full size)")[1]
    assert "**Partial**: this run stopped before the end (SIGTERM after 2 cases)" in gpu_text
    assert "| gpu_full_size | – | 200 | interrupted by SIGTERM |" in gpu_text
    assert "| 8 × 2 | off | off | off | 322 | 8.00 | 2.000 | 30.0 | 30.1 | 33.0 | 31.6 | 9.0 % |" in gpu_text
    assert "Not yet measured" not in gpu_text
    # bad input: one clear error line, exit 2, nothing written
    (device / "gpu_full_size.json").write_text("{not json")
    assert run_all.main(["--import-device", str(device), "--results", str(results), "--out", str(md)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert run_all.main(["--import-device", str(tmp_path / "empty_nowhere"), "--results", str(results)]) == 2
    (device / "gpu_full_size.json").write_text(json.dumps({**partial, "dry_run": True}))  # a CPU rehearsal
    assert run_all.main(["--import-device", str(device), "--results", str(results), "--out", str(md)]) == 2
    assert "output of --dry-run (CPU, tiny widths), not GPU figures" in capsys.readouterr().err
    assert json.loads((results / "gpu_full_size.json").read_text()) == partial  # the earlier import stays


@pytest.mark.slow
def test_run_device_dry_run_builds_and_runs_everything_on_cpu(tmp_path):
    """benchmarks/gpu/run_device.sh --dry-run: the GPU call's every step at tiny widths on CPU (≈ 60 s CPU).

    Checks the files it leaves in $OUT (the device tool returns at most 8), that each step passed,
    that the benchmark matrix has every eager case and one compiled case, that train.py ran 30
    steps with the default batch 8 × 2 layout (here 2 × 2), that the cascade sent every slice
    through its three stages, and that run_all renders the figures.
    """
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    out, done = _run_device(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cascade_full_size.json", "device_run.json", "eval_full_size.json", "gpu_full_size.json",
                     "run_device.log", "train_30_steps.json"]
    status = json.loads((out / "device_run.json").read_text())
    assert status["dry_run"] and status["complete"] and [s["step"] for s in status["steps"]] == [
        "gpu_full_size", "phantoms", "train_30_steps", "train_losses", "eval_full_size", "cascade_full_size"]
    assert all(s["returncode"] == 0 for s in status["steps"]) and status["outcome"] == "complete"
    # the pre-flight imported them for real and recorded what it found
    import peft
    import torch
    import transformers

    assert status["versions"] == {"python": sys.version.split()[0], "torch": torch.__version__,
                                  "transformers": transformers.__version__, "peft": peft.__version__}
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in out.iterdir())
    matrix = json.loads((out / "gpu_full_size.json").read_text())
    assert matrix["complete"] and all(r["status"] == "ok" for r in matrix["rows"])
    assert {(r["checkpointing"], r["feature_cache"]) for r in matrix["rows"] if not r["compile"]} == {
        (c, f) for c in ("off", "every 3", "all layers") for f in (False, True)}
    assert [r["compile"] for r in matrix["rows"]] == [False, True] + [False] * 7
    assert matrix["rows"][1]["seq_len"] == 128 and matrix["rows"][0]["seq_len"] == matrix["seq_len"]  # padded to 64
    train = json.loads((out / "train_30_steps.json").read_text())
    assert train["steps"] == 30 and len(train["losses"]) == 30 and train["grad_accum_steps"] == 2 and train["complete"]
    assert isinstance(train["loss_falls"], bool)  # recorded either way, not a pass/fail
    evaluation = json.loads((out / "eval_full_size.json").read_text())
    assert [r["batch"] for r in evaluation["rows"]] == [1, 4]
    assert all(r["same_answers_as_first"] == 1.0 and r["differences"] == [] for r in evaluation["rows"])
    assert evaluation["dtype"] == "float32" and evaluation["answers_equal_in_fp32"] is True and evaluation["complete"]
    cascade = json.loads((out / "cascade_full_size.json").read_text())
    assert cascade["complete"] and cascade["slices"] == 24
    assert cascade["stage1_slices"] == cascade["stage3_slices"] == 24 and cascade["stage2_crops"] >= 24
    assert cascade["adapters"]["tumor_detection"] == ["tumor_detection", "stage3"]  # its LoRA + the frozen q,v one
    text = run_all.render_gpu(matrix) + run_all.render_device_train(train) + run_all.render_cascade(cascade)
    assert "| 2 × 1 | every 3 | off | on |" in text and "30 optimizer steps of real `train.py`" in text
    assert "One 24-slice 512² volume, every slice through all three stages" in text


def test_eval_fails_when_a_batched_answer_differs_and_writes_both(tmp_path, monkeypatch):
    bench = _load_script("bench_eval")
    answers = {1: ["{<1><2><3><4>}", "{<5><6><7><8>}"], 2: ["{<1><2><3><4>}", "{<5><6><7><9>}"]}
    monkeypatch.setattr(bench, "predict_detection", lambda *a, **k: [])  # the warm-up
    monkeypatch.setattr(bench, "time_case", lambda model, records, batch, repeats: (1.0, [{"answer": a} for a in answers[batch]]))
    out = tmp_path / "eval.json"
    args = ["--samples", "2", "--batch-sizes", "1", "2", "--cascade-slices", "0", "--json", str(out)]
    assert bench.main(args) == 0  # recorded, not failed, without the flag
    assert bench.main([*args, "--fail-on-difference"]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["differences"] == [] and rows[1]["same_answers_as_first"] == 0.5
    assert rows[1]["differences"] == [{"sample": 1, "first": "{<5><6><7><8>}", "this": "{<5><6><7><9>}",
                                       "within_tolerance": True}]


def test_regenerated_report_keeps_the_hand_measured_full_size_load_section(tmp_path):
    """``run_all`` does not run ``full_size_load.py`` (16 GB of disk): its section survives a rewrite."""
    from benchmarks.run_all import keep_manual_sections

    previous = tmp_path / "BENCHMARKS.md"
    section = "## Full-size loading from real-format files (CPU)\n\npeak 15.43 GiB\n"
    previous.write_text("# Benchmarks\n\n## Eval\n\nold\n\n" + section + "\n## GPU (full size)\n\nold gpu\n")
    report = "# Benchmarks\n\n## Eval\n\nnew\n\n## GPU (full size)\n\nnew gpu\n"
    assert keep_manual_sections(report, previous) == (
        "# Benchmarks\n\n## Eval\n\nnew\n\n" + section + "\n## GPU (full size)\n\nnew gpu\n")
    assert keep_manual_sections(report, tmp_path / "absent.md") == report


def test_eval_report_shows_the_cascade_rows_and_their_ratio():
    from benchmarks.run_all import _summary_eval, render_eval

    rows = [{"batch": 1, "samples": 8, "samples_per_s": 2.0, "mean_answer_tokens": 9.0, "same_answers_as_first": 1.0},
            {"batch": 16, "samples": 8, "samples_per_s": 8.0, "mean_answer_tokens": 9.0, "same_answers_as_first": 1.0}]
    cascade = [{"slices": 16, "batch": 16, "encode_once": False, "tower_passes_per_slice": 3, "slices_per_s": 2.5,
                "same_answers_as_per_stage": True},
               {"slices": 16, "batch": 16, "encode_once": True, "tower_passes_per_slice": 2, "slices_per_s": 3.5,
                "same_answers_as_per_stage": True}]
    text = render_eval({"device": "CPU", "build_s": 1.0, "rows": rows, "cascade": cascade})
    assert "| per stage | 3 | 2.50 | 1.00× | yes |" in text
    assert "| once (stages 1 and 3 share) | 2 | 3.50 | 1.40× | yes |" in text
    assert _summary_eval({"rows": rows, "cascade": cascade}).splitlines()[1] == (
        "| Cascade (tiny, CPU) | encode once: 3.50 slices/s | per stage: 2.50 slices/s | 1.40× |")
    assert "Cascade" not in _summary_eval({"rows": rows})  # older results without the cascade row


def test_gpu_matrix_cut_only_by_the_deadline_exits_0_and_says_so(tmp_path, monkeypatch):
    """The compile matrix never fits one device call: a deadline cut is not a failure (exit 0,
    ``"outcome": "deadline"``); a failed case is (exit 1, ``"failed"``)."""
    import time

    order = [gpu.Case(1, 2, 0, False, False), gpu.Case(1, 2, 0, True, False), gpu.Case(2, 1, 0, False, False)]
    status = {}

    def fake_case(model, case, steps, warmup, instruction, answer, device):
        return {**gpu.dataclasses.asdict(case), "checkpointing": case.checkpointing, "status": status.get(case, "ok"),
                "losses": [1.0], "step_s": 1.0, "samples_per_s": 2.0, "peak_gib": None, "reserved_gib": None}

    monkeypatch.setattr(gpu, "cases", lambda *a, **k: order)
    monkeypatch.setattr(gpu, "run_case", fake_case)
    monkeypatch.setenv("MINIGPT_DEADLINE", str(time.time() + 60))  # < COMPILE_MIN_S: the compiled case is cut
    out = tmp_path / "g.json"
    assert gpu.main(["--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["status"] for r in result["rows"]] == ["ok", "skipped", "ok"]
    assert result["complete"] is False and result["outcome"] == "deadline" and result["stopped"].startswith("deadline:")
    status[order[2]] = "failed"
    assert gpu.main(["--dry-run", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["outcome"] == "failed"


def test_run_device_plan_derives_the_call_timeout_from_the_budget_left():
    """``--plan --budget-left-s``: the device call's timeout_s and the script's --deadline-s."""
    script = str(ROOT / "benchmarks" / "gpu" / "run_device.sh")

    def plan(*args):
        return subprocess.run(["bash", script, "--plan", *args], capture_output=True, text=True, timeout=30)

    full = plan("--budget-left-s", "900")  # more than one call may use: capped at the tool's 600 s
    assert full.returncode == 0 and full.stdout.splitlines()[:2] == ["timeout_s 600", "deadline_s 560"]
    part = plan("--budget-left-s", "400")  # 400 - 120 s start-up = 280, minus 40 s to wrap up
    assert part.returncode == 0 and part.stdout.splitlines()[:2] == ["timeout_s 280", "deadline_s 240"]
    assert "--deadline-s 240" in part.stdout
    low = plan("--budget-left-s", "200")
    assert low.returncode == 2 and "do not start the device" in low.stderr and low.stdout == ""
    assert plan().returncode == 2 and "--plan needs --budget-left-s" in plan().stderr
    alone = subprocess.run(["bash", script, "--budget-left-s", "400"], capture_output=True, text=True, timeout=30)
    assert alone.returncode == 2 and "--budget-left-s goes with --plan" in alone.stderr


bench_eval = _load_script("bench_eval")


def test_batched_answers_agree_within_one_grid_unit_or_the_same_yes_no():
    agree = bench_eval.agree
    assert agree("{<10><20><30><40>}", "{<10><20><30><40>}")
    assert agree("{<10><20><30><40>}", "{<11><19><30><41>}")  # each coordinate within 1
    assert not agree("{<10><20><30><40>}", "{<12><20><30><40>}")
    assert not agree("{<10><20><30><40>}", "the pancreas")  # a box turned into prose
    assert agree("Yes.", "yes, there is") and not agree("Yes.", "No.")
    assert not agree("random words", "other words")
    cmp = bench_eval.compare(["{<1><2><3><4>}", "Yes", "abc"], ["{<1><2><3><5>}", "Yes", "abd"])
    assert cmp["same_answers_as_first"] == pytest.approx(1 / 3) and cmp["agree_within_tolerance"] == pytest.approx(2 / 3)
    assert [(d["sample"], d["within_tolerance"]) for d in cmp["differences"]] == [(0, True), (2, False)]


def test_eval_decides_on_fp32_and_records_the_timed_differences(tmp_path, monkeypatch):
    """A timed row that differs (the bf16 numerics effect) is recorded but does not fail the step
    when the fp32 comparison of batch 1 vs the largest batch (the real tiny model) is equal."""
    answers = {1: ["{<1><2><3><4>}", "{<5><6><7><8>}"], 2: ["{<1><2><3><4>}", "{<5><6><7><9>}"]}
    monkeypatch.setattr(bench_eval, "time_case", lambda model, records, batch, repeats: (
        1.0, [{"answer": a} for a in answers[batch]]))
    monkeypatch.delenv("MINIGPT_DEADLINE", raising=False)
    out = tmp_path / "eval.json"
    args = ["--samples", "2", "--batch-sizes", "1", "2", "--max-new-tokens", "4", "--cascade-slices", "0",
            "--check-dtype", "fp32", "--fail-on-difference", "--json", str(out)]
    assert bench_eval.main(args) == 0
    result = json.loads(out.read_text())
    assert result["rows"][1]["differences"] == [{"sample": 1, "first": "{<5><6><7><8>}", "this": "{<5><6><7><9>}",
                                                 "within_tolerance": True}]
    check = result["fp32_check"]
    assert check["dtype"] == "fp32" and check["batches"] == [1, 2] and check["samples"] == 2
    assert check["differences"] == [] and result["answers_equal_in_fp32"] is True and result["complete"]


def test_eval_honours_the_deadline_and_writes_json_after_each_row(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    seen = []
    left = iter([100.0, 100.0, 0.5])  # seconds left before batch 1, 2 and 4 (a slow CPU must not decide)

    def fake_time_case(model, records, batch, repeats):
        seen.append(json.loads(out.read_text())["rows"])  # what is on disk before this row
        return 1.0, [{"answer": "{<1><2><3><4>}"} for _ in records]

    monkeypatch.setattr(bench_eval, "time_case", fake_time_case)
    monkeypatch.setattr(bench_eval, "seconds_left", lambda until: next(left))
    monkeypatch.delenv("MINIGPT_DEADLINE", raising=False)
    args = ["--samples", "2", "--batch-sizes", "1", "2", "4", "--max-new-tokens", "2", "--cascade-slices", "4",
            "--deadline-s", "60", "--json", str(out)]
    assert bench_eval.main(args) == 0
    result = json.loads(out.read_text())
    assert [len(rows) for rows in seen] == [0, 1]  # the first row was on disk before the second ran
    assert [r["batch"] for r in result["rows"]] == [1, 2]  # batch 4 did not fit
    assert result["complete"] is False and result["stopped"].startswith("deadline:") and "batch 4" in result["stopped"]
    assert result["cascade"] == []


def test_no_config_or_docstring_claims_batching_never_changes_an_answer():
    """In bf16 a batch may move an answer (a rounding effect); only fp32 answers are equal."""
    claim = "does not change the answers"
    found = [str(p.relative_to(ROOT)) for pattern in ("eval_configs/*.yaml", "minigpt4/**/*.py", "*.md", "docs/*.md")
             for p in ROOT.glob(pattern) if claim in p.read_text(encoding="utf-8")]
    assert found == []


def test_run_device_preflight_imports_for_real_and_says_why_it_stopped(tmp_path):
    """A peft that is found but does not import stops the run before any step: exit 2, the
    reason on stderr and in device_run.json (``"outcome": "failed"``), readable by others."""
    fake = tmp_path / "fake" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('broken peft build')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(tmp_path / "fake")}
    env.pop("MINIGPT_DEADLINE", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run_device.sh"), "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: 'import peft' fails: ImportError: broken peft build" in done.stderr
    status = json.loads((out / "device_run.json").read_text())
    assert status["outcome"] == "failed" and status["failed_steps"] == ["pre-flight"] and status["steps"] == []
    assert status["stopped"] == "pre-flight: 'import peft' fails: ImportError: broken peft build"
    assert oct((out / "device_run.json").stat().st_mode & 0o777) == "0o644"
