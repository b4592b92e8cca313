"""Slice intensity normalisation to 8-bit (SPEC §4 item 3).

* ``paper`` (default): per slice, clip HU to its 2nd–98th percentile (nearest rank), then
  histogram equalisation. Values are rounded to whole HU first (CT precision), which makes the
  whole step one integer histogram (``np.bincount``) instead of sorts:
  ``out = round(255 * (cdf(v) - cdf(lo)) / (N - cdf(lo)))`` on the clipped values, with
  ``cdf(v)`` the number of pixels ``<= v`` and ``N`` the pixel count (the classic
  ``equalizeHist`` formula). A constant slice maps to 0.
* ``window``: the release's HU window, ``round(255 * clip((HU - lo) / (hi - lo), 0, 1))`` with
  ``[lo, hi] = [-150, 250]`` by default (without the release's implicit min–max stretch).
"""

from __future__ import annotations

import numpy as np

METHODS = ("paper", "window")
DEFAULT_WINDOW = (-150.0, 250.0)
# Above this HU range a slice's histogram is built over its distinct values instead (same result:
# the equalisation only depends on ranks); keeps a stray 1e9 voxel from allocating gigabytes.
MAX_HISTOGRAM_BINS = 1 << 17


def equalize(slice_hu: np.ndarray, low_pct: float = 2.0, high_pct: float = 98.0) -> np.ndarray:
    """Percentile clip + histogram equalisation of one slice.

    Percentiles are nearest-rank on whole HU: ``lo`` is the smallest value with at least
    ``low_pct`` % of the pixels at or below it, ``hi`` the smallest with at least ``high_pct`` %.
    One ``np.bincount`` gives both the percentiles and the equalisation table.

    Args:
        slice_hu: (H, W) HU values (any real or integer dtype).

    Returns:
        (H, W) uint8.
    """
    slice_hu = np.asarray(slice_hu)
    if np.issubdtype(slice_hu.dtype, np.integer):
        values = slice_hu.astype(np.int64)
    else:
        if not np.isfinite(slice_hu).all():
            raise ValueError("slice has NaN/Inf values")
        values = np.rint(slice_hu.astype(np.float32))
    vmin = values.min()
    if float(values.max()) - float(vmin) <= MAX_HISTOGRAM_BINS:
        shifted = (values - vmin).astype(np.intp)
    else:  # a few extreme values: histogram over the distinct values (ranks), not over the range
        shifted = np.unique(values, return_inverse=True)[1].reshape(values.shape)
    hist = np.bincount(shifted.ravel())
    cdf = np.cumsum(hist)
    n = int(cdf[-1])
    lo = int(np.searchsorted(cdf, low_pct / 100.0 * n))
    hi = max(lo, int(np.searchsorted(cdf, high_pct / 100.0 * n)))
    # Histogram of the clipped slice: the tails pile up on lo and hi.
    clipped_cdf = cdf[lo:hi + 1].copy()
    clipped_cdf[-1] = n
    cdf_min = int(clipped_cdf[0])
    if n == cdf_min:  # constant (or almost constant) slice
        return np.zeros(values.shape, dtype=np.uint8)
    lut = np.rint((clipped_cdf - cdf_min) * (255.0 / (n - cdf_min)))
    lut = np.clip(lut, 0, 255).astype(np.uint8)
    return lut[np.clip(shifted, lo, hi) - lo]


def window(slice_hu: np.ndarray, lo: float = DEFAULT_WINDOW[0], hi: float = DEFAULT_WINDOW[1]) -> np.ndarray:
    """HU window → uint8: ``round(255 * clip((HU - lo) / (hi - lo), 0, 1))``."""
    if hi <= lo:
        raise ValueError(f"window must have lo < hi, got [{lo}, {hi}]")
    scaled = (np.asarray(slice_hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def normalize_slice(slice_hu: np.ndarray, method: str = "paper", window_range=DEFAULT_WINDOW) -> np.ndarray:
    """Dispatch on ``method`` (``paper`` | ``window``); (H, W) HU → (H, W) uint8."""
    if method == "paper":
        return equalize(slice_hu)
    if method == "window":
        return window(slice_hu, *window_range)
    raise ValueError(f"unknown normalization {method!r}; choose from {METHODS}")
