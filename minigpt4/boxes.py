"""The one module that owns the box format (used by preprocessing, training, evaluation, demo).

Conventions (SPEC §3, §6):

* **Pixel box** ``[x_min, y_min, x_max, y_max]``: *inclusive* pixel indices of the mask in the
  PNG (x = column, y = row), origin at the top-left pixel. ``[0, 0, 0, 0]`` = no target.
* **Grid box**: the same box on a 0–100 integer grid, ``floor(x / width * 100)`` and
  ``floor(y / height * 100)``; written as text ``{<x1><y1><x2><y2>}`` with no spaces.
* **Scoring**: a predicted grid box goes back to pixels as ``x * width / 100`` and
  ``y * height / 100`` (floats), and IoU is continuous, ``(x2-x1)*(y2-y1)`` areas, no ``+1``
  (the release's rule, kept so numbers are comparable with the paper).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

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
    return tuple(min(GRID, max(0, math.floor(v / size * GRID))) for v, size in scale)  # type: ignore[return-value]


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
    """The training answer for a pixel box: grid conversion + text format."""
    return format_box(pixel_to_grid(pixel_box, width, height))


# <12><34><56><78>, tolerant of spaces, decimals and a missing/extra brace.
_BOX_RE = re.compile(
    r"<\s*(-?\d+(?:\.\d+)?)\s*>\s*,?\s*<\s*(-?\d+(?:\.\d+)?)\s*>\s*,?\s*"
    r"<\s*(-?\d+(?:\.\d+)?)\s*>\s*,?\s*<\s*(-?\d+(?:\.\d+)?)\s*>"
)


def parse_box(text: Optional[str]) -> Optional[tuple[int, int, int, int]]:
    """Find the first ``<x1><y1><x2><y2>`` group in a model answer.

    Tolerant: braces optional, spaces allowed, decimals rounded; values are clipped to 0–100 and
    corners ordered so that x1 <= x2 and y1 <= y2. Returns None when no box can be read. Never
    raises, whatever the input.

    >>> parse_box("{<80><20><10><90>}")
    (10, 20, 80, 90)
    >>> parse_box("the pancreas") is None
    True
    """
    if not isinstance(text, str):
        return None
    match = _BOX_RE.search(text)
    if match is None:
        return None
    try:
        # clip before rounding: a huge literal is float('inf'), which round() cannot take
        x1, y1, x2, y2 = (round(min(GRID, max(0.0, float(g)))) for g in match.groups())
    except (ValueError, OverflowError):
        return None
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


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

    Returns ``(pred_pixel_box or None, iou)``; an unparseable answer scores 0.
    """
    grid = parse_box(answer)
    if grid is None:
        return None, 0.0
    pred = grid_to_pixel(grid, width, height)
    return pred, box_iou(pred, gt_pixel_box)


_YES_NO_RE = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: Optional[str]) -> Optional[str]:
    """``'Yes.'`` → ``'yes'``, ``' no'`` → ``'no'``; anything else → None (counted as invalid,
    never silently as ``no``)."""
    if not isinstance(text, str):
        return None
    match = _YES_NO_RE.match(text)
    return match.group(1).lower() if match else None


def grid_to_pixel_inclusive(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """0–100 grid box → the widest *inclusive* pixel box whose :func:`pixel_to_grid` is ``box``.

    Pixel ``x`` lies in grid cell ``floor(x / width * 100)``; so the first pixel of cell ``g`` is
    ``ceil(g * width / 100)`` and the last pixel of cell ``g`` is ``ceil((g + 1) * width / 100) - 1``.
    A box answered exactly right thus covers the whole ground-truth box (at most one grid cell
    more per side). Used to cut crops from predicted boxes (the cascade's stage 2 input).

    >>> grid_to_pixel_inclusive((25, 50, 74, 99), 512, 512)
    (128, 256, 383, 511)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = (min(GRID, max(0, int(v))) for v in box)

    def cell(x: int, size: int) -> int:  # exactly pixel_to_grid's float rule
        return math.floor(x / size * GRID)

    def first(g: int, size: int) -> int:  # first pixel whose cell is >= g
        x = min(size - 1, -((-g * size) // GRID))  # ceil(g * size / 100), then fix float rounding
        while x > 0 and cell(x - 1, size) >= g:
            x -= 1
        while x < size - 1 and cell(x, size) < g:
            x += 1
        return x

    def last(g: int, size: int) -> int:  # last pixel whose cell is <= g
        x = min(size - 1, max(0, -((-(g + 1) * size) // GRID) - 1))
        while x < size - 1 and cell(x + 1, size) <= g:
            x += 1
        while x > 0 and cell(x, size) > g:
            x -= 1
        return x

    fx, fy = first(x1, width), first(y1, height)
    return (fx, fy, max(fx, last(x2, width)), max(fy, last(y2, height)))
