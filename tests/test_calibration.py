"""Calibration (issue 28.1): metrics on hand-computed numbers, the two maps, the choice on val, the JSON map."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minigpt4.evaluation.calibration import (
    brier_score,
    calibration_metrics,
    choose_calibration,
    expected_calibration_error,
    fit_isotonic,
    fit_platt,
    reliability_bins,
    reliability_figure,
)
from minigpt4.inference.calibration import (
    CalibrationMap,
    likelihood_entry,
    likelihood_text,
    map_from_dict,
    read_calibration,
)


def test_brier_and_ece_by_hand():
    labels, probs = [0, 0, 1, 1], [0.1, 0.4, 0.8, 0.9]
    # (0.1² + 0.4² + 0.2² + 0.1²) / 4
    assert brier_score(labels, probs) == pytest.approx(0.055)
    # one item per bin: |0 − .1| + |0 − .4| + |1 − .8| + |1 − .9|, over 4
    assert expected_calibration_error(labels, probs) == pytest.approx(0.2)
    # two items in one bin: bin [0.7, 0.8) holds 0.7 and 0.75 → |0.5 − 0.725| weighted 2/3; bin 9: |1 − 1.0|·1/3
    assert expected_calibration_error([0, 1, 1], [0.7, 0.75, 1.0]) == pytest.approx(2 / 3 * 0.225)
    bins = reliability_bins([0, 1, 1], [0.7, 0.75, 1.0])
    assert [b["n"] for b in bins] == [0] * 7 + [2, 0, 1]
    assert bins[7]["mean_probability"] == pytest.approx(0.725) and bins[7]["fraction_positive"] == 0.5
    assert bins[0]["mean_probability"] is None
    assert brier_score([], []) is None and expected_calibration_error([], []) is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1], [1.5])


def test_platt_on_separable_data_is_finite_and_monotone():
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    labels = [0, 0, 0, 1, 1, 1]
    params = fit_platt(scores, labels)
    assert math.isfinite(params["a"]) and params["a"] > 0
    cal = CalibrationMap("platt", params)
    out = cal.apply(np.linspace(0, 1, 21))
    assert np.all(np.diff(out) > 0)
    # Platt's smoothed targets bound the fit: never 0 or 1 on the data, and it separates at the gap
    fitted = cal.apply(scores)
    assert fitted[:3].max() < 0.5 < fitted[3:].min()
    assert fitted.min() > 0.01 and fitted.max() < 0.99
    # the smoothed targets are (3+1)/(3+2) = 0.8 and 1/(3+2) = 0.2: the fit cannot be more sure than that on average
    assert fitted[3:].mean() == pytest.approx(0.8, abs=0.05) and fitted[:3].mean() == pytest.approx(0.2, abs=0.05)


def test_platt_recovers_a_known_sigmoid():
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 1, 20000)
    y = rng.uniform(0, 1, s.size) < 1 / (1 + np.exp(-(6 * s - 3)))
    params = fit_platt(s, y)
    assert params["a"] == pytest.approx(6, rel=0.1) and params["b"] == pytest.approx(-3, rel=0.1)


def test_isotonic_values_by_hand():
    # pool adjacent violators: [0, 1, 0, 1] → [0, .5, .5, 1], then bounded to [1/6, 5/6] (n = 4)
    params = fit_isotonic([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    cal = CalibrationMap("isotonic", params)
    assert cal.apply([0.1, 0.2, 0.3, 0.4]) == pytest.approx([1 / 6, 0.5, 0.5, 5 / 6])
    # linear between fitted points, constant beyond them
    assert cal(0.35) == pytest.approx((0.5 + 5 / 6) / 2)
    assert cal(0.0) == pytest.approx(1 / 6) and cal(1.0) == pytest.approx(5 / 6)


def test_choice_by_cross_validated_log_loss_and_refusal_when_too_few():
    rng = np.random.default_rng(1)
    # a step: P(tumor) jumps from 0.1 to 0.9 at score 0.5 (isotonic's shape, not a sigmoid of the score)
    s = rng.uniform(0, 1, 400)
    y = rng.uniform(0, 1, s.size) < np.where(s < 0.5, 0.1, 0.9)
    cal, info = choose_calibration(s, y, fitted_on={"split": "val", "n_volumes": 400})
    assert info["chosen"] == cal.method and set(info["cv_log_loss"]) == {"platt", "isotonic"}
    assert info["cv_log_loss"][cal.method] == min(info["cv_log_loss"].values()) and info["n_folds"] == 5
    assert cal.fitted_on["split"] == "val" and cal.fitted_on["n_positive"] == int(y.sum())
    # a sigmoid of the score: Platt's two parameters win
    y2 = rng.uniform(0, 1, s.size) < 1 / (1 + np.exp(-(4 * s - 2)))
    assert choose_calibration(s, y2)[1]["chosen"] == "platt"
    # one positive volume: nothing to cross-validate, no map and the reason
    cal, info = choose_calibration([0.1, 0.2, 0.9], [0, 0, 1])
    assert cal is None and info["chosen"] is None and "1 positive and 2 negative" in info["reason"]


def test_folds_keep_a_volume_together():
    # slice-level: 2 volumes' slices must not be split across folds; 4 volumes per class are enough
    groups = np.repeat(np.arange(8), 5)
    labels = np.repeat([0, 1] * 4, 5).astype(bool)
    scores = np.where(labels, 0.7, 0.3) + np.tile(np.linspace(-0.05, 0.05, 5), 8)
    cal, info = choose_calibration(scores, labels, groups)
    assert info["n_groups"] == 8 and info["n_folds"] == 4 and cal is not None


def test_metrics_before_after_and_figure(tmp_path):
    cal = CalibrationMap("platt", {"a": 0.0, "b": 0.0})  # everything → 0.5
    m = calibration_metrics(cal, [0.0, 1.0], [1, 0])
    assert m["brier"] == {"before": 1.0, "after": 0.25} and m["ece"]["before"] == 1.0 and m["ece"]["after"] == 0.0
    none = calibration_metrics(None, [0.2], [0])
    assert none["brier"]["after"] is None and none["bins"]["after"] is None
    empty = calibration_metrics(None, [], [])
    assert empty["brier"] == {"before": None, "after": None} and empty["n"] == 0
    path = reliability_figure({"patient score": m, "slice P(tumor)": none, "empty": empty}, tmp_path / "reliability.png")
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 400 and len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10


def test_map_is_json_and_checked(tmp_path):
    cal = CalibrationMap("isotonic", {"x": [0.1, 0.5], "y": [0.2, 0.7]},
                         {"split": "val", "n_volumes": 12, "dataset": "MSD, NIH"})
    doc = {"format": 1, "calibration": {**cal.as_dict(), "slice": CalibrationMap("platt", {"a": 2.0, "b": -1.0},
                                                                                 target="slice P(tumor)").as_dict()}}
    (tmp_path / "operating_point.json").write_text(json.dumps(doc))
    patient, per_slice = read_calibration(tmp_path / "operating_point.json")
    assert patient == cal and per_slice(0.5) == pytest.approx(0.5)
    (tmp_path / "none.json").write_text(json.dumps({"calibration": None}))
    assert read_calibration(tmp_path / "none.json") == (None, None)
    (tmp_path / "bad.json").write_text(json.dumps({"calibration": {"method": "isotonic", "params": {"x": [0.5, 0.1], "y": [0.1, 0.2]}}}))
    with pytest.raises(ValueError, match="bad.json: calibration: isotonic calibration points must be sorted"):
        read_calibration(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="'pickle' is not one of"):
        map_from_dict({"method": "pickle", "params": {}})
    with pytest.raises(ValueError, match="no 'calibration' key"):
        (tmp_path / "x.json").write_text("{}")
        read_calibration(tmp_path / "x.json")


def test_likelihood_words_never_a_percentage_without_a_map():
    cal = CalibrationMap("platt", {"a": 0.0, "b": math.log(3)}, {"split": "val", "n_volumes": 30, "dataset": "MSD"})
    entry = likelihood_entry(0.8, cal)
    assert entry == {"raw": 0.8, "calibrated": 0.75, "calibration": {"method": "platt", "fitted_on": "val: 30 volumes of MSD"}}
    assert likelihood_text(entry) == "calibrated likelihood 75 % (platt, fitted on val: 30 volumes of MSD); raw score 0.800"
    bare = likelihood_entry(0.8, None)
    assert bare == {"raw": 0.8, "calibrated": None, "calibration": None}
    assert likelihood_text(bare).startswith("uncalibrated score 0.800") and "%" not in likelihood_text(bare)
    assert likelihood_entry(None, cal) is None and likelihood_text(None) == "no score (inconclusive)"


def test_the_cascade_calibration_from_patient_scores_and_slice_rows():
    from minigpt4.evaluation.calibration import cascade_calibration

    def patients(scores_labels, prefix):
        return {("MSD" if y else "NIH", f"{prefix}{i}"): {"label": y, "inconclusive": s is None,
                                                          "scores": {"max": s, "top_k_mean": s}, "dataset": "MSD" if y else "NIH"}
                for i, (s, y) in enumerate(scores_labels)}

    val = patients([(0.2, False), (0.3, False), (0.4, False), (0.6, True), (0.7, True), (0.9, True), (None, True)], "v")
    test = patients([(0.1, False), (0.8, True), (None, False)], "t")
    rows = lambda p: [{"dataset": d, "volume_name": v, "p_tumor": p_["scores"]["max"], "has_tumor": p_["label"]}  # noqa: E731
                      for (d, v), p_ in p.items()] + [{"dataset": "NIH", "volume_name": "x", "p_tumor": None, "has_tumor": False}]
    doc, metrics = cascade_calibration(val, rows(val), test, rows(test), "max", ["NIH", "MSD"])
    # 6 conclusive val volumes (3 + 3): a patient map, fitted on them, named
    assert doc["fitted_on"] == {"split": "val", "n_volumes": 6, "dataset": "MSD, NIH", "n_items": 6, "n_positive": 3}
    assert doc["method"] == metrics["patient"]["selection"]["chosen"] and doc["slice"]["target"] == "slice P(tumor)"
    # test: the 2 conclusive volumes, raw 0.1 (no) and 0.8 (yes): Brier before (0.01 + 0.04) / 2
    assert metrics["n_test_volumes"] == 2 and metrics["brier"]["before"] == pytest.approx(0.025)
    after = CalibrationMap(doc["method"], doc["params"]).apply([0.1, 0.8])
    assert metrics["brier"]["after"] == pytest.approx(((after[0] - 0) ** 2 + (after[1] - 1) ** 2) / 2)
    assert metrics["ece"]["before"] == pytest.approx((0.1 + 0.2) / 2)
    # the map round-trips through JSON as operating_point.json's "calibration"
    assert map_from_dict(json.loads(json.dumps(doc))).apply(0.8) == pytest.approx(after[1])


def test_configured_calibration_reads_the_operating_point_the_config_names(tmp_path):
    from types import SimpleNamespace

    from minigpt4.inference.calibration import configured_calibration

    assert configured_calibration(SimpleNamespace()) == (None, None)  # a cascade section without the key
    assert configured_calibration(SimpleNamespace(operating_point=None)) == (None, None)
    with pytest.raises(FileNotFoundError, match="cascade.operating_point: .*missing.json not found"):
        configured_calibration(SimpleNamespace(operating_point=str(tmp_path / "missing.json")))
    cal = CalibrationMap("platt", {"a": 1.0, "b": 0.0}, {"split": "val", "n_volumes": 9})
    (tmp_path / "operating_point.json").write_text(json.dumps({"format": 1, "calibration": {**cal.as_dict(), "slice": None}}))
    assert configured_calibration(SimpleNamespace(operating_point=str(tmp_path / "operating_point.json"))) == (cal, None)
