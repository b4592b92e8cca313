"""``operating_point.json``: everything that turns slice answers into a patient answer, chosen on
the validation volumes by ``eval_cascade.py`` and read by ``scan.py`` and the demo through ONE
config key, ``cascade.operating_point`` (docs/ARCHITECTURE.md; issue 25.4, 26).

Format 1::

    {"format": 1,
     "chosen_on": {"split": "val", "n_volumes": int, "dataset": str},
     "checkpoints": {"stage1": sha256, "stage2": sha256, "stage3": sha256},
     "aggregation": str, "top_k": int, "threshold": float, "slice_threshold": float,
     "min_assessed": {"min_slices": int, "rule": str, ...},
     "z_rule": {"name": "largest_run", "min_run": int, "rule": str} | null,
     "calibration": null | {...},            # filled by the calibration work (issue 28.1), passed through
     "normalization": {"method": "paper" | "window", "window": [lo, hi]} | null}
                                            # how the evaluated folders' slices were prepared; null = not recorded

A scan config names the file, or sets the whole operating point explicitly (``threshold``,
``slice_threshold``, ``aggregation``, ``z_rule``, ``min_boxed_slices``); anything less is refused,
never defaulted (:func:`scan_settings`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from minigpt4.config import AGGREGATIONS, Z_RULES, ConfigError
from minigpt4.inference.pipeline import CascadeSettings
from minigpt4.io import file_sha256, read_json
from preprocessing.normalize import DEFAULT_WINDOW, METHODS

FORMAT = 1
FILENAME = "operating_point.json"
STAGE_KEYS = {"pancreas_detection": "stage1", "tumor_classification": "stage2", "tumor_detection": "stage3"}
Z_MIN_RUN = 2
"""The shortest run of adjacent boxed slices ``largest_run`` keeps (an isolated box is dropped)."""


def z_rule_record(name: str) -> Optional[dict]:
    """The ``z_rule`` entry of an operating point: None for ``none``."""
    if name == "none":
        return None
    return {"name": name, "min_run": Z_MIN_RUN,
            "rule": f"keep only the largest run (>= {Z_MIN_RUN} slices) of adjacent slices whose pancreas boxes overlap"}


def _number(value: Any, path: str, key: str, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ConfigError(f"{path}: {key} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def read_operating_point(path: str | Path) -> dict:
    """Read and check an ``operating_point.json``.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not format 1, or a key missing or out of range (named with the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cascade.operating_point: {path} not found (eval_cascade.py writes "
                                f"<run.output_dir>/{FILENAME})")
    try:
        point = read_json(path)
    except ValueError as err:
        raise ConfigError(f"{path}: not a JSON operating point ({err})") from None
    if not isinstance(point, dict) or point.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an operating point of format {FORMAT} (written by eval_cascade.py)")
    missing = [k for k in ("chosen_on", "checkpoints", "aggregation", "top_k", "threshold", "slice_threshold",
                           "min_assessed", "z_rule") if k not in point]
    if missing:
        raise ConfigError(f"{path}: lacks {', '.join(missing)}")
    _number(point["threshold"], str(path), "threshold")
    _number(point["slice_threshold"], str(path), "slice_threshold")
    if point["aggregation"] not in AGGREGATIONS:
        raise ConfigError(f"{path}: aggregation {point['aggregation']!r} is not one of {', '.join(AGGREGATIONS)}")
    if isinstance(point["top_k"], bool) or not isinstance(point["top_k"], int) or point["top_k"] < 1:
        raise ConfigError(f"{path}: top_k must be a positive integer, got {point['top_k']!r}")
    minimum = point["min_assessed"]
    if not isinstance(minimum, dict) or isinstance(minimum.get("min_slices"), bool) \
            or not isinstance(minimum.get("min_slices"), int) or minimum["min_slices"] < 1:
        raise ConfigError(f"{path}: min_assessed.min_slices must be a positive integer")
    z = point["z_rule"]
    if z is not None and (not isinstance(z, dict) or z.get("name") not in Z_RULES):
        raise ConfigError(f"{path}: z_rule must be null or have a name in {', '.join(Z_RULES)}")
    norm = point.get("normalization")
    if norm is not None and (not isinstance(norm, dict) or norm.get("method") not in METHODS
                             or not isinstance(norm.get("window"), list) or len(norm["window"]) != 2
                             or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in norm["window"])):
        raise ConfigError(f"{path}: normalization must be null or {{\"method\": one of {', '.join(METHODS)}, "
                          f"\"window\": [lo, hi]}}, got {norm!r}")
    return point


