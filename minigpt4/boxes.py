"""The one module that owns the box format (used by preprocessing, training, evaluation, demo).

Conventions (SPEC §3, §6):

* **Pixel box** ``[x_min, y_min, x_max, y_max]``: *inclusive* pixel indices of the mask in the
  PNG (x = column, y = row), origin at the top-left pixel. ``[0, 0, 0, 0]`` = no target.
* **Grid box**: the same box on a 0–100 integer grid, ``floor(x * 100 / width)`` and
  ``floor(y * 100 / height)``; written as text ``{<x1><y1><x2><y2>}`` with no spaces.
* **Scoring** (the release's rule, :data:`SCORING_RULE`, kept so numbers are comparable with the
  paper): every run of digits in the answer; exactly four → the box as written, anything else a
  bad answer (:func:`parse_box`). The box goes back to pixels as ``x * width / 100`` and
  ``y * height / 100`` (floats), and IoU is continuous, ``max(0, x2-x1)*max(0, y2-y1)`` areas, no
  ``+1``. Nothing clips or reorders a predicted box.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

GRID = 100
EMPTY_BOX = (0, 0, 0, 0)

Box = tuple  # 4 numbers: (x1, y1, x2, y2)


def pixel_to_grid(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box → 0–100 grid box (floor, clipped to 0..100).

    >>> pixel_to_grid([128, 256, 383, 511], 512, 512)
    (25, 50, 74, 99)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box
    scale = ((x1, width), (y1, height), (x2, width), (y2, height))
    # v * GRID / size is one correctly rounded division, exact at integers; v / size * GRID is not
    # (29 / 100 * 100 = 28.999999999999996 floors to 28)
    return tuple(min(GRID, max(0, math.floor(v * GRID / size))) for v, size in scale)  # type: ignore[return-value]


def grid_to_pixel(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """0–100 grid box → continuous pixel box (``x * width / 100``), as scored by the paper."""
    x1, y1, x2, y2 = box
    return (x1 * width / GRID, y1 * height / GRID, x2 * width / GRID, y2 * height / GRID)


def format_box(grid_box: Sequence[int]) -> str:
    """``(25, 50, 74, 99)`` → ``'{<25><50><74><99>}'``."""
    values = [int(v) for v in grid_box]
    if len(values) != 4:
        raise ValueError(f"a box has 4 values, got {grid_box!r}")
    return "{" + "".join(f"<{v}>" for v in values) + "}"


def box_answer(pixel_box: Sequence[float], width: int, height: int) -> str:
    """The training answer for a pixel box: grid conversion + text format (the empty pixel box
    ``[0, 0, 0, 0]`` gives :data:`NO_BOX_ANSWER`)."""
    return format_box(pixel_to_grid(pixel_box, width, height))


NO_BOX_ANSWER = format_box(EMPTY_BOX)
"""``{<0><0><0><0>}``: the answer for "the target is not on this slice" (a stage-1 option trained on
slices without pancreas, ``datasets.*.empty_share``). It keeps MiniGPT-v2's box syntax, so the
release rule (:func:`parse_box`) reads it as a box of zero area: IoU 0 in scoring, "no box" in the
cascade (:func:`says_absent`), never a guessed box."""


def says_absent(text: Optional[str]) -> bool:
    """True when an answer is the empty box (:data:`NO_BOX_ANSWER`, as parsed by :func:`parse_box`):
    the model says the target is absent (a bad answer is not "absent": it is no answer)."""
    return parse_box(text) == EMPTY_BOX


SCORING_RULE = "release"
"""The one parsing rule used by training validation, evaluation and the demo (SPEC §6)."""

_DIGIT_RUN_RE = re.compile(r"\d+")
# A digit run longer than this cannot be a grid value; it would overflow the float rescaling
# (the release would crash on it). Answers are at most ``max_new_tokens`` (20) pieces anyway.
_MAX_DIGITS = 300


def parse_box(text: Optional[str]) -> Optional[tuple[int, int, int, int]]:
    """The release's rule (``eval_scripts/evaluate_predictions.py``): every run of digits in the
    answer; exactly four → the box **as written**, otherwise None (a bad answer).

    Nothing is clipped, rounded or reordered: reversed corners stay reversed (area 0 → IoU 0),
    values over 100 stay over 100, a minus sign is dropped (``\\d+`` does not see it), a decimal
    adds a digit run (→ bad answer), prose with other numbers, two boxes or an empty answer are bad
    answers. Never raises, whatever the input.

    >>> parse_box("{<80><20><10><90>}")
    (80, 20, 10, 90)
    >>> parse_box("{<1><2><3><4>} and {<5><6><7><8>}") is None
    True
    """
    if not isinstance(text, str):
        return None
    runs = _DIGIT_RUN_RE.findall(text)
    if len(runs) != 4 or any(len(r) > _MAX_DIGITS for r in runs):
        return None
    x1, y1, x2, y2 = (int(r) for r in runs)  # int() also reads non-ASCII digits, as the release
    return (x1, y1, x2, y2)


def box_problem(text: Optional[str]) -> Optional[str]:
    """Why an answer scores 0 under the release rule, in words (for the demo); None when it is a
    box with positive area."""
    if not isinstance(text, str) or not text.strip():
        return "the answer is empty"
    runs = _DIGIT_RUN_RE.findall(text)
    if len(runs) != 4:
        return f"the scoring rule needs exactly four numbers, this answer has {len(runs)}"
    box = parse_box(text)
    if box is None:
        return "a number is too long to be a grid value"
    if box == EMPTY_BOX:
        return "it is the empty box: the model says the target is absent"
    if box[2] <= box[0] or box[3] <= box[1]:
        return "its corners are reversed or equal (zero area), so it scores IoU 0"
    return None


def box_area(box: Sequence[float]) -> float:
    """Continuous area ``(x2-x1)*(y2-y1)``, 0 for degenerate boxes."""
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Continuous IoU without ``+1`` (release rule); 0 when the union is empty."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = box_area((ix1, iy1, ix2, iy2)) if ix2 > ix1 and iy2 > iy1 else 0.0
    union = box_area(a) + box_area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def score_answer(answer: Optional[str], gt_pixel_box: Sequence[float], width: int, height: int) -> tuple[Optional[tuple[float, float, float, float]], float]:
    """Parse a detection answer and score it against the ground-truth pixel box.

    Returns ``(pred_pixel_box or None, iou)``: the release rule (:func:`parse_box`), the box
    rescaled as written (no clipping or reordering) and continuous IoU; a bad answer scores 0.
    """
    grid = parse_box(answer)
    if grid is None:
        return None, 0.0
    pred = grid_to_pixel(grid, width, height)
    return pred, box_iou(pred, gt_pixel_box)


@lru_cache(maxsize=4096)
def _axis_frontier(lo: float, hi: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid intervals ``[g1, g2]`` (0 <= g1 < g2 <= 100) of one axis that overlap the ground-truth
    interval ``[lo, hi]`` and are not dominated: no other interval overlaps it more while being no
    longer. Returns ``(g1, g2, overlap, length)`` (K,) arrays, K <= 101, in pixels as scored
    (``g * size / 100``)."""
    g1, g2 = np.triu_indices(GRID + 1, k=1)
    p1, p2 = g1 * size / GRID, g2 * size / GRID  # the same float division as grid_to_pixel
    overlap = np.minimum(p2, hi) - np.maximum(p1, lo)
    length = p2 - p1
    keep = overlap > 0
    g1, g2, overlap, length = g1[keep], g2[keep], overlap[keep], length[keep]
    order = np.lexsort((-overlap, length))  # shortest first, larger overlap first among equals
    best_before = np.maximum.accumulate(np.concatenate([[0.0], overlap[order]]))[:-1]
    front = order[overlap[order] > best_before]
    return g1[front], g2[front], overlap[front], length[front]


