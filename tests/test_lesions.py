"""Stage-3 boxes → 3-D lesion candidates → detection map (minigpt4.inference.lesions), checked
against hand-made boxes, scipy's own 26-connected labelling (the scorer's) and the readers'
orientation code for the way back to the stored voxel order."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from minigpt4.inference.lesions import (
    MIN_LIKELIHOOD,
    SliceBox,
    candidate_labels,
    detection_map,
    lesion_candidates,
    to_stored,
    tumor_boxes,
)
from minigpt4.inference.pipeline import SliceResult
from minigpt4.scan_outputs import geometry_from_affine
from preprocessing.volumes import to_display

SHAPE = (40, 48, 10)  # display (H rows, W columns, Z slices)


def _boxes():
    return [
        SliceBox(2, (10, 10, 14, 14), 0.3),
        SliceBox(3, (14, 14, 20, 20), 0.8),   # overlaps slice 2's box at pixel (14, 14): same lesion
        SliceBox(5, (10, 10, 14, 14), 0.5),   # slice 4 empty: a new lesion
        SliceBox(6, (15, 10, 18, 14), 0.4),   # touches slice 5's box (x 15 = 14 + 1): same lesion
        SliceBox(7, (20, 10, 22, 14), 0.9),   # gap of one column to slice 6's (x 19 empty): new lesion
    ]


def test_candidates_by_hand():
    cands = lesion_candidates(_boxes())
    assert [c.label for c in cands] == [1, 2, 3]
    assert [[b.slice_index for b in c.boxes] for c in cands] == [[2, 3], [5, 6], [7]]
    assert [c.likelihood for c in cands] == [0.8, 0.5, 0.9]  # the largest of each lesion's boxes
    assert [c.slices for c in cands] == [(2, 3), (5, 6), (7, 7)]


def test_detection_map_components_are_the_candidates():
    cands = lesion_candidates(_boxes())
    dmap = detection_map(cands, SHAPE)
    assert dmap.dtype == np.float32 and dmap.shape == SHAPE
    # hand-computed voxels
    assert dmap[10, 10, 2] == np.float32(0.8) and dmap[14, 14, 2] == np.float32(0.8) and dmap[15, 15, 2] == 0
    assert dmap[20, 20, 3] == np.float32(0.8) and dmap[13, 13, 3] == 0
    assert dmap[12, 18, 6] == np.float32(0.5) and dmap[12, 19, 7] == 0 and dmap[12, 20, 7] == np.float32(0.9)
    assert not dmap[:, :, [0, 1, 4, 8, 9]].any()
    assert int((dmap > 0).sum()) == 25 + 49 + 25 + 20 + 15
    # the scorer's view (picai_eval labels with a 3x3x3 structure): the same 3 lesions, each constant
    labelled, n = ndimage.label(dmap > 0, structure=np.ones((3, 3, 3)))
    assert n == 3
    for k in range(1, n + 1):
        assert len(np.unique(dmap[labelled == k])) == 1
    labels = candidate_labels(cands, SHAPE)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    assert np.array_equal(labels > 0, dmap > 0)


def test_diagonal_corner_touch_is_one_lesion_and_same_slice_boxes_join():
    cands = lesion_candidates([SliceBox(0, (0, 0, 1, 1), 0.2), SliceBox(1, (2, 2, 3, 3), 0.6),
                               SliceBox(4, (0, 0, 1, 1), 0.1), SliceBox(4, (3, 0, 4, 1), 0.7)])
    assert [len(c.boxes) for c in cands] == [2, 1, 1]  # corner (1,1)-(2,2): touching; x 2 empty: apart
    _, n = ndimage.label(detection_map(cands, (6, 6, 6)) > 0, structure=np.ones((3, 3, 3)))
    assert n == 3


def test_zero_likelihood_stays_visible_and_bad_values_refused():
    (cand,) = lesion_candidates([SliceBox(0, (1, 1, 2, 2), 0.0)])
    assert cand.likelihood == MIN_LIKELIHOOD > 0
    assert (detection_map([cand], (4, 4, 1)) > 0).sum() == 4
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="likelihood"):
            SliceBox(0, (1, 1, 2, 2), bad)
    with pytest.raises(ValueError, match="inclusive box"):
        SliceBox(0, (3, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="outside the stack"):
        candidate_labels(lesion_candidates([SliceBox(9, (1, 1, 2, 2), 0.5)]), (4, 4, 5))
    assert lesion_candidates([]) == []


def test_tumor_boxes_from_slice_results():
    # a 100x100 slice: grid box <10><20><30><40> → inclusive pixels of grid_to_pixel_inclusive
    from minigpt4.boxes import grid_to_pixel_inclusive

    rows = [SliceResult(0, "", p_tumor=0.2),
            SliceResult(1, "", pancreas_grid=(0, 0, 50, 50), p_tumor=0.7, tumor_answer="{<10><20><30><40>}",
                        tumor_box=(10.0, 20.0, 30.0, 40.0))]
    (box,) = tumor_boxes(rows, 100, 100)
    assert box == SliceBox(1, tuple(grid_to_pixel_inclusive((10, 20, 30, 40), 100, 100)), 0.7)


AFFINES = {
    "RAS": np.diag([0.8, 0.8, 2.5, 1.0]),
    "LPS": np.diag([-0.8, -0.8, 2.5, 1.0]),
    "LAI permuted": np.array([[0, -0.7, 0, 10], [0, 0, 0.7, -5], [-3.0, 0, 0, 40], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_to_stored_inverts_the_readers_orientation(name):
    affine = AFFINES[name]
    stored_shape = (7, 9, 5)
    stored = np.arange(np.prod(stored_shape), dtype=np.int32).reshape(stored_shape)
    geometry = geometry_from_affine(affine, stored_shape)
    display = np.asarray(to_display(stored, affine))
    back = to_stored(display, geometry.display_to_voxel, stored_shape)
    assert back.flags["C_CONTIGUOUS"] and np.array_equal(back, stored)
    # a lesion drawn on display slice k lands on the stored voxels geometry.voxel_of names
    h, w, z = geometry.display_shape
    cands = lesion_candidates([SliceBox(z - 1, (1, 2, 1, 2), 0.5)])
    dmap = to_stored(detection_map(cands, (h, w, z)), geometry.display_to_voxel, stored_shape)
    assert np.argwhere(dmap > 0).tolist() == [list(geometry.voxel_of(1, 2, z - 1))]
    with pytest.raises(ValueError, match="not the stored shape"):
        to_stored(display, geometry.display_to_voxel, (1, 2, 3))
