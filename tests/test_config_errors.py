"""Careless configs (issue 19): every entry point answers one ``<prog>: error: ...`` line naming the
file (line, column) or the key, exit status 2, before any model is built or any data is read.

The checks themselves are declared once, beside each field in minigpt4/config.py; these tests
go through each entry point's ``main`` so that no entry point can bypass them.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

import demo
import eval_cascade
import eval_classification
import eval_detection
import train as train_entry
from minigpt4 import config as config_module
from minigpt4 import inspect as inspect_entry
from minigpt4.cli import run_main
from minigpt4.config import Check, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS = {
    "train.py": train_entry.main,
    "eval_detection.py": eval_detection.main,
    "eval_classification.py": eval_classification.main,
    "eval_cascade.py": eval_cascade.main,
    "demo.py": demo.main,
    "python -m minigpt4.inspect": inspect_entry.main,
}

# name -> (file text, the message after "<file>")
BROKEN_FILES = {
    "tab": ("run:\n\tbatch_size: 2\n",
            ":2:1: not valid YAML: found character that cannot start any token (a tab: YAML indents with spaces)"),
    "syntax": ("run: {batch_size: 2\nmodel: {}\n",
               ":2:6: not valid YAML: did not find expected ',' or '}'"),
    "top-level list": ("- run\n- model\n",
                       ": the top level must be a mapping of sections (model:, datasets:, run:, cascade:), got a list"),
    "python tag": ("run:\n  output_dir: !!python/object/apply:os.system [\"touch pwned\"]\n",
                   ":2:15: not valid YAML: could not determine a constructor for the tag "
                   "'tag:yaml.org,2002:python/object/apply:os.system' (tags that build Python objects are refused)"),
    "duplicate key": ("run: {seed: 1}\nrun: {seed: 2}\n", ":2:1: not valid YAML: found duplicate key run"),
}


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test (not as a user error) if an entry point gets past its config to a model or training."""
    import minigpt4.models.minigpt_v2 as minigpt_v2
    import minigpt4.training as training

    def forbidden(*args, **kwargs):
        raise AssertionError("reached expensive work with an invalid config")

    monkeypatch.setattr(training, "train", forbidden)
    monkeypatch.setattr(minigpt_v2.MiniGPTPancreas, "__init__", forbidden)