def best_grid_answer(gt_pixel_box: Sequence[float], width: int, height: int) -> tuple[Optional[tuple[int, int, int, int]], float]:
    """The 0–100 grid answer with the highest IoU against ``gt_pixel_box`` under the scoring rule
    (:func:`score_answer`), and that IoU: the ceiling no answer on the grid can beat.

    Exact, not a per-coordinate rounding: IoU = Ix·Iy / (Lx·Ly + G − Ix·Iy) grows with each axis'
    overlap I and shrinks with its length L, so only intervals that no other interval beats on both
    (the Pareto frontier of each axis, <= 101 each) can be optimal; every pair of them is scored.
    The ground truth's own grid answer (:func:`box_answer`) can fall well short: for the 512-px box
    ``[128, 256, 383, 511]`` it scores 0.968, ``{<25><50><75><100>}`` scores 0.992.

    Returns:
        ``((g1, h1, g2, h2), iou)``; ``(None, 0.0)`` when no grid box overlaps the ground truth
        (a zero-area ground truth scores 0 against anything).
    """
    x1, y1, x2, y2 = (float(v) for v in gt_pixel_box)
    if x2 <= x1 or y2 <= y1:
        return None, 0.0
    gx1, gx2, ox, lx = _axis_frontier(x1, x2, int(width))
    gy1, gy2, oy, ly = _axis_frontier(y1, y2, int(height))
    if not len(ox) or not len(oy):
        return None, 0.0
    inter = ox[:, None] * oy[None, :]
    iou = inter / (lx[:, None] * ly[None, :] + (x2 - x1) * (y2 - y1) - inter)
    i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
    grid = (int(gx1[i]), int(gy1[j]), int(gx2[i]), int(gy2[j]))
    return grid, box_iou(grid_to_pixel(grid, width, height), gt_pixel_box)


