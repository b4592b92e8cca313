"""The box format (minigpt4/boxes.py): hand-computed conversions and IoUs, the release's parsing
rule on tricky answers, and property tests showing the answer parsers never crash and never clip
or reorder a box."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt4.boxes import (
    best_grid_answer,
    box_answer,
    box_iou,
    box_problem,
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


# The release's rule on tricky answers: gt grid box (10,20,30,40) on a 100x100 image, so pixels =
# grid values; expected (parsed box, IoU) worked out by hand.
GT = [10, 20, 30, 40]
RELEASE_CASES = [
    # reversed corners: parsed as written, area max(0,10-30)*... = 0 -> IoU 0 (the old parser: 1.0)
    ("{<30><40><10><20>}", (30, 40, 10, 20), 0.0),
    # two boxes: 8 digit runs -> bad answer (the old parser took the first: 1.0)
    ("{<10><20><30><40>} and {<0><0><100><100>}", None, 0.0),
    # prose around one box: exactly four digit runs -> the box
    ("The pancreas is at {<10><20><30><40>} in this slice.", (10, 20, 30, 40), 1.0),
    # prose with another number: five runs -> bad answer
    ("On slice 3 the box is {<10><20><30><40>}", None, 0.0),
    # decimals split into two runs: five runs -> bad answer (the old parser rounded)
    ("{<10.4><20><30><40>}", None, 0.0),
    # over 100 kept as written: (10,20,130,40) -> inter 20*20 = 400, union 120*20 = 2400
    ("{<10><20><130><40>}", (10, 20, 130, 40), 400 / 2400),
    # a minus sign is not a digit: <-10> reads 10
    ("{<-10><20><30><40>}", (10, 20, 30, 40), 1.0),
    # no braces or brackets needed: any four digit runs
    ("10 20 30 40", (10, 20, 30, 40), 1.0),
    # half the box: (10,20,20,40) -> 200 / 400
    ("{<10><20><20><40>}", (10, 20, 20, 40), 0.5),
    ("", None, 0.0),
    ("no box here", None, 0.0),
    ("<1><2><3>", None, 0.0),
    (None, None, 0.0),
]


@pytest.mark.parametrize("answer,box,iou", RELEASE_CASES)
def test_release_rule_on_tricky_answers(answer, box, iou):
    assert parse_box(answer) == box
    pred, score = score_answer(answer, GT, 100, 100)
    assert (pred is None) == (box is None)
    assert score == pytest.approx(iou)


def test_release_rule_rescales_as_written_on_a_non_square_image():
    # 200x50 image: reversed x of (40,10,20,90) -> pixels (80, 5, 40, 45): zero area, IoU 0
    assert score_answer("{<40><10><20><90>}", [40, 5, 80, 45], 200, 50) == ((80.0, 5.0, 40.0, 45.0), 0.0)


def test_release_rule_never_crashes_on_a_huge_number():
    assert parse_box("<" + "9" * 5000 + "><1><2><3>") is None  # longer than int() reads by default
    assert score_answer("<" + "9" * 400 + "><1><2><3>", GT, 100, 100) == (None, 0.0)


def test_box_problem_says_why_an_answer_scores_zero():
    assert box_problem("{<10><20><30><40>}") is None
    assert box_problem("{<30><40><10><20>}") == "its corners are reversed or equal (zero area), so it scores IoU 0"
    assert box_problem("{<1><2><3><4>} {<5><6><7><8>}") == "the scoring rule needs exactly four numbers, this answer has 8"
    assert box_problem("  ") == "the answer is empty"


def test_parse_yes_no():
    assert parse_yes_no("Yes.") == "yes"
    assert parse_yes_no("  no, there is none") == "no"
    assert parse_yes_no("NO") == "no"
    assert parse_yes_no("yes, yes") == "yes"
    # hedges between the classes are invalid, not yes
    for text in ("Not sure", "nope", "maybe", "", "The answer is yes", None, 3, "Yes/No", "yes no", "Yes or no"):
        assert parse_yes_no(text) is None, text


# --- properties ------------------------------------------------------------------------------

grid_value = st.integers(min_value=0, max_value=100)
number_text = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda v: f"{v:.3f}"),
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_box_never_crashes_and_returns_four_ints_as_written(text):
    box = parse_box(text)
    if box is not None:
        assert len(box) == 4 and all(isinstance(v, int) and v >= 0 for v in box)


@settings(max_examples=300, deadline=None)
@given(st.lists(number_text, min_size=4, max_size=4), st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=20))
def test_parse_box_reads_four_integers_as_written_and_refuses_decimals(values, prose):
    text = prose + "{" + "".join(f"<{v}>" for v in values) + "}"
    box = parse_box(text)
    if any("." in v for v in values):
        assert box is None  # a decimal is two digit runs
    else:
        assert box == tuple(abs(int(v)) for v in values)  # no clipping, no reordering


@settings(max_examples=200, deadline=None)
@given(grid_value, grid_value, grid_value, grid_value)
def test_format_then_parse_round_trips_any_box(a, b, c, d):
    assert parse_box(format_box((a, b, c, d))) == (a, b, c, d)


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


# --- the grid ceiling: the best IoU any 0-100 grid answer can score ----------------------------


def brute_force_best_grid_iou(gt, width, height):
    """Every grid box with positive area (5,050 x-intervals x 5,050 y-intervals), scored like
    box_iou: continuous areas, no +1, pixels = g * size / 100."""
    g1, g2 = np.triu_indices(101, k=1)
    x1, x2, y1, y2 = g1 * width / 100, g2 * width / 100, g1 * height / 100, g2 * height / 100
    ix = np.clip(np.minimum(x2, gt[2]) - np.maximum(x1, gt[0]), 0, None)
    iy = np.clip(np.minimum(y2, gt[3]) - np.maximum(y1, gt[1]), 0, None)
    gt_area, best = (gt[2] - gt[0]) * (gt[3] - gt[1]), 0.0
    for start in range(0, len(iy), 500):  # 500 y-intervals at a time against every x-interval
        inter = iy[start:start + 500, None] * ix[None, :]
        union = (y2 - y1)[start:start + 500, None] * (x2 - x1)[None, :] + gt_area - inter
        best = max(best, float((inter / union).max()))
    return best


@pytest.mark.parametrize("gt, size, answer, iou", [
    # 512-px slice: the ground truth's own answer {<25><50><74><99>} = (128,256,378.88,506.88) scores 0.968;
    # {<25><50><75><100>} = pixels (128,256,384,512): 255*255 / 256*256 = 0.992
    ([128, 256, 383, 511], (512, 512), "{<25><50><75><100>}", 65025 / 65536),
    # the paper's Fig. 2 tumor: its own answer scores 0.495; {<43><46><46><50>} = pixels
    # (220.16, 235.52, 235.52, 256): 15.36*17 / (15.36*20.48 + 17*17 - 15.36*17) = 0.762
    ([220, 238, 237, 255], (512, 512), "{<43><46><46><50>}", 261.12 / (314.5728 + 289 - 261.12)),
    # non-square image: {<10><10><30><49>} = (20,10,60,49): 39*39 / 40*39
    ([20, 10, 59, 49], (200, 100), "{<10><10><30><49>}", 1521 / 1560),
])
def test_best_grid_answer_is_the_grid_ceiling_checked_against_every_grid_box(gt, size, answer, iou):
    grid, best = best_grid_answer(gt, *size)
    assert best == pytest.approx(iou, abs=1e-12)
    assert format_box(grid) == answer and score_answer(answer, gt, *size)[1] == pytest.approx(iou, abs=1e-12)
    assert best == pytest.approx(brute_force_best_grid_iou(gt, *size), abs=1e-12)
    assert best > score_answer(box_answer(gt, *size), gt, *size)[1]  # the own answer is not the ceiling


@pytest.mark.parametrize("gt, size", [
    ([300, 100, 301, 180], (512, 512)),  # 1 px wide: thinner than a grid cell, IoU not separable
    ([10, 10, 12, 13], (512, 512)),      # smaller than a cell in both directions
    ([0, 0, 511, 511], (512, 512)),      # the whole slice
    ([37, 5, 90, 61], (97, 333)),        # cells of a fractional number of pixels
])
def test_best_grid_answer_matches_brute_force_on_hard_boxes(gt, size):
    grid, best = best_grid_answer(gt, *size)
    assert best == pytest.approx(brute_force_best_grid_iou(gt, *size), abs=1e-12)
    assert score_answer(format_box(grid), gt, *size)[1] == best


def test_best_grid_answer_of_a_zero_area_ground_truth_is_zero():
    assert best_grid_answer([5, 5, 5, 40], 100, 100) == (None, 0.0)
