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
GPU = {"gpu": "NVIDIA H200", "torch": "2.14.1", "date": "2025-01-01", "seq_len": 322, "flops_per_sample": 10.9e12,
       "flops_per_sample_cached": 9.0e12, "peak_flops": 989e12, "default_plan": {"batch": 8, "grad_accum": 2},
       "rows": [{"batch": 16, "grad_accum": 1, "checkpoint_every": 0, "checkpointing": "off", "compile": False,
                 "feature_cache": False, "step_s": 1.6, "samples_per_s": 10.0, "peak_gib": 45.0, "predicted_gib": 44.9,
                 "mfu": 0.11},
                {"batch": 8, "grad_accum": 2, "checkpoint_every": 0, "checkpointing": "off", "compile": False,
                 "feature_cache": False, "step_s": 2.0, "samples_per_s": 8.0, "peak_gib": 30.0, "predicted_gib": 30.1,
                 "mfu": 0.09},
                {"batch": 16, "grad_accum": 1, "checkpoint_every": 3, "checkpointing": "every 3", "compile": True,
                 "feature_cache": True, "oom": True, "predicted_gib": 36.0},
                {"batch": 16, "grad_accum": 1, "checkpoint_every": 1, "checkpointing": "all layers", "compile": True,
                 "feature_cache": False, "skipped": "time budget 300 s", "predicted_gib": 20.0}]}
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
    assert ("Card: **NVIDIA H200**; torch 2.14.1; measured 2025-01-01; sequence 322 tokens; model FLOPs/sample "
            "10.90 TFLOP (9.00 with cached ViT features); dense bf16 peak 989 TFLOP/s.") in gpu
    assert "| 16 × 1 | off | off | off | 10.00 | 1.600 | 45.0 | 44.9 | 11.0 % |" in gpu
    assert "| 8 × 2 | off | off | off | 8.00 | 2.000 | 30.0 | 30.1 | 9.0 % |" in gpu
    assert "| 16 × 1 | every 3 | on | on | OOM | | | 36.0 | |" in gpu
    assert "| 16 × 1 | all layers | on | off | skipped: time budget 300 s | | | 20.0 | |" in gpu
    # the default plan (8 × 2, eager, no cache) at 30 GiB fits the 38 GiB budget of a 40 GiB card
    assert ("Default training config (batch 8 × accumulation 2, no checkpointing): peak 30.0 GiB (predicted 30.1); "
            "fits an A100-40GB: yes.") in gpu
    assert ("30 optimizer steps of real `train.py` at full size (random weights, synthetic phantoms at 448 px, batch "
            "8 × accumulation 2): loss 10.500 (mean of the first 5 steps) → 4.250 (last 5): **falls**") in gpu


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


def test_gpu_benchmark_matrix_peaks_and_flops():
    gpu = _load_script("gpu_full_size")
    cases = gpu.cases()
    assert len(cases) == 16 and [c.compile for c in cases] == [False] * 8 + [True] * 8  # eager first
    assert {(c.batch, c.grad_accum, c.checkpointing) for c in cases} == {
        (16, 1, "off"), (16, 1, "every 3"), (16, 1, "all layers"), (8, 2, "off")}
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu.peak_flops("NVIDIA H100 NVL") == 835e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12 and gpu.peak_flops("Tesla T4") is None
    from minigpt4.config import ModelConfig

    n_train = 23_072_768 + 33_554_432
    flops = gpu.model_flops_per_sample(ModelConfig(), 322, n_train)
    assert flops == pytest.approx(10.9e12, rel=0.01)
    vit_only = flops - gpu.model_flops_per_sample(ModelConfig(), 322, n_train, with_vit=False)
    assert vit_only == pytest.approx(2 * 39 * (4 * 1408**2 + 2 * 1408 * 6144) * 1025 + 4 * 39 * 1025**2 * 1408)
    for script in ("run_device.sh", "fetch_wheels.sh"):  # shell syntax
        assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu" / script)]).returncode == 0


@pytest.mark.slow
def test_run_device_dry_run_builds_and_runs_everything_on_cpu(tmp_path):
    """benchmarks/gpu/run_device.sh --dry-run: the GPU call's every step at tiny widths on CPU (≈ 45 s CPU).

    Checks the files it leaves in $OUT (the device tool returns at most 8), that each step passed,
    that the benchmark matrix has every eager case and one compiled case, that train.py ran 30
    steps with the default batch 8 × 2 layout (here 2 × 2), and that run_all renders the figures.
    """
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run_device.sh"), "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["device_run.json", "eval_full_size.json", "gpu_full_size.json", "run_device.log",
                     "train_30_steps.json"]
    status = json.loads((out / "device_run.json").read_text())
    assert status["dry_run"] and [s["step"] for s in status["steps"]] == [
        "gpu_full_size", "phantoms", "train_30_steps", "train_loss_falls", "eval_full_size"]
    assert all(s["returncode"] == 0 for s in status["steps"])
    gpu = json.loads((out / "gpu_full_size.json").read_text())
    eager = [r for r in gpu["rows"] if not r["compile"]]
    assert len(eager) == 8 and all("samples_per_s" in r for r in eager)
    assert {(r["checkpointing"], r["feature_cache"]) for r in eager} == {
        (c, f) for c in ("off", "every 3", "all layers") for f in (False, True)}
    assert [r["compile"] for r in gpu["rows"]].count(True) == 1
    train = json.loads((out / "train_30_steps.json").read_text())
    assert train["steps"] == 30 and len(train["losses"]) == 30 and train["grad_accum_steps"] == 2
    evaluation = json.loads((out / "eval_full_size.json").read_text())
    assert [r["batch"] for r in evaluation["rows"]] == [1, 4]
    assert all(r["same_answers_as_first"] == 1.0 for r in evaluation["rows"])
    text = run_all.render_gpu(gpu) + run_all.render_device_train(train)
    assert "| 2 × 1 | every 3 | off | on |" in text and "30 optimizer steps of real `train.py`" in text