_YES_NO_RE = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: Optional[str]) -> Optional[str]:
    """``'Yes.'`` → ``'yes'``, ``' no, there is none'`` → ``'no'``; anything else → None (counted
    as invalid, never silently as ``no``).

    The answer must start with yes or no (any casing) and not contain the other word: ``'Yes/No'``
    and ``'yes no'`` hedge between the classes and are invalid, not ``yes``.
    """
    if not isinstance(text, str):
        return None
    match = _YES_NO_RE.match(text)
    if match is None:
        return None
    verdict = match.group(1).lower()
    if any(word.lower() != verdict for word in _WORD_RE.findall(text)):
        return None
    return verdict


def grid_to_pixel_inclusive(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """0–100 grid box → the widest *inclusive* pixel box whose :func:`pixel_to_grid` is ``box``.

    Pixel ``x`` lies in grid cell ``floor(x * 100 / width)``; so the first pixel of cell ``g`` is
    ``ceil(g * width / 100)`` and the last pixel of cell ``g`` is ``ceil((g + 1) * width / 100) - 1``
    (integer arithmetic, exact). A box answered exactly right thus covers the whole ground-truth
    box (at most one grid cell more per side). Used to cut crops from predicted boxes (the
    cascade's stage 2 input).

    >>> grid_to_pixel_inclusive((25, 50, 74, 99), 512, 512)
    (128, 256, 383, 511)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = (min(GRID, max(0, int(v))) for v in box)

    def first(g: int, size: int) -> int:  # ceil(g * size / 100)
        return min(size - 1, -((-g * size) // GRID))

    def last(g: int, size: int) -> int:  # ceil((g + 1) * size / 100) - 1
        return min(size - 1, max(0, -((-(g + 1) * size) // GRID) - 1))

    fx, fy = first(x1, width), first(y1, height)
    return (fx, fy, max(fx, last(x2, width)), max(fy, last(y2, height)))
