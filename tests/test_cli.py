"""The entry points' shared behaviour (minigpt4/cli.py, minigpt4/progress.py): a user error is one
``<prog>: error: ...`` line with exit status 2 and no traceback unless ``--debug``; logging shows
the package's INFO records; progress written to a log is a few whole lines, not a flood of ``\\r``."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt4.cli import error_message, run_main
from minigpt4.progress import LineProgress, progress

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "train_configs" / "quickstart_cpu.yaml"


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("script", [["train.py"], ["-m", "minigpt4.inspect"]])
def test_a_config_error_is_one_line_and_status_2(script):
    prog = script[0] if len(script) == 1 else "python -m minigpt4.inspect"
    done = run_script(*script, "--cfg-path", str(QUICKSTART), "--options", "run.learning_rate=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"{prog}: error: {QUICKSTART} + --options run.learning_rate=1: Key 'learning_rate' not in 'RunConfig' "
        "(key run.learning_rate; the valid keys are the fields in minigpt4/config.py)"]
    missing = run_script(*script, "--cfg-path", "no/such.yaml")
    assert missing.returncode == 2 and missing.stderr.splitlines() == [f"{prog}: error: config file not found: no/such.yaml"]
    debug = run_script(*script, "--cfg-path", "no/such.yaml", "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().endswith("FileNotFoundError: config file not found: no/such.yaml")


def test_os_errors_name_the_path_and_what_to_do(capsys):
    def denied(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/out/run")

    assert run_main(denied, [], prog="eval_detection.py") == 2
    assert capsys.readouterr().err == (
        "eval_detection.py: error: /srv/out/run: permission denied: choose a folder you can write to, "
        "or fix its permissions\n")
    assert error_message(NotADirectoryError(errno.ENOTDIR, "Not a directory", "a_file/run")) == (
        "a_file/run: a path component is a file, not a folder: choose another output path")
    assert error_message(FileNotFoundError("model.ckpt=x: file or folder not found")) == "model.ckpt=x: file or folder not found"
    # a bug is not a user error: its traceback stays
    with pytest.raises(KeyError):
        run_main(lambda argv: {}["x"], [], prog="train.py")
    assert run_main(lambda argv: {"accuracy": 1.0}, []) == 0  # eval mains return their metrics


def test_logging_shows_the_package_info_records():
    code = ("import logging, sys; from minigpt4.cli import run_main; "
            "sys.exit(run_main(lambda argv: logging.getLogger('minigpt4.models.checkpoints').info('w: 3 tensors loaded') "
            "or logging.getLogger('urllib3').info('third-party chatter'), [], prog='x'))")
    done = run_script("-c", code)
    assert done.returncode == 0
    assert done.stderr.splitlines() == ["INFO minigpt4.models.checkpoints: w: 3 tensors loaded"]


def test_progress_in_a_log_is_a_line_every_5_percent():
    log = io.StringIO()  # not a terminal
    bar = progress(1112, "volumes", file=log)
    assert isinstance(bar, LineProgress)
    for _ in range(1112):
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == ""
    assert len(lines[:-1]) == 20
    assert lines[0].startswith("volumes: 56/1112 (5 %) elapsed ") and lines[0].endswith(", loss=0.5")
    assert lines[-2].startswith("volumes: 1112/1112 (100 %)")
    # fewer items than lines: one line per item; stopped early: the last position is printed
    short = io.StringIO()
    bar = progress(3, "epoch 0", file=short)
    bar.update(1)
    bar.close()
    assert [line.split(" elapsed")[0] for line in short.getvalue().splitlines()] == ["epoch 0: 1/3 (33 %)"]


def test_preprocessing_progress_is_shown_and_does_not_flood(tmp_path, capsys):
    from preprocessing import pipeline

    results = pipeline.run_jobs(list(range(45)), abs, workers=1)
    assert results == list(range(45))
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 15  # 3 jobs a line (5 % of 45, rounded up)
    assert err.splitlines()[-1].startswith("volumes: 45/45 (100 %)")
    assert pipeline.run_jobs([3, -4, 5], abs, workers=2) == [3, 4, 5]  # the pool keeps the order
    assert [line.split(" elapsed")[0] for line in capsys.readouterr().err.splitlines()] == [
        "volumes: 1/3 (33 %)", "volumes: 2/3 (66 %)", "volumes: 3/3 (100 %)"]
