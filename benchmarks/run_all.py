"""Run the CPU benchmarks and write ``BENCHMARKS.md`` (figures, ratios, machine, date, versions).

    python benchmarks/run_all.py                  # default sizes, about 5-10 minutes on 2 cores
    python benchmarks/run_all.py --quick          # smaller sizes, about 2 minutes
    python benchmarks/run_all.py --only eval --extra eval "--samples 64"
    python benchmarks/run_all.py --report-only    # rewrite BENCHMARKS.md from benchmarks/results/
    python benchmarks/run_all.py --import-device DIR   # a GPU run's $OUT → benchmarks/results/ + BENCHMARKS.md

Each benchmark script runs as its own subprocess (so one crash or hang does not take the others
with it, and each starts with a cold interpreter) and writes its figures with ``--json`` into
``benchmarks/results/<name>.json``; its console output goes to ``<name>.log`` next to it. While
it runs the 1-minute load average is sampled every few seconds: the development machines are
shared, and the report says how loaded the machine was, because wall times mean little without it.
Every ratio in the report compares two figures measured by the same script in the same run
(pipeline vs I/O floor, batch 16 vs batch 1, ...), never figures from different runs.

GPU figures are not measured here: ``benchmarks/gpu_full_size.py`` writes
``benchmarks/results/gpu_full_size.json`` on a GPU machine, and the report keeps them (with the
card that gave them) whenever that file is present.

Limits: the TC-baseline benchmark needs the real crops in ``../shared/data/tc_crops`` and is
reported as skipped without them. ``--extra`` arguments are appended after the defaults, so they
override them (argparse keeps the last value).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt4.io import read_json, write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TC_CROPS = ROOT.parent / "shared" / "data" / "tc_crops"
GPU_COMMAND = "python benchmarks/gpu_full_size.py --json benchmarks/results/gpu_full_size.json"
PACKAGES = ("torch", "transformers", "peft", "numpy")
DEVICE_FILES = ("device_run", "gpu_full_size", "train_30_steps", "eval_full_size", "cascade_full_size")
"""The JSON files ``benchmarks/gpu/run_device.sh`` writes into its $OUT (``--import-device``)."""
GPU_FILES = (*DEVICE_FILES, "train_full_size")


@dataclasses.dataclass(frozen=True)
class Bench:
    """One CPU benchmark script and the sizes run_all gives it.

    Attributes:
        name: key: ``results/<name>.json``, ``--only``/``--extra`` name.
        title: section title in the report.
        script: path relative to the repository root.
        default: arguments for the default run (≲ 10 minutes for the whole suite on 2 cores).
        quick: arguments for ``--quick`` (≈ 2 minutes for the suite).
        prepare: optional ``prepare(tmp_dir) -> (extra args, skip reason)``; a reason skips the bench.
    """

    name: str
    title: str
    script: str
    default: tuple[str, ...]
    quick: tuple[str, ...]
    prepare: Optional[Callable[[Path], tuple[list[str], Optional[str]]]] = None


def _prepare_tc(tmp: Path) -> tuple[list[str], Optional[str]]:
    """Import the shared real TC crops into a volume-split TC folder (≈ 3 s)."""
    if not (TC_CROPS / "labels.csv").is_file():
        return [], f"the real TC crops are absent ({TC_CROPS}/labels.csv not found)"
    out = tmp / "tc"
    cmd = [sys.executable, "-m", "preprocessing", "tc-import", "--images", str(TC_CROPS / "images"),
           "--csv", str(TC_CROPS / "labels.csv"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return [], f"tc-import failed: {(done.stderr or done.stdout).strip()[-500:]}"
    return ["--data", str(out)], None


# Sizes: default ≈ 2 + 0.5 + 1.5 + 1.5 minutes on the shared 2-core development machine (quick ≈ 1-2);
# the preprocessing default is the size of the figures first reported (8 volumes of 512×512×100).
BENCHES: tuple[Bench, ...] = (
    Bench("preprocess", "Preprocessing", "benchmarks/bench_preprocess.py",
          default=("--n", "8", "--size", "512", "--slices", "100", "--repeat", "2"),
          quick=("--n", "2", "--size", "512", "--slices", "60", "--repeat", "1")),
    Bench("train", "Training (tiny model, CPU)", "benchmarks/bench_train.py",
          default=("--steps", "30", "--warmup", "5", "--batch-size", "16"),
          quick=("--steps", "12", "--warmup", "4", "--batch-size", "16")),
    Bench("eval", "Evaluation (tiny model, CPU)", "benchmarks/bench_eval.py",
          default=("--samples", "32", "--repeats", "2", "--batch-sizes", "1", "16", "--max-new-tokens", "20"),
          quick=("--samples", "16", "--repeats", "1", "--batch-sizes", "1", "16", "--max-new-tokens", "20")),
    Bench("tc", "Tumor-classification baselines (real crops, CPU)", "benchmarks/tc_baselines.py",
          default=("--methods", "hist", "cnn"), quick=("--methods", "hist"), prepare=_prepare_tc),
)
BY_NAME = {b.name: b for b in BENCHES}


# --------------------------------------------------------------------------- machine and versions
def machine_info() -> dict:
    """CPU model, usable cores and RAM (Linux ``/proc`` first, portable fallbacks)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "cpu_count": os.cpu_count(), "ram_gib": ram / 2**30 if ram else None,
            "os": platform.platform()}