def call(prog: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    start = time.perf_counter()
    status = run_main(ENTRY_POINTS[prog], argv, prog=prog)
    assert time.perf_counter() - start < 10  # within seconds: nothing loaded
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
@pytest.mark.parametrize("prog", sorted(ENTRY_POINTS))
def test_broken_yaml_names_file_line_and_column_at_every_entry_point(prog, case, tmp_path, capsys, monkeypatch,
                                                                    no_expensive_work):
    monkeypatch.chdir(tmp_path)
    text, message = BROKEN_FILES[case]
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    status, err = call(prog, ["--cfg-path", str(path)], capsys)
    assert (status, err) == (2, [f"{prog}: error: {path}{message}"])
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml"]  # the tag ran nothing, nothing was written


@pytest.mark.parametrize(
    "options, message",
    [
        (["run.batch_size=[1,2"], "--options 'run.batch_size=[1,2': the value is not valid YAML at its end: "
                                  "did not find expected ',' or ']'"),
        (["run.seed=1", "run.eval_instruction=a: b: c"], "--options 'run.eval_instruction=a: b: c': the value is not valid "
                                                      "YAML at column 26: mapping values are not allowed in this context"),
        (["run.log_interval=0"], "run.log_interval must be positive, got 0"),
        (["run.max_steps=-3"], "run.max_steps must be positive, got -3"),
        (["run.warmup_steps=-10"], "run.warmup_steps must be non-negative (>= 0), got -10"),
        (["run.seed=-1"], "run.seed must be in [0, 2**32) (the range NumPy and torch seeds take), got -1"),
        (["run.val_max_samples=0"], "run.val_max_samples must be positive, got 0"),
        (["datasets.msd.root=d", "datasets.msd.task=pancreas_detection", "datasets.msd.sample_ratio=inf"],
         "datasets.msd.sample_ratio must be a finite number, got inf"),
        (["run.init_lr=nan"], "run.init_lr must be a finite number, got nan"),
        (["run.beta2=1"], "run.beta2 must be in [0, 1), got 1.0"),
        (["model.vision.patch_size=0"], "model.vision.patch_size must be positive, got 0"),  # was ZeroDivisionError
        (["model.lora.alpha=0"], "model.lora.alpha must be positive, got 0"),
        (["model.generation.free_text={top_p: 0}"], "model.generation.free_text.top_p must be in (0, 1], got 0.0"),
        (["run.device=gpu"], "run.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["cascade.threshold=1.5"], "cascade.threshold must be in [0, 1], got 1.5"),
        (["datasets.abd.root=d", "datasets.abd.task=organ_detection", "datasets.abd.organs=[liver,heart]"],
         "datasets.abd.organs must be a subset of ['liver', 'kidney', 'spleen', 'pancreas'], got ['liver', 'heart']"),
    ],
)
def test_bad_values_and_option_syntax_name_the_key_before_training(options, message, capsys, no_expensive_work):
    status, err = call("train.py", ["--cfg-path", str(ROOT / "train_configs" / "quickstart_cpu.yaml"),
                                    "--options", *options], capsys)
    assert status == 2 and len(err) == 1
    assert err[0].startswith("train.py: error: ") and err[0].endswith(message), err[0]


@pytest.mark.parametrize("prog", sorted(ENTRY_POINTS))
def test_every_entry_point_checks_values_when_it_loads_the_config(prog, tmp_path, capsys, monkeypatch,
                                                                  no_expensive_work):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n  seed: -1\n")
    status, err = call(prog, ["--cfg-path", str(path)], capsys)
    assert (status, err) == (2, [f"{prog}: error: {path}: run.seed must be in [0, 2**32) "
                                 "(the range NumPy and torch seeds take), got -1"])


def test_a_broken_config_as_a_command_is_one_line_and_status_2(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("run:\n\tbatch_size: 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "train.py", "--cfg-path", str(path)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"train.py: error: {path}{BROKEN_FILES['tab'][1]}"]


def _config_classes() -> list[type]:
    found, todo = [], [config_module.Config]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for arg in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(arg):
                    todo.append(arg)
    return found


def test_every_numeric_and_enumerated_field_declares_its_check():
    classes = _config_classes()
    assert {c.__name__ for c in classes} >= {"Config", "ModelConfig", "VisionConfig", "TextConfig", "LoraConfig",
                                            "GenerationConfig", "DecodingConfig", "DatasetConfig", "RunConfig",
                                            "CascadeConfig"}
    unchecked = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = {hints[f.name], *typing.get_args(hints[f.name])} - {type(None)}
            if kinds & {int, float} and bool not in kinds and not isinstance(f.metadata.get("check"), Check):
                unchecked.append(f"{cls.__name__}.{f.name}")
    assert unchecked == []


def test_checks_also_run_when_a_config_is_built_in_code():
    with pytest.raises(ConfigError, match="patch_size must be positive, got 0"):
        config_module.VisionConfig(patch_size=0)  # not ZeroDivisionError in the cross-field check
    with pytest.raises(ConfigError, match="sample_ratio must be a finite number, got inf"):
        config_module.DatasetConfig(root="d", task="tumor_detection", sample_ratio=float("inf"))
    assert load_config(None, ["run.max_steps=3", "run.warmup_steps=0", "run.seed=4294967295"]).run.max_steps == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_names_the_key():
    from minigpt4.utils import resolve_device

    with pytest.raises(ValueError, match=r"^run\.device='cuda:7': CUDA is not available on this machine; use auto or cpu$"):
        resolve_device("cuda:7")
    with pytest.raises(ValueError, match=r"^run\.device='gpu0': not a device"):
        resolve_device("gpu0")
