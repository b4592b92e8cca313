"""Applying a fitted calibration map: a raw score → the likelihood it stands for (issue 28.1).

The map is fitted on the validation volumes by :mod:`minigpt4.evaluation.calibration` and stored
as plain JSON (``operating_point.json`` → ``calibration``; never a pickle): Platt scaling
``p = 1 / (1 + exp(-(a * score + b)))`` or an isotonic step function (the fitted points ``x``,
``y``, interpolated linearly between them and held constant beyond them, exactly as
scikit-learn's ``IsotonicRegression.predict`` with ``out_of_bounds="clip"`` does).

A map is ``{"method": "platt"|"isotonic", "params": {...}, "fitted_on": {"split": "val",
"n_volumes", "n_positive", "dataset"}, "target": "patient score"|"slice P(tumor)", "slice": map |
null}``: the patient map at the top (what the report shows), slice P(tumor)'s map under ``slice``.

Without a map the raw number is an *uncalibrated score*, never shown as a percentage
(:func:`likelihood_text`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from minigpt4.io import read_json

METHODS = ("platt", "isotonic")
UNCALIBRATED = "uncalibrated score"


@dataclass(frozen=True)
class CalibrationMap:
    """A fitted map from a raw score in [0, 1] to a probability."""

    method: str
    params: dict
    fitted_on: dict = field(default_factory=dict)
    target: str = "patient score"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {METHODS}")
        if self.method == "platt":
            for key in ("a", "b"):
                if not isinstance(self.params.get(key), (int, float)) or not math.isfinite(self.params[key]):
                    raise ValueError(f"platt calibration needs a finite params.{key}, got {self.params.get(key)!r}")
        else:
            x, y = self.params.get("x"), self.params.get("y")
            if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or not x:
                raise ValueError("isotonic calibration needs params.x and params.y: lists of one length (> 0)")
            xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
            if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
                raise ValueError("isotonic calibration points must be finite")
            if np.any(np.diff(xa) < 0) or np.any(np.diff(ya) < 0):
                raise ValueError("isotonic calibration points must be sorted and non-decreasing")
            if ya.min() < 0 or ya.max() > 1:
                raise ValueError("isotonic calibration values must lie in [0, 1]")

    def apply(self, scores: Any) -> np.ndarray:
        """Calibrated probabilities of ``scores`` (any shape), float64."""
        s = np.asarray(scores, dtype=float)
        if self.method == "platt":
            z = self.params["a"] * s + self.params["b"]
            return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
        return np.interp(s, np.asarray(self.params["x"], float), np.asarray(self.params["y"], float))

    def __call__(self, score: float) -> float:
        return float(self.apply(float(score)))

    def fitted_on_text(self) -> str:
        """``"val: 24 volumes of MSD, NIH"``: the set it was fitted on, in words."""
        f = self.fitted_on
        text = f"{f.get('split', '?')}: {f.get('n_volumes', '?')} volumes"
        if f.get("dataset"):
            text += f" of {f['dataset']}"
        return text

    def as_dict(self) -> dict:
        return {"method": self.method, "params": dict(self.params), "fitted_on": dict(self.fitted_on),
                "target": self.target}


def map_from_dict(data: Mapping[str, Any], where: str = "calibration") -> CalibrationMap:
    """A :class:`CalibrationMap` from its JSON form (the ``slice`` sub-map is read separately).

    Raises:
        ValueError: naming ``where`` and the problem.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    try:
        return CalibrationMap(method=str(data.get("method")), params=dict(data.get("params") or {}),
                              fitted_on=dict(data.get("fitted_on") or {}), target=str(data.get("target", "patient score")))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None