def versions() -> dict:
    """Python and the installed versions of the packages that set the speed."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(root: Path = ROOT) -> str:
    """``<short sha>`` plus ``+ uncommitted changes`` when the tree is dirty; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} + uncommitted changes" if dirty else sha


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# --------------------------------------------------------------------------- running
def run_bench(bench: Bench, args: Sequence[str], results: Path, timeout: float, tmp: Path,
              echo: bool = True) -> dict:
    """Run one benchmark script as a subprocess writing ``results/<name>.json``.

    Returns:
        The status record: command, return code, wall and child CPU seconds, load averages
        (before, mean and max while running), ``error`` (last lines of output) or ``skipped``.
    """
    out_json, log_path = results / f"{bench.name}.json", results / f"{bench.name}.log"
    out_json.unlink(missing_ok=True)  # never report an earlier run's figures as this run's
    status: dict[str, Any] = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "commit": git_commit()}
    extra: list[str] = []
    if bench.prepare is not None:
        extra, reason = bench.prepare(tmp)
        if reason:
            return {**status, "skipped": reason}
    cmd = [sys.executable, str(ROOT / bench.script), *args, *extra, "--json", str(out_json)]
    # the temporary folder of a prepared input means nothing after the run: show it as $TMP
    status["command"] = "python " + shlex.join([bench.script, *args, *extra]).replace(str(tmp), "$TMP")
    loads, load_before = [], _load()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        # own session: a timeout stops the script and any workers it started, and nothing else
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

        def pump() -> None:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                log.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        while proc.poll() is None:
            loads.append(_load())
            if time.perf_counter() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        proc.wait()
        reader.join(5)
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    loads.append(_load())
    status.update({
        "returncode": proc.returncode, "seconds": time.perf_counter() - start,
        "cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
        "load_before": load_before, "load_mean": sum(loads) / len(loads), "load_max": max(loads),
    })
    if timed_out or proc.returncode != 0 or not out_json.is_file():
        tail = log_path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        why = f"timed out after {timeout:.0f} s" if timed_out else (
            f"exit status {proc.returncode}" if proc.returncode else "no JSON written")
        status["error"] = why + ("\n" + "\n".join(tail) if tail else "")
    return status


