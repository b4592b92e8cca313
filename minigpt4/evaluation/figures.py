"""Figures of the paper (appendix Figs 2–5, Fig 3) and diagnostic plots, written as PNG.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no
display needed). Every file is written atomically.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from minigpt4.boxes import GRID, parse_box
from minigpt4.io import atomic_path

GT_COLOUR, PRED_COLOUR = "lime", "red"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _pick_examples(rows: Sequence[dict], n: int) -> list[dict]:
    """Rows spread evenly over the IoU range (worst to best), only those whose image exists."""
    usable = sorted((r for r in rows if r.get("image") and Path(r["image"]).is_file()), key=lambda r: (r["iou"], str(r.get("q_id"))))
    if len(usable) <= n:
        return usable
    return [usable[round(i * (len(usable) - 1) / (n - 1))] for i in range(n)] if n > 1 else usable[-1:]


def detection_examples(rows: Sequence[dict], path: str | os.PathLike, n: int = 12, columns: int = 4) -> Optional[Path]:
    """A grid of slices with the ground truth in green, the prediction in red and the IoU under
    each (paper appendix Figs 2–5). Returns None when no row has a readable image.

    Boxes are drawn with exactly the coordinates that were scored (inclusive pixel indices for
    the ground truth, ``grid * side / 100`` for the prediction)."""
    picked = _pick_examples(rows, n)
    if not picked:
        return None
    columns = min(columns, len(picked))
    lines = (len(picked) + columns - 1) // columns
    fig = Figure(figsize=(3 * columns, 3.3 * lines), layout="constrained")
    for i, row in enumerate(picked):
        ax = fig.add_subplot(lines, columns, i + 1)
        with Image.open(row["image"]) as image:
            ax.imshow(np.asarray(image.convert("L")), cmap="gray")
        x1, y1, x2, y2 = row["gt_box"]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=GT_COLOUR, linewidth=1.5))
        if row.get("pred_box") is not None:
            x1, y1, x2, y2 = row["pred_box"]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=PRED_COLOUR, linewidth=1.5))
        caption = f"IoU {row['iou']:.3f}" if row.get("parsed", True) else "IoU 0 (unparseable)"
        ax.set_xlabel(f"{caption}\n{row.get('dataset', '')} {row.get('target') or ''}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("ground truth (green) vs prediction (red)", fontsize=10)
    return _save(fig, path)


def _grid_cells(row: dict, key: str, grid: int) -> Optional[tuple[int, int, int, int]]:
    """The box of ``row[key]`` in cells of a ``grid``×``grid`` normalised image, in exact integer
    arithmetic (``29 / 100 * 100`` is 28.999…, which floors one cell low).

    A prediction is taken from the answer's grid values (what the model wrote, parsed with the
    scoring rule) when the row has its answer; else, and for the ground truth, from the pixel box
    as an exact fraction of the image side. Cells are clipped to the image.
    """
    box = row.get(key)
    if box is None:
        return None
    width, height = int(row["width"]), int(row["height"])
    written = parse_box(row.get("answer")) if key == "pred_box" else None
    if written is not None:
        fractions = [Fraction(v, GRID) for v in written]
    else:
        # limit_denominator recovers g * side / 100 from its float (148.48 = 29 * 512 / 100)
        fractions = [Fraction(v).limit_denominator(10**6) / side for v, side in zip(box, (width, height, width, height))]
    return tuple(min(grid, max(0, math.floor(f * grid))) for f in fractions)  # type: ignore[return-value]


def box_heatmap(rows: Sequence[dict], key: str, grid: int = 100) -> np.ndarray:
    """How often each cell of a ``grid``×``grid`` normalised image is covered by a box.

    Args:
        rows: prediction rows (``gt_box``/``pred_box`` in pixels, ``width``, ``height``; the raw
            ``answer`` when present gives the predicted grid values exactly).
        key: ``gt_box`` or ``pred_box`` (rows without that box are skipped).
    Returns:
        (grid, grid) float array of coverage counts (row = y, column = x).
    """
    heat = np.zeros((grid, grid), dtype=float)
    for row in rows:
        cells = _grid_cells(row, key, grid)
        if cells is None:
            continue
        x1, y1, x2, y2 = cells
        heat[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] += 1  # at least one cell per box
    return heat


def box_heatmaps(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Ground-truth vs predicted box heatmaps over the normalised image (paper Fig 3), on one
    colour scale so that the two panels compare."""
    heats = {key: box_heatmap(rows, key) for key in ("gt_box", "pred_box")}
    top = max(1.0, *(float(h.max()) for h in heats.values()))
    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = []
    for i, (key, name) in enumerate((("gt_box", "ground truth"), ("pred_box", "prediction"))):
        ax = fig.add_subplot(1, 2, i + 1)
        shown = ax.imshow(heats[key], cmap="hot", extent=(0, 1, 1, 0), vmin=0, vmax=top)
        count = sum(r.get(key) is not None for r in rows)
        ax.set_title(f"{name} (n = {count})", fontsize=9)
        ax.set_xlabel("x / width")
        ax.set_ylabel("y / height")
        axes.append(ax)
    fig.colorbar(shown, ax=axes, fraction=0.046, label="boxes covering the cell")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def iou_histogram(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """IoU distribution per dataset (unparseable answers are included at 0 and counted in the legend)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0, 1, 21)
    for name in sorted({r["dataset"] for r in rows}):
        subset = [r for r in rows if r["dataset"] == name]
        unparsed = sum(not r["parsed"] for r in subset)
        ax.hist([r["iou"] for r in subset], bins=bins, histtype="step", linewidth=1.5,
                label=f"{name} (n = {len(subset)}, unparseable {unparsed})")
    ax.set_xlabel("IoU")
    ax.set_ylabel("slices")
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_figure(rows: Sequence[dict], path: str | os.PathLike, auc: Optional[float]) -> Optional[Path]:
    """ROC curve of P(yes); None when P(yes) is missing or only one class is present."""
    from sklearn.metrics import roc_curve

    if auc is None or any(r.get("p_yes") is None for r in rows):
        return None
    fpr, tpr, _ = roc_curve([r["gt_answer"] == "yes" for r in rows], [r["p_yes"] for r in rows])
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, color="tab:blue", label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (tumor)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def confusion_figure(confusion: dict, path: str | os.PathLike) -> Path:
    """The 2×3 confusion matrix (truth yes/no × answer yes/no/invalid) with counts."""
    counts = np.asarray(confusion["counts"])
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(counts, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", color="black" if value < counts.max() / 2 else "white")
    ax.set_xticks(range(len(confusion["columns"])), confusion["columns"])
    ax.set_yticks(range(len(confusion["rows"])), confusion["rows"])
    ax.set_xlabel("answer")
    ax.set_ylabel("truth")
    return _save(fig, path)