def read_calibration(path: str | Path) -> tuple[Optional[CalibrationMap], Optional[CalibrationMap]]:
    """``(patient map, slice map)`` from a file whose top-level ``calibration`` key holds one
    (``operating_point.json``, or an ``eval_cascade.py`` ``metrics.json``); ``(None, None)`` when
    the key is null (no map was fitted: too few val volumes of a class).

    Raises:
        FileNotFoundError: no file. ValueError: no ``calibration`` key, or an invalid map (named).
    """
    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or "calibration" not in doc:
        raise ValueError(f"{path}: no 'calibration' key (expected an operating_point.json written by eval_cascade.py)")
    return maps_from_record(doc["calibration"], f"{path}: calibration")


def maps_from_record(data: Any, where: str = "calibration") -> tuple[Optional[CalibrationMap], Optional[CalibrationMap]]:
    """``(patient map, slice map)`` of an operating point's ``calibration`` value (or of
    metrics.json's, whose map is under ``map``); ``(None, None)`` for null.

    Raises:
        ValueError: an invalid map, naming ``where``.
    """
    if data is None:
        return None, None
    if isinstance(data, Mapping) and "map" in data:  # metrics.json: {"map": ..., "brier": ..., "ece": ...}
        data = data["map"]
        if data is None:
            return None, None
    patient = map_from_dict(data, where)
    sub = data.get("slice") if isinstance(data, Mapping) else None
    return patient, (map_from_dict(sub, f"{where}.slice") if sub else None)


def likelihood_entry(raw: Optional[float], calibration: Optional[CalibrationMap]) -> Optional[dict]:
    """report.json ``patient.likelihood``: ``{"raw", "calibrated", "calibration": {"method",
    "fitted_on"} | null}``; None when there is no raw score (an inconclusive volume)."""
    if raw is None:
        return None
    if calibration is None:
        return {"raw": float(raw), "calibrated": None, "calibration": None}
    return {"raw": float(raw), "calibrated": round(calibration(raw), 6),
            "calibration": {"method": calibration.method, "fitted_on": calibration.fitted_on_text()}}


def likelihood_text(likelihood: Optional[Mapping[str, Any]]) -> str:
    """The likelihood in words: ``"calibrated likelihood 37 % (platt, fitted on val: 24 volumes of
    MSD, NIH); raw score 0.812"`` or ``"uncalibrated score 0.812 (not a probability)"``."""
    if not likelihood:
        return "no score (inconclusive)"
    raw = f"{float(likelihood['raw']):.3f}"
    if likelihood.get("calibrated") is None or not likelihood.get("calibration"):
        return f"{UNCALIBRATED} {raw} (not a probability: no calibration map was given)"
    cal = likelihood["calibration"]
    return (f"calibrated likelihood {100 * float(likelihood['calibrated']):.0f} % ({cal.get('method')}, fitted on "
            f"{cal.get('fitted_on')}); raw score {raw}")


def calibrate_slices(p_tumor: Sequence[Optional[float]], calibration: Optional[CalibrationMap]) -> list[Optional[float]]:
    """Calibrated slice P(tumor) (None stays None; all None without a map)."""
    if calibration is None:
        return [None for _ in p_tumor]
    return [None if p is None else round(calibration(p), 6) for p in p_tumor]


def configured_calibration(cascade: Any) -> tuple[Optional[CalibrationMap], Optional[CalibrationMap]]:
    """``(patient map, slice map)`` a scan or the demo uses: the ``calibration`` of the operating
    point file a config's ``cascade`` section names (``cascade.operating_point``, eval_cascade.py's
    ``operating_point.json``); ``(None, None)`` without one: the score is then reported as an
    uncalibrated score, never a percentage.

    Raises:
        FileNotFoundError: the named file is missing. ValueError: its calibration map is invalid.
    """
    # cascade.operating_point: the operating-point key (issue 26); a config section without it has no map
    path = getattr(cascade, "operating_point", None)
    if not path:
        return None, None
    if not Path(path).is_file():
        raise FileNotFoundError(f"cascade.operating_point: {path} not found")
    return read_calibration(path)