# --------------------------------------------------------------------------- report
def _f(x: Optional[float], digits: int = 2, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def _status_line(status: Optional[dict]) -> str:
    if not status or "seconds" not in status:
        return ""
    return (f"Measured {status['date']} at commit {status['commit']}: {status['seconds']:.0f} s wall, "
            f"{status['cpu_s']:.0f} s CPU; 1-minute load average {status['load_before']:.1f} before, "
            f"{status['load_mean']:.1f} mean / {status['load_max']:.1f} max while it ran "
            f"(the benchmark itself adds up to its thread count).\n\nCommand: `{status['command']}`")


def render_preprocess(r: dict) -> str:
    one, many, fl = r["one_worker"], r["many_workers"], r["floor"]
    lines = [
        f"{r['volumes']} synthetic MSD phantoms of {r['size']}×{r['size']}×{r['slices']} voxels (int16 HU, gzip "
        f"NIfTI), `python -m preprocessing msd` defaults (paper normalisation, threshold 0.6), {r['pngs']} PNGs "
        f"written. " + (f"Best of {r['repeat']} interleaved repeats." if r["repeat"] > 1 else "One timing each."), "",
        "| measurement | wall | CPU | ratio to floor |", "|---|---:|---:|---:|",
        f"| floor (read volumes + encode/write the same PNGs) | {fl['wall_s']:.2f} s | {fl['cpu_s']:.2f} s | 1 |",
        f"| pipeline, 1 worker | {one['wall_s']:.2f} s ({one['slices_per_s']:.1f} slices/s) | {one['cpu_s']:.2f} s "
        f"| **{r['ratio_cpu']:.2f}× (CPU)**, {r['ratio_wall']:.2f}× (wall) |",
        f"| pipeline, {many['workers']} workers | {many['wall_s']:.2f} s ({many['slices_per_s']:.1f} slices/s) | – "
        f"| {many['wall_s'] / fl['wall_s']:.2f}× (wall); speed-up {r['speedup_workers']:.2f}× over 1 worker |", "",
        f"Pipeline breakdown (1 worker): reading {one['read_s']:.2f} s, slice statistics and boxes "
        f"{one['stats_s']:.2f} s (whole-volume numpy reductions, no per-slice loop), normalisation + PNG encode "
        f"+ write {one['write_s']:.2f} s.",
    ]
    if (r.get("cores") or 0) <= 2:
        lines += ["", f"Only {r.get('cores')} cores here, shared with the benchmark's own processes: the worker "
                  "figure is not a scaling measurement."]
    return "\n".join(lines)


def render_train(r: dict) -> str:
    sps, share = r["samples_per_s"], r["data_fraction"]
    compute = sps / (1 - share) if share < 1 else None
    return "\n".join([
        f"Model `{r['size']}` on `{r['device']}`, batch {r['batch_size']}, {r['workers']} DataLoader workers, "
        f"medians over {r['steps_measured']} steps after warm-up.", "",
        "| measurement | samples/s | ratio |", "|---|---:|---:|",
        f"| training loop (data loading + step) | {sps:.1f} | {1 - share:.2f}× of compute-only |",
        f"| compute only (loop minus waiting for data) | {_f(compute, 1)} | 1 |", "",
        f"Data loading is **{100 * share:.1f} %** of step time (time waiting for the next batch / step time).",
    ])


def render_eval(r: dict) -> str:
    rows = r["rows"]
    base = rows[0]["samples_per_s"]
    lines = [f"Device: {r['device']}; {'full size, bf16' if r.get('full_size') else 'tiny model (tests/tiny.py), fp32'}; "
             f"model build {r['build_s']:.1f} s; `max_new_tokens` {r.get('max_new_tokens', 'n/a')}; "
             f"{rows[0]['samples']} samples; random weights.", "",
             f"| batch | samples/s | speed-up vs batch {rows[0]['batch']} | mean answer tokens | answers equal to batch "
             f"{rows[0]['batch']} |", "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['samples_per_s']:.2f} | **{row['samples_per_s'] / base:.1f}×** | "
                     f"{row['mean_answer_tokens']:.1f} | {100 * row['same_answers_as_first']:.0f} % |")
    same = min(row["same_answers_as_first"] for row in rows)
    lines += ["", "Batching changed no answer." if same == 1.0 else
              f"**Batching changed answers**: as few as {100 * same:.0f} % equal to batch {rows[0]['batch']}."]
    cascade = r.get("cascade") or []
    if cascade:
        first = cascade[0]
        lines += ["", f"The three-stage cascade on {first['slices']} slices (every slice through all three stages, "
                  f"batch {first['batch']}): encoding each slice once for stages 1 and 3 (the frozen ViT is shared; "
                  "stage 2 encodes its crop) against encoding per stage, same run"
                  f"{' (' + r['cascade_measured'] + ')' if r.get('cascade_measured') else ''}:", "",
                  "| tower encoding | tower passes per slice | slices/s | speed-up | answers equal to per stage |",
                  "|---|---:|---:|---:|---:|"]
        for row in cascade:
            lines.append(f"| {'once (stages 1 and 3 share)' if row['encode_once'] else 'per stage'} | "
                         f"{row['tower_passes_per_slice']} | {row['slices_per_s']:.2f} | "
                         f"{row['slices_per_s'] / first['slices_per_s']:.2f}× | "
                         f"{'yes' if row['same_answers_as_per_stage'] else '**no**'} |")
    return "\n".join(lines)


def render_tc(r: dict) -> str:
    yes = r["test_yes_fraction"]
    majority = max(yes, 1 - yes)
    names = {"hist_gbm": "crop size + intensity histogram → gradient boosting", "cnn_3layer": "3-layer CNN, 64×64 crops",
             "model": "MiniGPT checkpoint"}
    lines = [f"Volume-level split: {r['n_train']} train and {r['n_test']} test crops ({100 * yes:.1f} % `yes` "
             "in test); the validation crops are not used.", "",
             "| method | test accuracy | ratio to majority class | ROC AUC | time |", "|---|---:|---:|---:|---:|",
             f"| majority class (`{'yes' if yes >= 0.5 else 'no'}`) | {majority:.3f} | 1 | 0.500 | – |"]
    for key, m in r["results"].items():
        lines.append(f"| {m.get('label') or names.get(key, key)} | {m['accuracy']:.3f} | {m['accuracy'] / majority:.2f}× | "
                     f"{m['auc']:.3f} | {m['seconds']:.0f} s |")
    return "\n".join(lines)


def _partial(r: dict) -> str:
    """A bold line when a device JSON was left incomplete (deadline, SIGTERM, a killed step)."""
    if r.get("complete", True):
        return ""
    return (f"**Partial**: this run stopped before the end ({r.get('stopped') or 'killed or out of time'}); "
            "the figures below are the cases that finished.\n\n")


def render_gpu_table(r: dict) -> str:
    """Markdown table of ``gpu_full_size.json``'s rows (also printed by ``benchmarks/gpu_full_size.py``)."""
    lines = ["| batch × accum | checkpointing | compile | feature cache | tokens | samples/s | step (s) | allocated peak "
             "(GiB) | predicted | reserved peak (GiB) | predicted | MFU |",
             "|---|---|:---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        head = (f"| {row['batch']} × {row['grad_accum']} | {row['checkpointing']} | {'on' if row['compile'] else 'off'} "
                f"| {'on' if row['feature_cache'] else 'off'} | {row.get('seq_len', '')} |")
        predicted = f"{row['predicted_gib']:.1f}" if row.get("predicted_gib") is not None else ""
        predicted_reserved = f"{row['predicted_reserved_gib']:.1f}" if row.get("predicted_reserved_gib") is not None else ""
        if row.get("oom"):
            lines.append(f"{head} OOM | | | {predicted} | | {predicted_reserved} | |")
        elif "samples_per_s" not in row or row.get("status") == "failed":
            why = row.get("skipped") or row.get("error", "not run")
            label = "skipped" if row.get("skipped") and row.get("status") != "interrupted" else (
                "interrupted" if row.get("status") == "interrupted" else "failed")
            lines.append(f"{head} {label}: {why.splitlines()[0][:120]} | | | {predicted} | | {predicted_reserved} | |")
        else:
            mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "n/a"
            peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "n/a"
            reserved = f"{row['reserved_gib']:.1f}" if row.get("reserved_gib") is not None else "n/a"
            lines.append(f"{head} {row['samples_per_s']:.2f} | {row['step_s']:.3f} | {peak} | {predicted} | {reserved} "
                         f"| {predicted_reserved} | {mfu} |")
    return "\n".join(lines)


def memory_check(r: dict) -> list[dict]:
    """Measured ÷ predicted memory for every measured case of ``gpu_full_size.json``, against the
    memory model's stated expected error (:data:`minigpt4.memory.EXPECTED_ERROR`)."""
    from minigpt4.memory import EXPECTED_ERROR

    out = []
    for row in r.get("rows", []):
        if row.get("peak_gib") is None or not row.get("predicted_gib"):
            continue
        check = {"case": f"{row['batch']} × {row['grad_accum']}, checkpointing {row['checkpointing']}, compile "
                         f"{'on' if row['compile'] else 'off'}, cache {'on' if row['feature_cache'] else 'off'}"}
        for measured, predicted, key in (("peak_gib", "predicted_gib", "peak"), ("reserved_gib", "predicted_reserved_gib", "reserved")):
            if row.get(measured) is not None and row.get(predicted):
                ratio = row[measured] / row[predicted]
                check[key] = {"measured": row[measured], "predicted": row[predicted], "ratio": ratio,
                              "within_expected_error": abs(ratio - 1) <= EXPECTED_ERROR[key]}
        out.append(check)
    return out


def render_memory_check(r: dict) -> str:
    checks = memory_check(r)
    if not checks:
        return ""
    from minigpt4.memory import EXPECTED_ERROR

    lines = [f"Memory model check (`minigpt4/memory.py`; expected error ±{100 * EXPECTED_ERROR['peak']:.0f} % on the "
             f"allocated peak, ±{100 * EXPECTED_ERROR['reserved']:.0f} % on the reserved peak; compiled cases: the "
             "prediction is an upper bound):", "",
             "| case | allocated measured ÷ predicted | within | reserved measured ÷ predicted | within |",
             "|---|---:|:---:|---:|:---:|"]
    for c in checks:
        cells = []
        for key in ("peak", "reserved"):
            part = c.get(key)
            cells += [f"{part['ratio']:.3f}", "yes" if part["within_expected_error"] else "**no**"] if part else ["n/a", ""]
        lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_gpu(r: dict) -> str:
    """``gpu_full_size.json`` → card line, the case table, and which default plan fits a 40 GiB card."""
    if r.get("peak_flops"):
        peak = f"; dense bf16 peak {r['peak_flops'] / 1e12:.0f} TFLOP/s"
    else:
        peak = "; card not in the peak table: MFU not computed"
    flops = ""
    if r.get("flops_per_sample"):
        flops = (f"; sequence {r['seq_len']} tokens ({r.get('seq_len_compiled', r['seq_len'])} compiled); model "
                 f"FLOPs/sample {r['flops_per_sample'] / 1e12:.2f} TFLOP"
                 + (f" ({r['flops_per_sample_cached'] / 1e12:.2f} with cached ViT features)"
                    if r.get("flops_per_sample_cached") else ""))
    lines = [_partial(r) + f"Card: **{r['gpu']}**" + (f"; torch {r['torch']}" if r.get("torch") else "")
             + (f"; measured {r['date']}" if r.get("date") else "") + flops + peak + ".", "", render_gpu_table(r), ""]
    default = r.get("default_plan", {"batch": 8, "grad_accum": 2})
    for row in r["rows"]:
        if (row["batch"], row["grad_accum"], row["checkpointing"]) == (default["batch"], default["grad_accum"], "off") \
                and not row["compile"] and not row["feature_cache"] and row.get("peak_gib") is not None:
            # what the card must hold: the reserved peak + the CUDA context (minigpt4.memory.BUDGET_GIB)
            from minigpt4.memory import BUDGET_GIB, CUDA_CONTEXT_GIB

            held = (row.get("reserved_gib") or row["peak_gib"]) + CUDA_CONTEXT_GIB
            fits = "yes" if held <= BUDGET_GIB else "no"
            lines.append(f"Default training config (batch {default['batch']} × accumulation {default['grad_accum']}, "
                         f"no checkpointing): allocated peak {row['peak_gib']:.1f} GiB (predicted {row['predicted_gib']:.1f}); "
                         f"fits an A100-40GB: {fits}.")
    check = render_memory_check(r)
    if check:
        lines += ["", check]
    return "\n".join(lines).rstrip()


def render_device_train(r: dict) -> str:
    """``train_30_steps.json`` (``benchmarks/gpu/run_device.sh``): does the full-size loss fall?"""
    head = (_partial(r) + f"{r['steps']} optimizer steps of real `train.py` at full size (random weights, synthetic "
            f"phantoms at {r['image_size']} px, batch {r['batch_size']} × accumulation {r['grad_accum_steps']}): ")
    if r.get("first_loss") is None:
        return head + f"**a loss was not finite** ({', '.join(map(str, r.get('losses', [])[:8]))} …)."
    return head + (f"loss {r['first_loss']:.3f} (mean of the first 5 steps) → {r['last_loss']:.3f} (last 5): "
                   f"**{'falls' if r['loss_falls'] else 'does not fall'}**; median {r['samples_per_s']:.1f} samples/s.")


def render_cascade(r: dict) -> str:
    """``cascade_full_size.json``: the clinician's wait for one volume."""
    head = _partial(r) + f"Card: **{r['gpu']}**" + (f"; torch {r['torch']}" if r.get("torch") else "") + "."
    if r.get("skipped") or "seconds" not in r:
        return head + f" Not measured: {r.get('skipped') or r.get('stopped') or 'no figures'}."
    goal = "" if r.get("meets_goal") is None else (
        f" Goal ≤ {r['goal_s']:.0f} s: **{'met' if r['meets_goal'] else 'not met'}**.")
    mfu = f", {100 * r['mfu']:.1f} % of the card's dense bf16 peak" if r.get("mfu") is not None else ""
    return (head + f" One {r['slices']}-slice {r['size']}² volume, every slice through all three stages (stage 1 on "
            f"{r['stage1_slices']} slices, stage 2 on {r['stage2_crops']} crops, stage 3 on {r['stage3_slices']} slices; "
            f"batch {r['batch_size']}, at most {r['max_new_tokens']} new tokens): **{r['seconds']:.2f} s** "
            f"({r['slices_per_s']:.1f} slices/s), {r['tflop']:.3g} TFLOP run ({r['achieved_tflops']:.3g} TFLOP/s{mfu})."
            f"{goal} Loading the base + three stages: {r['load_stages_s']:.1f} s; warm-up scan {r['warmup_s']:.1f} s.")


def render_device_run(r: dict) -> str:
    """``device_run.json``: the steps of one ``run_device.sh`` call."""
    lines = [_partial(r) + f"`benchmarks/gpu/run_device.sh` on {r.get('nvidia_smi', 'unknown card')} "
             f"({r.get('date', 'date unknown')}; deadline {r.get('deadline_s', 'n/a')} s):", "",
             "| step | exit status | seconds | note |", "|---|---:|---:|---|"]
    for step in r.get("steps", []):
        rc = step.get("returncode")
        lines.append(f"| {step['step']} | {'–' if rc is None else rc} | {step.get('seconds', '')} | {step.get('note', '')} |")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[dict], str]] = {"preprocess": render_preprocess, "train": render_train,
                                                "eval": render_eval, "tc": render_tc}

