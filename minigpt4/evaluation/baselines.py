"""The model-free tumor-classification baseline printed beside the model in Table 2.

In the paper's TC set every ``yes`` crop comes from MSD and every ``no`` crop from NIH: different
scanners and contrast phases. The crop's size and intensity histogram alone then separate the
classes (BENCHMARKS.md: 0.874 accuracy, 0.910 AUC on the real crops), about the paper's 0.876. A
model is only interesting where it beats this baseline, so ``eval_classification.py`` fits it on
the same prepared folder's ``train`` split and scores it on the very rows the model answered.

Features per crop (:func:`histogram_features`): width, height, area, aspect, mean, standard
deviation and a 32-bin intensity histogram (fractions) → scikit-learn gradient boosting, seeded.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from minigpt4.evaluation.classification import classification_metrics, classification_row

BASELINE_NAME = "crop size + intensity histogram → gradient boosting (no model)"


def _gray(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def histogram_features(records: Sequence[dict]) -> np.ndarray:
    """(N, 38) features of the crops in ``records[i]['image']``: w, h, w·h, w/h, mean, std, 32 bins."""
    rows = []
    for record in records:
        pixels = _gray(record["image"])
        height, width = pixels.shape
        hist = np.histogram(pixels, bins=32, range=(0, 256))[0] / pixels.size
        rows.append(np.concatenate([[width, height, width * height, width / height, pixels.mean(), pixels.std()], hist]))
    return np.asarray(rows, dtype=float).reshape(len(rows), 38)


def labels_of(records: Sequence[dict]) -> np.ndarray:
    """(N,) 1 for ``yes``, 0 for ``no``."""
    return np.asarray([1 if r["answer"] == "yes" else 0 for r in records], dtype=int)


def fit_histogram_baseline(train: Sequence[dict], seed: int = 0) -> Any:
    """A gradient-boosting classifier fitted on the train crops.

    Raises:
        ValueError: no train records, or a single class among them (nothing to learn).
    """
    from sklearn.ensemble import GradientBoostingClassifier

    y = labels_of(train)
    if len(train) == 0 or y.min() == y.max():
        raise ValueError(f"the histogram baseline needs both classes in the train split, got {len(train)} records "
                         f"({int(y.sum())} yes)")
    return GradientBoostingClassifier(random_state=seed).fit(histogram_features(train), y)


def histogram_probabilities(classifier: Any, records: Sequence[dict]) -> np.ndarray:
    """(N,) P(yes) of the fitted baseline for ``records``."""
    return classifier.predict_proba(histogram_features(records))[:, 1]


def histogram_baseline_rows(train: Sequence[dict], test: Sequence[dict], seed: int = 0) -> list[dict]:
    """Prediction rows of the baseline on ``test``, shaped like the model's (answer = ``yes`` when
    P(yes) >= 0.5), so the same metrics code scores both."""
    p_yes = histogram_probabilities(fit_histogram_baseline(train, seed), test)
    return [classification_row(r, "yes" if p >= 0.5 else "no", float(p)) for r, p in zip(test, p_yes)]


def histogram_baseline_metrics(train: Sequence[dict], test: Sequence[dict], n_boot: int = 0, seed: int = 0) -> dict:
    """:func:`classification_metrics` of the baseline, with ``name`` and ``n_train``; on a train
    split it cannot learn from, ``{"name", "skipped": reason}``."""
    try:
        rows = histogram_baseline_rows(train, test, seed)
    except ValueError as err:
        return {"name": BASELINE_NAME, "skipped": str(err)}
    return {"name": BASELINE_NAME, "n_train": len(train), **classification_metrics(rows, n_boot=n_boot, seed=seed)}

