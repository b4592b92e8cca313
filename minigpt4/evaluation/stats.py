"""Small statistics helpers shared by detection and classification scoring.

* binary metrics from confusion counts (the same definitions as scikit-learn, ``yes`` positive),
  used for the bootstrap where calling scikit-learn 1,000 times would dominate the run time;
* ROC AUC by the Mann–Whitney rank statistic (ties count one half, as ``roc_auc_score``);
* a **cluster bootstrap by volume**: slices of one CT volume are strongly correlated, so the
  resampling unit is the volume, not the slice. Volumes are resampled with replacement within
  each stratum (the source dataset) so every replicate keeps the datasets' composition — in the
  TC set the classes come from different datasets, and an unstratified replicate could hold a
  single class.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np
from scipy.stats import rankdata


def safe_ratio(num: float, den: float) -> Optional[float]:
    """``num / den`` or None when the denominator is 0 (metric undefined)."""
    return float(num / den) if den > 0 else None


def binary_metrics_from_counts(tp: float, fp: float, fn: float, tn: float) -> dict[str, Optional[float]]:
    """Accuracy, precision, recall and F1 from confusion counts; None where undefined."""
    total = tp + fp + fn + tn
    precision = safe_ratio(tp, tp + fp)
    recall = safe_ratio(tp, tp + fn)
    f1 = safe_ratio(2 * tp, 2 * tp + fp + fn)
    return {"accuracy": safe_ratio(tp + tn, total), "precision": precision, "recall": recall, "f1": f1}


def auc_score(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """ROC AUC of ``scores`` for binary ``labels`` (1 = positive); None with a single class.

    Args:
        labels: (N,) 0/1.
        scores: (N,) float, higher = more positive.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks: ties count 1/2, as in roc_auc_score
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cluster_bootstrap(
    clusters: Sequence[Hashable],
    statistic: Callable[[np.ndarray], Mapping[str, Optional[float]]],
    n_boot: int = 1000,
    seed: int = 0,
    strata: Optional[Sequence[Hashable]] = None,
    level: float = 0.95,
) -> dict[str, Optional[list[float]]]:
    """Percentile confidence intervals with whole clusters (volumes) resampled.

    Args:
        clusters: (N,) cluster key of every sample, e.g. ``(dataset, volume_name)``.
        statistic: maps an index array (M,) into the samples to ``{name: value or None}``.
        n_boot: number of replicates; 0 disables the bootstrap (returns {}).
        seed: seed of the resampling (results are reproducible).
        strata: (N,) stratum of every sample; clusters are resampled within their stratum.
            A cluster must lie in one stratum.
        level: coverage of the interval.

    Returns:
        ``{name: [low, high]}``; None for a statistic that is undefined in too many replicates
        (more than half).
    """
    if n_boot <= 0 or len(clusters) == 0:
        return {}
    if strata is None:
        strata = [0] * len(clusters)
    members: dict[Hashable, list[int]] = {}
    stratum_of: dict[Hashable, Hashable] = {}
    for index, (cluster, stratum) in enumerate(zip(clusters, strata)):
        members.setdefault(cluster, []).append(index)
        if stratum_of.setdefault(cluster, stratum) != stratum:
            raise ValueError(f"cluster {cluster!r} spans several strata ({stratum_of[cluster]!r}, {stratum!r})")
    by_stratum: dict[Hashable, list[np.ndarray]] = {}
    for cluster, idx in members.items():
        by_stratum.setdefault(stratum_of[cluster], []).append(np.asarray(idx, dtype=np.int64))
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n_boot):
        parts = []
        for groups in by_stratum.values():
            for pick in rng.integers(0, len(groups), size=len(groups)):
                parts.append(groups[pick])
        result = statistic(np.concatenate(parts))
        for name, value in result.items():
            values.setdefault(name, [])
            if value is not None and not math.isnan(value):
                values[name].append(float(value))
    alpha = (1.0 - level) / 2
    intervals: dict[str, Optional[list[float]]] = {}
    for name, samples in values.items():
        if len(samples) * 2 < n_boot:
            intervals[name] = None
        else:
            low, high = np.quantile(np.asarray(samples), [alpha, 1 - alpha])
            intervals[name] = [float(low), float(high)]
    return intervals