# Hand-written explanations (from the engineers who wrote each script) kept around the figures.
NOTES_BEFORE = {
    "preprocess": (
        "`benchmarks/bench_preprocess.py` (CPU only) times `python -m preprocessing msd` against the floor "
        "measured in the same run: reading the same image and label volumes fully with nibabel and encoding + "
        "writing the same PNGs (PIL, compress level 6, atomic rename) and nothing else. The target is "
        "pipeline ≤ 1.5× floor with one worker. On a shared machine CPU seconds are the reliable comparison for "
        "the 1-worker case; wall times are noisy."),
    "train": (
        "`benchmarks/bench_train.py` runs the real training loop (train.py's trainer, DataLoader, dataset "
        "mixing, logging) on synthetic phantoms and reads samples/s (global batch / step wall time) and the "
        "data-loading share of step time from the trainer's `log.jsonl`. The compute-only figure is derived: "
        "samples/s ÷ (1 − data share). The model is the tiny one of `train_configs/quickstart_cpu.yaml`: its "
        "image size and widths set the speed, so figures from before a change of that config are not "
        "comparable."),
    "eval": (
        "`benchmarks/bench_eval.py` times `minigpt4.evaluation.predict_detection` end to end (PNG loading, image "
        "transform, left-padded batched greedy generation, decoding, scoring) on generated 512×512 slices, batch "
        "size 1 vs 16 in one run, and checks that the batched answers equal the one-by-one answers (fp32 here; "
        "in bf16 a batch may move an answer by a rounding effect: compared within a tolerance and checked again in "
        "fp32, see the GPU section). Random "
        "weights: speed does not depend on them, answer lengths do (the table gives the mean)."),
    "tc": (
        "`benchmarks/tc_baselines.py` scores simple baselines on the real TC crops (`../shared/data/tc_crops`, "
        "imported with `python -m preprocessing tc-import`, split by volume). Not a speed benchmark: it shows "
        "how much of the task a model must beat, because the `yes` (MSD) and `no` (NIH) crops come from "
        "different scanners and contrast phases (SPEC §4 item 10), so crop size and histogram alone separate "
        "them. Add `--checkpoint <folder>` (via `--extra tc \"--checkpoint ...\"`) to score a trained model on "
        "the same split."),
}
NOTES_AFTER = {
    "preprocess": (
        "Profiled once during development (not re-measured by this run): per 512×512 slice, paper normalisation "
        "≈ 2.5 ms (one `bincount`) and PNG encode ≈ 11 ms. For reference the release's scripts spend about "
        "9.4 s on 4 such volumes (≈ 11 slices/s). The worker-scaling figure needs a machine with free cores: "
        "`python benchmarks/bench_preprocess.py --n 8 --workers 8`."),
    "eval": (
        "Profiled during development: ≈ 95 % of the time is spent in `model.generate`, none in scoring. On a "
        "contended CPU the batch-16 speed-up varied between 1.9× and 5.8× from run to run. At full size on a GPU "
        "the issue expects several times the batch-1 throughput at batch 16: "
        "`python benchmarks/bench_eval.py --full-size --json benchmarks/results/eval_full_size.json` (see the GPU "
        "section)."),
    "train": ("Full size on a GPU (the stage-1 model, random weights): `python benchmarks/bench_train.py --size full "
              "--device cuda --batch-size 8 --grad-accum 2 --workers 8 --json benchmarks/results/train_full_size.json` "
              "(see the GPU section)."),
}
GPU_TEXT = (
    "`benchmarks/gpu_full_size.py` builds the paper's stage-1 model (EVA ViT-g 39 blocks, frozen; LLaMA-2-7B sizes; "
    "LoRA r 64 on q,k; MiniGPT-v2's stage-3 q,v LoRA stacked frozen, as `model.init_from` stacks it) with random "
    "weights in bf16 on one GPU and times optimizer steps (forward + backward + fused AdamW on LoRA + `llama_proj`, "
    "bf16 autocast) with 448×448 images, the paper's detection prompt and 40 answer tokens (322 tokens with the "
    "LLaMA-2 tokenizer; 384 when compiled, padded to a multiple of 64). Cases in order of value: the default "
    "of `train_configs/stage1_pancreas_detection.yaml` (batch 8 × accumulation 2, eager), the same compiled, then "
    "every eager variant (the frozen-ViT feature cache, batch 16 with activation checkpointing every 3rd layer / off "
    "/ every layer), then the same compiled (the feature cache reuses its batch's compiled graphs: no new compile "
    "budget). Each case records its losses (a non-finite one fails the case), the allocated and reserved "
    "peaks next to the memory model's predictions (`python -m minigpt4.inspect --memory`, `minigpt4/memory.py`) "
    "and model FLOP utilisation of the tokens actually run (≈ 10.9 TFLOP per sample at 322 tokens: frozen EVA "
    "forward, LLaMA forward + activation gradients, attention backward 2× its forward, LoRA terms, `lm_head` at "
    "the answer positions; dense bf16 peaks by exact card name: A100 312, H100 PCIe 756, H100 NVL and H200 NVL 835, "
    "H100 SXM and H200 SXM 989 TFLOP/s; any other card: no MFU). `--cascade` times the clinician's wait: the "
    "three-stage cascade (one base + three random stage checkpoints, `load_stages`) scanning a 100-slice 512² "
    "volume with every slice through all three stages, with its TFLOP count (goal ≤ 10 s on one H200). "
    "`benchmarks/gpu/run_device.sh` runs the matrix, a 30-step full-size `train.py` run (its losses recorded, "
    "whether they fall written down, only a non-finite one fails), full-size evaluation at batch 16 vs 1 (bf16 "
    "answers compared exactly and within one grid unit / the same yes/no, both recorded; batch 1 vs 16 in fp32 on 8 "
    "samples decides: bf16 may move an answer by a rounding effect, fp32 must not) and the cascade in one call of "
    "the GPU machine under one deadline (`--deadline-s`, default 520 s); every step and case (and every "
    "`bench_eval` row) rewrites its JSON as soon as it finishes (`\"complete\": false` until the end, also on "
    "SIGTERM), result files mode 0644, the pre-flight imports torch, transformers and peft and records their "
    "versions. Exit status 0 also when only the deadline left cases or steps out (`device_run.json`: `\"outcome\": "
    "\"deadline\"`, `cut_by_deadline`), 1 when a step failed (`failed_steps`). The device call's timeout comes "
    "from the device time left: `bash benchmarks/gpu/run_device.sh --plan --budget-left-s <budget_left_s>` prints "
    "`timeout_s` = min(600, budget left − 120 s for the start and the transfers) and the `--deadline-s` to pass "
    "(timeout_s − 40 s to stop the last step and return the files); below 60 s of run it says not to start. "
    "`--dry-run` checks it all on a CPU at tiny widths.")


