"""Boxes drawn on slices: the demo's viewer and the scan's ``montage.png`` (issue 24: one module
draws, both use it)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

RED = (255, 0, 0)


CYAN = (0, 200, 255)


def annotate(
    image: np.ndarray,
    boxes: Sequence[tuple[Sequence[float], tuple[int, int, int]]] = (),
    scale: int = 1,
) -> Image.Image:
    """Draw pixel boxes on a slice.

    Args:
        image: (H, W) uint8 grayscale or (H, W, 3) uint8 RGB.
        boxes: ``(pixel_box, rgb_colour)`` pairs; a pixel box is ``(x1, y1, x2, y2)`` in pixels
            of ``image`` (continuous, as :func:`minigpt4.boxes.grid_to_pixel` returns it).
        scale: integer zoom (nearest neighbour) applied before drawing, so small slices are shown
            larger with thin lines; boxes are scaled with the image.

    Returns:
        An RGB PIL image of size (W·scale, H·scale) with each box outlined; the line is about
        0.5 % of the image side (at least 2 pixels) and is drawn inside the box's extent.
    """
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if scale != 1:
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(picture.size) / 200))
    for box, colour in boxes:
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        if x2 <= x1 or y2 <= y1:
            continue
        draw.rectangle([x1, y1, x2, y2], outline=tuple(colour), width=line)
    return picture


def display_scale(height: int, width: int, min_side: int = 384) -> int:
    """Integer zoom that shows a slice at least ``min_side`` pixels wide/high in the viewer."""
    return max(1, math.ceil(min_side / max(height, width)))
