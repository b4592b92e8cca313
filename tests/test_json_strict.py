"""No NaN leaves the program as a number (issue 19 item 6): every JSON file the project writes goes
through minigpt4/io.py ``to_json`` (``allow_nan=False``), which names the file and the key and
writes nothing; an earlier version of the file stays as it was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from minigpt4.io import read_json, to_json, write_json_atomic, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]

# json.dump(s) outside minigpt4/io.py, with the reason each one may stay
ALLOWED: set[str] = set()


def strict_loads(text: str):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinity_are_refused_naming_the_file_and_key(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"auc": 0.5})
    with pytest.raises(ValueError) as caught:
        write_json_atomic(path, {"patient": {"auc": float("nan"), "n": 3}, "slices": [1.0]})
    assert str(caught.value) == (f"{path}: patient.auc is nan: JSON has no NaN or infinity, so it was not written "
                                 "(a computation upstream gave a non-finite number)")
    assert read_json(path) == {"auc": 0.5}  # the earlier file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left

    rows = tmp_path / "predictions.jsonl"
    with pytest.raises(ValueError, match=re.escape(f"{rows}: row 2: p_yes[1].p_yes is -inf: JSON has no NaN")):
        write_jsonl_atomic(rows, [{"p_yes": [0.1]}, {"p_yes": [0.2, {"p_yes": np.float64("-inf")}]}])
    assert not rows.exists()


def test_strict_output_reads_back_with_a_strict_reader(tmp_path):
    obj = {"a": [1, 2.5, None, "nan"], "b": {"c": True}}
    write_json_atomic(tmp_path / "x.json", obj)
    assert strict_loads((tmp_path / "x.json").read_text()) == obj
    assert to_json({"b": 1, "a": 2}, sort_keys=True) == '{"a": 2, "b": 1}'


def test_the_training_log_is_strict(tmp_path):
    from minigpt4.training.trainer import _append_jsonl

    log = tmp_path / "log.jsonl"
    _append_jsonl(log, {"kind": "epoch", "val_score": np.float32(0.25)})
    with pytest.raises(ValueError, match=re.escape(f"{log}: val_score is nan")):
        _append_jsonl(log, {"kind": "epoch", "val_score": np.float32("nan")})
    assert [strict_loads(line) for line in log.read_text().splitlines()] == [{"kind": "epoch", "val_score": 0.25}]


def test_no_json_is_written_around_the_strict_helper():
    sources = [*ROOT.glob("minigpt4/**/*.py"), *ROOT.glob("preprocessing/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
               ROOT / "train.py", *ROOT.glob("eval_*.py")]
    offenders = sorted(
        str(path.relative_to(ROOT)) for path in sources
        if re.search(r"\bjson\.dumps?\(", path.read_text(encoding="utf-8"))
    )
    assert set(offenders) - ALLOWED == {"minigpt4/io.py"}