def render_report(run: dict, results: dict[str, Optional[dict]], gpu: dict[str, Optional[dict]]) -> str:
    """The whole BENCHMARKS.md text.

    Args:
        run: ``run_all.json``: ``date``, ``mode``, ``machine``, ``versions``, ``commit``, ``seconds`` and
            ``benches`` (name → status record from :func:`run_bench`; absent = not run).
        results: name → the benchmark's JSON (``None`` when it has none).
        gpu: :data:`GPU_FILES` names → JSON or ``None``.
    """
    m, v = run["machine"], run["versions"]
    ram = f"{m['ram_gib']:.1f} GiB RAM" if m.get("ram_gib") else "RAM unknown"
    out = [
        "# Benchmarks", "",
        f"Generated by `python benchmarks/run_all.py{' --quick' if run.get('mode') == 'quick' else ''}` on "
        f"{run['date']} ({run['mode']} sizes, {run.get('seconds', 0) / 60:.1f} minutes). Every ratio compares two "
        "figures measured by the same script in the same run. Regenerate with `python benchmarks/run_all.py` "
        "(`--quick` for a ≈ 2-minute version); `--report-only` rewrites this file from `benchmarks/results/`.", "",
        "## Machine and versions", "",
        "| | |", "|---|---|",
        f"| date | {run['date']} |",
        f"| machine | {m['cpu']}, {m['cores']} usable cores ({m.get('cpu_count')} logical), {ram} |",
        f"| OS | {m.get('os', 'unknown')} |",
        f"| git commit | {run['commit']} |",
        f"| Python | {v['python']} |",
        *[f"| {name} | {v.get(name, 'unknown')} |" for name in PACKAGES],
    ]
    # figures count only with a successful status of this report's run: a stale JSON from an
    # earlier run of a benchmark that was skipped or failed this time is not reported as current
    results = {k: r for k, r in results.items()
               if r is not None and run["benches"].get(k, {}).get("returncode") == 0 and not run["benches"][k].get("error")}
    loads = [s["load_mean"] for s in run["benches"].values() if "load_mean" in s]
    if loads:
        out += ["", f"1-minute load average while the benchmarks ran: {min(loads):.1f}–{max(loads):.1f} "
                f"(mean per benchmark; {m['cores']} cores). A load well above the core count means other jobs "
                "shared the CPU and wall times are pessimistic; CPU seconds and the same-run ratios are the "
                "reliable figures."]

    out += ["", "## Summary", "", "| benchmark | figure | baseline (same run) | ratio |", "|---|---|---|---:|"]
    for name, summary in (("preprocess", _summary_preprocess), ("train", _summary_train), ("eval", _summary_eval),
                          ("tc", _summary_tc)):
        r = results.get(name)
        out.append(summary(r) if r else f"| {BY_NAME[name].title} | not measured (see below) | | |")

    for bench in BENCHES:
        out += ["", f"## {bench.title}", "", NOTES_BEFORE[bench.name], ""]
        status, r = run["benches"].get(bench.name), results.get(bench.name)
        if status is None:
            out.append("Not run in this report (`--only`/`--skip`).")
        elif status.get("skipped"):
            out.append(f"Skipped: {status['skipped']}.")
        elif status.get("error") or r is None:
            out += ["**Failed** — " + status.get("error", "no JSON").split("\n")[0] + ". Last lines of output:", "",
                    "```", *status.get("error", "").split("\n")[1:], "```", "", f"Command: `{status.get('command')}`"]
        else:
            out += [RENDERERS[bench.name](r), "", _status_line(status)]
        if bench.name in NOTES_AFTER:
            out += ["", NOTES_AFTER[bench.name]]

    out += ["", "## GPU (full size)", "", GPU_TEXT, ""]
    if gpu.get("device_run"):
        out += [render_device_run(gpu["device_run"]), ""]
    if gpu.get("gpu_full_size"):
        out += ["Training step, from `benchmarks/results/gpu_full_size.json` (written by the GPU script, not by "
                "run_all; the card below gave these figures):", "", render_gpu(gpu["gpu_full_size"])]
    else:
        out += ["**Not yet measured**: the script is ready and has not been run (no "
                "`benchmarks/results/gpu_full_size.json`; the sessions so far had no GPU). On one GPU run:", "",
                "```", GPU_COMMAND, "python benchmarks/run_all.py --report-only   # puts the figures here", "```", "",
                "or everything in one call: `OUT=<folder> bash benchmarks/gpu/run_device.sh`, then "
                "`python benchmarks/run_all.py --import-device <folder>` (copies its JSON here and rewrites this "
                "section)."]
    if gpu.get("cascade_full_size"):
        out += ["", "The clinician's wait: the three-stage cascade at full size (`benchmarks/results/cascade_full_size.json`):",
                "", render_cascade(gpu["cascade_full_size"])]
    if gpu.get("eval_full_size"):
        out += ["", "Evaluation at full size (`benchmarks/results/eval_full_size.json`):", "",
                _partial(gpu["eval_full_size"]) + render_eval(gpu["eval_full_size"])]
    if gpu.get("train_full_size"):
        out += ["", "Training loop at full size (`benchmarks/results/train_full_size.json`):", "",
                render_train(gpu["train_full_size"])]
    if gpu.get("train_30_steps"):
        out += ["", "Full-size training run (`benchmarks/results/train_30_steps.json`):", "",
                render_device_train(gpu["train_30_steps"])]
    return "\n".join(out).rstrip() + "\n"


