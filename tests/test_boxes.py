"""The box format (minigpt4/boxes.py): hand-computed conversions and IoUs, and property tests
showing the answer parsers never crash, clip to the 0–100 grid and order corners."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt4.boxes import (
    box_answer,
    box_iou,
    format_box,
    grid_to_pixel,
    parse_box,
    parse_yes_no,
    pixel_to_grid,
    score_answer,
)

# --- hand-computed conversions ---------------------------------------------------------------


def test_pixel_to_grid_floors_each_coordinate_by_its_own_side():
    # 512x512: 128/512*100 = 25, 383/512*100 = 74.8 -> 74
    assert pixel_to_grid([128, 256, 383, 511], 512, 512) == (25, 50, 74, 99)
    # non-square: x by width 200, y by height 50
    assert pixel_to_grid([19, 19, 199, 49], 200, 50) == (9, 38, 99, 98)


def test_box_answer_is_the_training_text():
    assert box_answer([128, 256, 383, 511], 512, 512) == "{<25><50><74><99>}"
    assert format_box((0, 0, 0, 0)) == "{<0><0><0><0>}"


def test_grid_to_pixel_rescales_by_width_and_height_not_512():
    # the release multiplied by 5.12 whatever the image size (SPEC §8)
    assert grid_to_pixel((10, 20, 50, 100), 300, 200) == (30.0, 40.0, 150.0, 200.0)


def test_box_iou_hand_computed_without_plus_one():
    # inter 25x25 = 625, union 2500 + 2500 - 625 = 4375
    assert box_iou((0, 0, 50, 50), (25, 25, 75, 75)) == pytest.approx(625 / 4375)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges: no overlap
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty union


def test_score_answer_hand_computed():
    # 200x100 image: grid (10,10,30,50) -> pixels (20,10,60,50); gt 39x39 inside it
    pred, iou = score_answer("{<10><10><30><50>}", [20, 10, 59, 49], 200, 100)
    assert pred == (20.0, 10.0, 60.0, 50.0)
    assert iou == pytest.approx(39 * 39 / (40 * 40))
    assert score_answer("no box here", [0, 0, 5, 5], 10, 10) == (None, 0.0)


def test_parse_box_tolerance_clipping_and_order():
    assert parse_box("{<80><20><10><90>}") == (10, 20, 80, 90)
    assert parse_box("<150><-5><20><30>") == (20, 0, 100, 30)
    assert parse_box("{< 12.6 >, <3><4><5>}") == (4, 3, 13, 5)
    assert parse_box("first {<1><2><3><4>} then {<5><6><7><8>}") == (1, 2, 3, 4)
    assert parse_box("<1><2><3>") is None
    assert parse_box(None) is None
    # a literal too large for a float is clipped, not dropped (was None before the fix)
    assert parse_box("<" + "9" * 400 + "><1><2><3>") == (2, 1, 100, 3)


def test_parse_yes_no():
    assert parse_yes_no("Yes.") == "yes"
    assert parse_yes_no("  no, there is none") == "no"
    assert parse_yes_no("NO") == "no"
    for text in ("Not sure", "nope", "maybe", "", "The answer is yes", None, 3):
        assert parse_yes_no(text) is None, text


# --- properties ------------------------------------------------------------------------------

grid_value = st.integers(min_value=0, max_value=100)
number_text = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda v: f"{v:.3f}"),
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_box_never_crashes_and_returns_a_valid_grid_box(text):
    box = parse_box(text)
    if box is not None:
        assert len(box) == 4 and all(isinstance(v, int) and 0 <= v <= 100 for v in box)
        assert box[0] <= box[2] and box[1] <= box[3]


@settings(max_examples=300, deadline=None)
@given(st.lists(number_text, min_size=4, max_size=4), st.text(max_size=20), st.text(max_size=20))
def test_parse_box_clips_and_orders_any_four_numbers(values, prefix, suffix):
    text = prefix.replace("<", "") + "{" + "".join(f"<{v}>" for v in values) + "}" + suffix
    box = parse_box(text)
    assert box is not None
    clipped = [round(min(100.0, max(0.0, float(v)))) for v in values]
    assert box == (min(clipped[0], clipped[2]), min(clipped[1], clipped[3]), max(clipped[0], clipped[2]), max(clipped[1], clipped[3]))


@settings(max_examples=200, deadline=None)
@given(grid_value, grid_value, grid_value, grid_value)
def test_format_then_parse_round_trips_ordered_boxes(a, b, c, d):
    box = (min(a, c), min(b, d), max(a, c), max(b, d))
    assert parse_box(format_box(box)) == box


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_yes_no_never_crashes(text):
    assert parse_yes_no(text) in (None, "yes", "no")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 1024),
    st.integers(1, 1024),
    st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_pixel_box_grid_round_trip_stays_inside_the_image(width, height, fractions):
    x1, x2 = sorted(int(f * (width - 1)) for f in fractions[:2])
    y1, y2 = sorted(int(f * (height - 1)) for f in fractions[2:])
    grid = pixel_to_grid([x1, y1, x2, y2], width, height)
    assert all(0 <= v <= 99 for v in grid)  # inclusive indices < side -> grid < 100
    px = grid_to_pixel(grid, width, height)
    # flooring moves each corner down by less than one grid cell
    assert 0 <= x1 - px[0] < width / 100 + 1e-9 and 0 <= y2 - px[3] < height / 100 + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 500, allow_nan=False), min_size=4, max_size=4),
    st.lists(st.floats(0, 500, allow_nan=False), min_size=4, max_size=4),
)
def test_box_iou_is_symmetric_and_in_unit_interval(a, b):
    a = (min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3]))
    b = (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
    iou = box_iou(a, b)
    assert 0.0 <= iou <= 1.0 and not math.isnan(iou)
    assert iou == pytest.approx(box_iou(b, a))