def scan_normalization(point: Optional[dict], requested: Optional[str], where: str) -> str:
    """The slice normalisation a scan uses: the one the operating point's folders were prepared
    with (a stage sees slices as it was trained and evaluated on them), ``requested`` when the
    point records none (default ``paper``).

    Raises:
        ConfigError: ``requested`` differs from the recorded one, or the recorded window is not the
            one scan.py applies (:data:`preprocessing.normalize.DEFAULT_WINDOW`).
    """
    recorded = (point or {}).get("normalization")
    if recorded is None:
        return requested or "paper"
    method = recorded["method"]
    if requested is not None and requested != method:
        raise ConfigError(f"{where}: --normalization {requested}, but the operating point was chosen on slices "
                          f"prepared with --normalization {method}: leave the option out, or evaluate stages "
                          f"prepared with {requested}")
    if method == "window" and tuple(float(v) for v in recorded["window"]) != DEFAULT_WINDOW:
        raise ConfigError(f"{where}: the operating point's slices were windowed to {list(recorded['window'])} HU; "
                          f"scan.py windows to {list(DEFAULT_WINDOW)}")
    return method


def scan_settings(cascade: Any, where: str, **run) -> tuple[CascadeSettings, Optional[dict]]:
    """The scan's settings from a config's ``cascade`` section: its ``operating_point`` file (the
    explicit keys must then be left unset, so one source decides), else the complete explicit set.

    Returns:
        ``(settings, operating point or None)``.
    Raises:
        ConfigError: neither a file nor a complete set (naming the first missing key), or both.
    """
    if cascade.operating_point:
        point = read_operating_point(cascade.operating_point)
        both = [k for k in ("threshold", "slice_threshold", "min_boxed_slices") if getattr(cascade, k) is not None]
        if both:
            raise ConfigError(f"{where}: cascade.operating_point is set, so cascade.{both[0]} must not be: the operating "
                              "point file decides it (remove one of them)")
        return CascadeSettings.from_operating_point(point, crop_margin=cascade.crop_margin, **run), point
    for key, unset in (("threshold", None), ("slice_threshold", None), ("aggregation", "auto"), ("z_rule", "auto"),
                       ("min_boxed_slices", None)):
        if getattr(cascade, key) == unset:
            raise ConfigError(
                f"{where}: cascade.{key} is {'not set' if unset is None else repr(unset)}; set cascade.operating_point "
                f"to the {FILENAME} eval_cascade.py wrote (the whole operating point chosen on val), or set "
                "cascade.threshold, slice_threshold, aggregation, z_rule and min_boxed_slices yourself")
    return CascadeSettings.from_config(cascade, **run), None


def weights_file(path: str | Path) -> Path:
    """The file whose sha256 identifies a stage: a checkpoint folder's ``model.safetensors``, else the path."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() and (path / "model.safetensors").is_file() else path


def check_checkpoints(point: dict, stage_paths: dict, where: str) -> None:
    """The stages about to run are the ones the operating point was chosen for (sha256 of each
    stage's weights; a stage the file does not record is not compared).

    Raises:
        ConfigError: naming the stage, its path and both hashes' first characters.
    """
    recorded = point.get("checkpoints") or {}
    for stage, path in stage_paths.items():
        want = recorded.get(STAGE_KEYS.get(stage, stage))
        target = weights_file(path)
        if not want or not target.is_file():
            continue
        have = file_sha256(target)
        if have != want:
            raise ConfigError(f"{where}: cascade.stages.{stage} {path} has sha256 {have[:12]}…, but the operating point "
                              f"was chosen on val for {want[:12]}…: run eval_cascade.py on these stages and use its "
                              f"{FILENAME}")


def operating_point_record(selection: dict, top_k: int, min_assessed: dict, z_rule: str, checkpoints: dict,
                           n_volumes: int, dataset: str, normalization: Optional[dict] = None) -> dict:
    """The ``operating_point.json`` content from eval_cascade's choices on val; ``checkpoints``:
    ``{stage: checkpoint_identity}``; ``normalization``: how the folders' slices were prepared."""
    return {"format": FORMAT,
            "chosen_on": {"split": "val", "n_volumes": int(n_volumes), "dataset": dataset},
            "checkpoints": {STAGE_KEYS[s]: (c or {}).get("sha256") for s, c in checkpoints.items() if s in STAGE_KEYS},
            "aggregation": selection["aggregation"], "top_k": int(top_k), "threshold": float(selection["threshold"]),
            "slice_threshold": float(selection["slice_threshold"]), "min_assessed": dict(min_assessed),
            "z_rule": z_rule_record(z_rule), "calibration": None, "normalization": normalization}