MANUAL_SECTIONS = ("## Full-size loading from real-format files (CPU)",)
"""Sections measured by hand-run scripts (``benchmarks/full_size_load.py``, ≈ 16 GB of disk), not by
run_all: a regenerated report keeps them as they stand in the previous file."""


def keep_manual_sections(report: str, previous: Path) -> str:
    """``report`` with the :data:`MANUAL_SECTIONS` of ``previous`` put back before the GPU section."""
    old = previous.read_text(encoding="utf-8") if previous.is_file() else ""
    kept = []
    for title in MANUAL_SECTIONS:
        start = old.find(title + "\n")
        if start >= 0 and title not in report:
            end = old.find("\n## ", start + len(title))
            kept.append(old[start:] if end < 0 else old[start:end + 1])
    if not kept:
        return report
    gpu = report.find("## GPU (full size)")
    at = gpu if gpu >= 0 else len(report)
    return report[:at] + "".join(k.rstrip("\n") + "\n\n" for k in kept) + report[at:]


def _summary_preprocess(r: dict) -> str:
    return (f"| Preprocessing | pipeline, 1 worker: {r['one_worker']['cpu_s']:.2f} s CPU "
            f"({r['one_worker']['slices_per_s']:.1f} slices/s) | I/O floor: {r['floor']['cpu_s']:.2f} s CPU "
            f"| {r['ratio_cpu']:.2f}× |")


