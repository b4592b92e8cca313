"""DDP on CPU: ``torchrun --nproc-per-node 2 train.py`` (gloo) equals one process with the same
global batch (2 ranks × 2 samples vs 1 process × 2 samples × 2 accumulation steps), and only
rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import QUICKSTART, ROOT, make_synthetic, step_losses

pytestmark = pytest.mark.slow


def _options(data: Path, out: Path, batch: int, accum: int) -> list[str]:
    return [
        f"datasets.synthetic.root={data}", f"run.output_dir={out}", f"run.batch_size={batch}",
        f"run.grad_accum_steps={accum}", "run.iters_per_epoch=3", "run.max_epoch=1", "run.log_interval=1",
        "model.lora.dropout=0.0", "run.val_max_samples=4", "run.eval_batch_size=4", "model.max_new_tokens=6",
    ]


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_equal_one_process(tmp_path):
    data = make_synthetic(tmp_path / "synthetic")
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(ROOT / "train.py"), "--cfg-path", str(QUICKSTART), "--options", *_options(data, ddp, 2, 1)])
    _run([sys.executable, str(ROOT / "train.py"), "--cfg-path", str(QUICKSTART), "--options",
          *_options(data, single, 2, 2)])

    start = json.loads((ddp / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["global_batch"] == 4
    a, b = step_losses(ddp), step_losses(single)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)
    wa = load_file(ddp / "checkpoint_epoch_0" / "model.safetensors")
    wb = load_file(single / "checkpoint_epoch_0" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)
    # exactly one set of outputs, written by rank 0: no duplicated rows or temp folders
    assert sorted(p.name for p in ddp.iterdir()) == [
        "checkpoint_best", "checkpoint_epoch_0", "checkpoint_latest", "config.yaml", "log.jsonl", "manifest.json",
        "val_metrics.jsonl"]
    assert len((ddp / "val_metrics.jsonl").read_text().splitlines()) == 1
    assert sum(1 for line in (ddp / "log.jsonl").read_text().splitlines() if '"kind": "step"' in line) == 3
    state = torch.load(ddp / "checkpoint_epoch_0" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2