def _summary_train(r: dict) -> str:
    share = r["data_fraction"]
    return (f"| Training (tiny, CPU) | {r['samples_per_s']:.1f} samples/s, data loading {100 * share:.1f} % "
            f"| compute only: {_f(r['samples_per_s'] / (1 - share) if share < 1 else None, 1)} samples/s "
            f"| {1 - share:.2f}× |")


def _summary_eval(r: dict) -> str:
    rows = r["rows"]
    line = (f"| Evaluation (tiny, CPU) | batch {rows[-1]['batch']}: {rows[-1]['samples_per_s']:.2f} samples/s "
            f"| batch {rows[0]['batch']}: {rows[0]['samples_per_s']:.2f} samples/s "
            f"| {rows[-1]['samples_per_s'] / rows[0]['samples_per_s']:.1f}× |")
    cascade = {row["encode_once"]: row for row in r.get("cascade") or []}
    if True in cascade and False in cascade:
        once, per_stage = cascade[True]["slices_per_s"], cascade[False]["slices_per_s"]
        line += (f"\n| Cascade (tiny, CPU) | encode once: {once:.2f} slices/s | per stage: {per_stage:.2f} slices/s "
                 f"| {once / per_stage:.2f}× |")
    return line


def _summary_tc(r: dict) -> str:
    best_key = max(r["results"], key=lambda k: r["results"][k]["accuracy"])
    best = r["results"][best_key]
    majority = max(r["test_yes_fraction"], 1 - r["test_yes_fraction"])
    return (f"| TC baselines (real crops) | best: {best_key} accuracy {best['accuracy']:.3f}, AUC {best['auc']:.3f} "
            f"| majority class: {majority:.3f} | {best['accuracy'] / majority:.2f}× |")


def load_results(results: Path) -> tuple[dict, dict]:
    """Benchmark JSONs (name → dict or None) and the GPU JSONs found in ``results``."""
    cpu = {b.name: read_json(results / f"{b.name}.json") if (results / f"{b.name}.json").is_file() else None
           for b in BENCHES}
    gpu = {k: read_json(results / f"{k}.json") if (results / f"{k}.json").is_file() else None
           for k in GPU_FILES}
    return cpu, gpu


def import_device(folder: Path, results: Path) -> list[str]:
    """Copy the :data:`DEVICE_FILES` JSON of a ``run_device.sh`` output folder into ``results``.

    Each file is read as strict JSON and rewritten atomically; device files of an earlier run
    that this folder lacks are removed, so no figure of another run is shown as this one's.

    Returns:
        The names imported.
    Raises:
        ValueError: ``folder`` holds none of the files, or one is not valid JSON.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    found = {name: read_json(folder / f"{name}.json") for name in DEVICE_FILES if (folder / f"{name}.json").is_file()}
    if not found:
        raise ValueError(f"{folder}: none of {', '.join(f'{n}.json' for n in DEVICE_FILES)} found")
    for name, data in found.items():
        if not isinstance(data, dict):
            raise ValueError(f"{folder / f'{name}.json'}: expected a JSON object")
        if data.get("dry_run"):
            raise ValueError(f"{folder / f'{name}.json'}: output of --dry-run (CPU, tiny widths), not GPU figures")
    for name in DEVICE_FILES:
        if name in found:
            write_json_atomic(results / f"{name}.json", found[name])
        else:
            (results / f"{name}.json").unlink(missing_ok=True)
    return list(found)


# --------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="benchmarks: " + ", ".join(f"{b.name} ({b.script})" for b in BENCHES))
    parser.add_argument("--quick", action="store_true", help="smaller sizes (≈ 2 minutes on 2 cores)")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run only these (others keep their "
                        "previous results in the report)")
    parser.add_argument("--skip", nargs="+", choices=list(BY_NAME), default=[], help="do not run these")
    parser.add_argument("--extra", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                        help='extra arguments for one benchmark, e.g. --extra eval "--samples 64"')
    parser.add_argument("--timeout", type=float, default=900, help="seconds per benchmark before it is stopped")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the JSON figures and logs")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="report path")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rewrite the report from --results")
    parser.add_argument("--import-device", metavar="DIR", help="copy the JSON files of a benchmarks/gpu/run_device.sh "
                        "output folder into --results, check the memory model against them, rewrite the report")
    args = parser.parse_args(argv)
    for name, _ in args.extra:
        if name not in BY_NAME:
            parser.error(f"--extra: unknown benchmark {name!r} (choose from {', '.join(BY_NAME)})")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    run_path = results / "run_all.json"
    previous = read_json(run_path) if run_path.is_file() else {"benches": {}}

    if args.import_device:
        try:
            imported = import_device(Path(args.import_device), results)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for name in imported:
            print(f"imported {name}.json{'' if read_json(results / f'{name}.json').get('complete', True) else ' (partial)'}")
        gpu_result = read_json(results / "gpu_full_size.json") if "gpu_full_size" in imported else {}
        for check in memory_check(gpu_result):
            print("memory model: " + check["case"] + ": " + "; ".join(
                f"{k} measured {v['measured']:.2f} GiB / predicted {v['predicted']:.2f} = {v['ratio']:.3f} "
                f"({'within' if v['within_expected_error'] else 'OUTSIDE'} the expected error)"
                for k, v in check.items() if k != "case"))
        args.report_only = True
    if args.report_only:
        if "machine" not in previous:
            print(f"{run_path}: no earlier run to report; run without --report-only first", file=sys.stderr)
            return 2
        run = previous
    else:
        selected = [b for b in BENCHES if (not args.only or b.name in args.only) and b.name not in args.skip]
        run = {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
               "mode": "quick" if args.quick else "default", "machine": machine_info(), "versions": versions(),
               "commit": git_commit(), "benches": {}}
        # benchmarks not selected keep their earlier record only when --only narrowed the run on purpose
        if args.only:
            run["benches"] = {k: s for k, s in previous.get("benches", {}).items() if k not in args.only}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
            for bench in selected:
                extra = [a for name, text in args.extra if name == bench.name for a in shlex.split(text)]
                bench_args = [*(bench.quick if args.quick else bench.default), *extra]
                print(f"\n=== {bench.name}: {bench.script} {' '.join(bench_args)}", flush=True)
                status = run_bench(bench, bench_args, results, args.timeout, Path(tmp))
                run["benches"][bench.name] = status
                verdict = status.get("skipped") or (status.get("error", "").split("\n")[0] or "ok")
                print(f"=== {bench.name}: {verdict} ({status.get('seconds', 0):.0f} s)", flush=True)
        run["seconds"] = time.perf_counter() - start
        write_json_atomic(run_path, run)

    cpu, gpu = load_results(results)
    write_text_atomic(args.out, keep_manual_sections(render_report(run, cpu, gpu), Path(args.out)))
    print(f"\nwrote {args.out}")
    failed = [k for k, s in run["benches"].items() if s.get("error")]
    if failed:
        print(f"failed: {', '.join(failed)} (see {results}/<name>.log)", file=sys.stderr)
    # exit 1 when a benchmark failed in this run; rewriting the report of an earlier run succeeds
    return 1 if failed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
