"""scan.py's output files, read back with independent readers (nibabel, pydicom, highdicom,
csv, strict json): boxes land on the right voxels, SEG frames on the right source images,
report coordinates equal hand-computed ones; the "already done" check and sharding."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from minigpt4.distributed import rank_and_world_size, shard
from minigpt4.scan_outputs import (
    BOXES_FILE,
    DONE_FILE,
    MONTAGE_FILE,
    REPORT_FILE,
    SEG_FILE,
    SUMMARY_COLUMNS,
    CheckpointIdentity,
    build_report,
    checkpoint_identities,
    collect_summary,
    fingerprint,
    geometry_from_affine,
    geometry_from_image,
    geometry_from_volume,
    is_done,
    read_dicom_source,
    write_box_nifti,
    write_dicom_seg,
    write_montage,
    write_scan_json,
    write_summary,
    write_volume_error,
    write_volume_outputs,
)
from minigpt4.scan_outputs.html import REPORT_HTML
from minigpt4.boxes import format_box, grid_to_pixel, grid_to_pixel_inclusive, pixel_to_grid
from minigpt4.inference.calibration import CalibrationMap
from minigpt4.inference.pipeline import PatientResult, SliceResult, VolumeResult
from preprocessing import synthetic
from preprocessing.volumes import to_display
from tests._phantoms import SHARED_DATA, small_volume

CHECKPOINTS = [CheckpointIdentity("pancreas_detection", "ckpt/stage1", "a" * 64),
               CheckpointIdentity("tumor_classification", "ckpt/stage2", "b" * 64)]
TUMOR = PatientResult(score=0.8, aggregation="max", top_k=3, threshold=0.5, decision="tumor", n_slices_boxed=1)
SPACING = (0.8, 0.7, 2.5)  # rows, columns, slices (mm)


def patient(decision: str, score: float, aggregation: str = "max", boxed: int = 1) -> PatientResult:
    return PatientResult(score=score, aggregation=aggregation, top_k=3, threshold=0.5, decision=decision,
                         n_slices_boxed=boxed)


def results_on(width: int, height: int):
    """A maker of the pipeline's slice results on (height, width) slices whose inclusive pixel
    boxes (``SliceResult.inclusive_boxes``) are the boxes given: the answers are their grid boxes,
    as the model would give them."""
    def make(index: int, p_tumor=None, pancreas_box=None, tumor_box=None) -> SliceResult:
        row = SliceResult(index, "{<0><0><0><0>}", p_tumor=p_tumor)
        if pancreas_box is not None:
            row.pancreas_grid = pixel_to_grid(pancreas_box, width, height)
            row.pancreas_answer = format_box(row.pancreas_grid)
            row.pancreas_box = grid_to_pixel(row.pancreas_grid, width, height)
            row.crop_box = tuple(pancreas_box)  # the crop stage 2 saw (margin 0)
        if tumor_box is not None:
            grid = pixel_to_grid(tumor_box, width, height)
            row.tumor_asked, row.tumor_answer, row.tumor_box = True, format_box(grid), grid_to_pixel(grid, width, height)
        wanted = tuple(None if b is None else tuple(b) for b in (pancreas_box, tumor_box))
        assert row.inclusive_boxes(width, height) == wanted, "a box the grid cannot express"
        return row

    return make


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


def display_voxels(label: np.ndarray, affine: np.ndarray, display_affine: np.ndarray) -> np.ndarray:
    """(N, 3) display indices (row, col, slice) of a stored label's non-zero voxels, through the
    affines only: RAS = affine @ ijk, display = display_affine⁻¹ @ RAS."""
    ijk = np.argwhere(label > 0)
    ras = affine @ np.c_[ijk, np.ones(len(ijk))].T
    display = np.linalg.solve(display_affine, ras)[:3].T
    assert np.allclose(display, np.rint(display), atol=1e-6)
    return np.rint(display).astype(int)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("orient", ["RAS", "LPS", "PSL", "IAL"])
def test_geometry_maps_display_pixels_to_the_voxels_the_reader_shows(orient):
    """Every display voxel (as preprocessing.volumes.to_display orients the array) is the stored
    voxel geometry.voxel_of names, in four storage orientations (two permuted)."""
    rng = np.random.default_rng(1)
    display = rng.integers(0, 10_000, size=(6, 7, 4))
    stored, affine = synthetic.stored(display, SPACING, orient)
    geometry = geometry_from_affine(affine, stored.shape)
    shown = to_display(stored, affine)
    assert geometry.display_shape == shown.shape == (6, 7, 4)
    for row, col, k in np.ndindex(shown.shape):
        assert shown[row, col, k] == stored[geometry.voxel_of(col, row, k)]


def test_geometry_from_image_and_volume_agree_with_the_affine(tmp_path):
    from preprocessing.volumes import load_nifti

    hu, _ = small_volume(h=6, w=7, s=4)
    stored, affine = synthetic.stored(hu, SPACING, "LPS")
    path = tmp_path / "ct.nii.gz"
    synthetic.write_nifti(path, stored, affine)
    by_image = geometry_from_image(nib.load(str(path)))
    by_volume = geometry_from_volume(load_nifti(path))
    assert by_image.shape == by_volume.shape == stored.shape
    assert np.allclose(by_image.affine, affine) and np.allclose(by_volume.affine, affine)
    assert np.array_equal(by_image.display_to_voxel, by_volume.display_to_voxel)


# ----------------------------------------------------------------------------- boxes.nii.gz


@pytest.mark.parametrize("orient", ["RAS", "LPS", "SAR"])
def test_boxes_nifti_maps_back_to_the_pixel_box_through_the_affine(tmp_path, orient):
    """A phantom built in the display frame is stored in ``orient``; boxes written to
    boxes.nii.gz are read back with nibabel and mapped through the file's affine and the
    phantom's own display affine (not the module's orientation code) to the same pixel boxes."""
    hu, _ = small_volume(h=12, w=14, s=5)
    stored, affine = synthetic.stored(hu, SPACING, orient)
    ct = tmp_path / "ct.nii.gz"
    synthetic.write_nifti(ct, stored, affine)
    geometry = geometry_from_image(nib.load(str(ct)))
    SliceResult = results_on(14, 12)
    results = [SliceResult(1, 0.3, pancreas_box=(2, 3, 9, 7)),
               SliceResult(3, 0.9, pancreas_box=(1, 1, 12, 10), tumor_box=(4, 5, 6, 8)),
               SliceResult(4, None)]
    write_box_nifti(tmp_path / BOXES_FILE, geometry, results)

    boxes = nib.load(str(tmp_path / BOXES_FILE))
    source = nib.load(str(ct))
    assert boxes.shape == source.shape and np.allclose(boxes.affine, source.affine)
    assert boxes.get_data_dtype() == np.uint8
    label = np.asarray(boxes.dataobj)
    assert set(np.unique(label)) == {0, 1, 2}
    display_affine = synthetic.display_affine(hu.shape, SPACING)
    found = {}
    for value in (1, 2):
        for row, col, k in display_voxels(label == value, boxes.affine, display_affine):
            found.setdefault((value, k), []).append((col, row))
    def bbox(points):
        xs, ys = zip(*points, strict=True)
        return (min(xs), min(ys), max(xs), max(ys))
    assert sorted(found) == [(1, 1), (1, 3), (2, 3)]
    assert bbox(found[(1, 1)]) == (2, 3, 9, 7) and len(found[(1, 1)]) == 8 * 5
    assert bbox(found[(2, 3)]) == (4, 5, 6, 8) and len(found[(2, 3)]) == 3 * 4
    # tumor wins inside the pancreas box: label 1 there is the pancreas box minus the tumor box
    assert bbox(found[(1, 3)]) == (1, 1, 12, 10) and len(found[(1, 3)]) == 12 * 10 - 3 * 4


def test_slice_outside_the_stack_is_refused(tmp_path):
    geometry = geometry_from_affine(np.eye(4), (10, 8, 3))  # display: 8 rows x 10 columns x 3 slices
    with pytest.raises(ValueError, match=r"slice 3: outside the stack of 3 slices"):
        write_box_nifti(tmp_path / BOXES_FILE, geometry, [results_on(10, 8)(3, 0.5, (0, 0, 9, 5))])
    assert not (tmp_path / BOXES_FILE).exists()


def test_pipeline_boxes_become_the_inclusive_pixels_of_the_grid_answer():
    """A 512-pixel slice: the answer {<39><48><58><62>} marks pixels 200..302 x 246..322 (the
    crop's box, grid_to_pixel_inclusive), not the continuous box 199.68..296.96 x 245.76..317.44."""
    row = SliceResult(0, "{<39><48><58><62>}", pancreas_grid=(39, 48, 58, 62),
                      pancreas_box=grid_to_pixel((39, 48, 58, 62), 512, 512), p_tumor=0.9, tumor_asked=True,
                      tumor_answer="{<50><50><51><52>}", tumor_box=grid_to_pixel((50, 50, 51, 52), 512, 512))
    assert row.inclusive_boxes(512, 512) == ((200, 246, 302, 322), (256, 256, 266, 271))  # last pixel of cell 51: ceil(52 * 5.12) - 1
    row.tumor_answer, row.tumor_box = "{<0><0><0><0>}", None  # "absent": no box
    assert row.inclusive_boxes(512, 512) == ((200, 246, 302, 322), None)


# ----------------------------------------------------------------------------- report.json


def test_report_coordinates_hand_computed():
    """LPS-stored volume (i → patient's left, j → posterior, k → superior): the display frame is
    the stored frame transposed (row = j, col = i); RAS = affine @ [i, j, k, 1] by hand."""
    affine = np.array([[-2.0, 0, 0, 100.0], [0, -2.0, 0, 50.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
    geometry = geometry_from_affine(affine, (10, 8, 4))
    assert geometry.display_shape == (8, 10, 4)
    SliceResult = results_on(10, 8)
    report = build_report("case", "case.nii.gz", geometry, TUMOR,
                          [SliceResult(1, 0.8, pancreas_box=(2, 3, 5, 6))], CHECKPOINTS)
    box = report["slices"][0]["pancreas_box"]
    assert box["pixels"] == [2, 3, 5, 6]
    assert box["voxel_min"] == [2, 3, 1] and box["voxel_max"] == [5, 6, 1]
    assert box["corners"][0] == {"pixel": [2, 3], "voxel": [2, 3, 1], "ras": [96.0, 44.0, -17.0]}
    assert box["corners"][2] == {"pixel": [5, 6], "voxel": [5, 6, 1], "ras": [90.0, 38.0, -17.0]}

    # RAS-stored (i → right, j → anterior): columns and rows are flipped. Shape (10, 8, 4):
    # pixel x=2 → i = 9 - 2 = 7; y=3 → j = 7 - 3 = 4; RAS = (1.5·7 - 30, 1.5·4 + 10, 2·2 + 5)
    affine = np.array([[1.5, 0, 0, -30.0], [0, 1.5, 0, 10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    report = build_report("case", "case.nii.gz", geometry_from_affine(affine, (10, 8, 4)), TUMOR,
                          [SliceResult(2, 0.8, pancreas_box=(2, 3, 5, 6))], CHECKPOINTS)
    box = report["slices"][0]["pancreas_box"]
    assert box["corners"][0] == {"pixel": [2, 3], "voxel": [7, 4, 2], "ras": [-19.5, 16.0, 9.0]}
    assert box["corners"][2] == {"pixel": [5, 6], "voxel": [4, 1, 2], "ras": [-24.0, 11.5, 9.0]}
    assert box["voxel_min"] == [4, 1, 2] and box["voxel_max"] == [7, 4, 2]


def test_report_json_is_strict_and_complete(tmp_path):
    geometry = geometry_from_affine(np.diag([0.7, 0.8, 2.5, 1.0]), (14, 12, 5))
    SliceResult = results_on(14, 12)
    results = [SliceResult(4, 0.25), SliceResult(0, None), SliceResult(2, 0.75, (1, 1, 5, 5), (2, 2, 3, 3))]
    written = write_volume_outputs(tmp_path / "case", volume="case", source="in/case.nii.gz", geometry=geometry,
                                   result=VolumeResult(results, patient("tumor", 0.75)),
                                   checkpoints=CHECKPOINTS, fingerprint="f" * 64)
    assert written == [REPORT_FILE, BOXES_FILE, REPORT_HTML]
    report = strict_json(tmp_path / "case" / REPORT_FILE)
    assert report["patient"] == {"decision": "tumor", "score": 0.75, "threshold": 0.5, "aggregation": "max",
                                 "top_k": None, "n_slices_boxed": 1,
                                 "likelihood": {"raw": 0.75, "calibrated": None, "calibration": None}}
    assert report["fitness"] is None and report["outside_validated_range"] is None  # not given: not recorded
    assert [s["slice"] for s in report["slices"]] == [0, 2, 4]
    assert [s["p_tumor"] for s in report["slices"]] == [None, 0.75, 0.25]
    assert report["most_suspicious_slice"] == 2
    assert report["counts"] == {"n_slices": 5, "n_results": 3, "n_classified": 2, "n_boxed": 1}
    assert report["checkpoints"] == [c.as_dict() for c in CHECKPOINTS]
    assert report["slices"][1]["tumor_box"]["pixels"] == [2, 2, 3, 3]
    assert report["slices"][1]["pancreas_answer"] == "{<7><8><35><41>}"  # the model's own answer (1·100/14, 1·100/12, ...), kept
    assert [s["classified_on"] for s in report["slices"]] == ["no pancreas box", "pancreas crop", "whole slice"]


def test_report_refuses_nan_and_unfounded_decisions():
    geometry = geometry_from_affine(np.eye(4), (10, 8, 3))
    SliceResult = results_on(10, 8)
    with pytest.raises(ValueError, match="slice 0: p_tumor must be finite"):
        build_report("v", "v", geometry, TUMOR, [SliceResult(0, float("nan"))], CHECKPOINTS)
    with pytest.raises(ValueError, match="did not look"):
        build_report("v", "v", geometry, patient("no tumor", 0.0), [SliceResult(0, 0.2)], CHECKPOINTS)
    with pytest.raises(ValueError, match="decision 'maybe'"):
        build_report("v", "v", geometry, patient("maybe", 0.1), [SliceResult(0, 0.1, (0, 0, 3, 3))], CHECKPOINTS)
    inconclusive = build_report("v", "v", geometry, patient("inconclusive", 0.0, boxed=0),
                                [SliceResult(0, None)], CHECKPOINTS)
    assert inconclusive["patient"]["decision"] == "inconclusive" and inconclusive["most_suspicious_slice"] is None
    assert inconclusive["patient"]["score"] is None  # no score where the model did not look
    single = build_report("v", "v", geometry, None, [SliceResult(0, 0.3)], CHECKPOINTS)  # one checkpoint
    assert single["patient"] is None and single["slices"][0]["p_tumor"] == 0.3


# ----------------------------------------------------------------------------- DICOM SEG


def write_ct_series(folder: Path, hu: np.ndarray, spacing=SPACING, row_direction=(1.0, 0.0, 0.0)) -> list[str]:
    """A tiny CT series written here (display-frame (rows, cols, slices) HU, slice 0 inferior),
    files named in shuffled order; ``row_direction`` (-1, 0, 0) stores columns right ← left.
    Returns the SOPInstanceUIDs of display slices 0, 1, ..."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    h, w, s = hu.shape
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k in np.random.default_rng(0).permutation(s):
        pixels = hu[:, :, k] if row_direction[0] > 0 else hu[:, ::-1, k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "T1", "Test^Patient", "CT", int(k) + 1
        ds.ImageOrientationPatient = [*row_direction, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0 * row_direction[0], -80.0, -40.0 + spacing[2] * int(k)]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16)).tobytes()
        ds.save_as(str(folder / f"{ds.SOPInstanceUID[-6:]}.dcm"), enforce_file_format=True)
        uids.append((int(k), ds.SOPInstanceUID))
    return [uid for _, uid in sorted(uids)]


def read_seg_frames(path: Path) -> list[tuple[str, list[float], int, tuple]]:
    """(source SOPInstanceUID, ImagePositionPatient, segment, mask bbox (x1, y1, x2, y2)) per frame, by pydicom."""
    import pydicom

    seg = pydicom.dcmread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    masks = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    frames = []
    for mask, item in zip(masks, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ys, xs = np.nonzero(mask)
        frames.append((str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
                       [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                       int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
                       (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    return sorted(frames, key=lambda f: (f[1][2], f[2]))


@pytest.mark.parametrize("row_direction", [(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)])
def test_dicom_seg_frames_reference_their_source_images(tmp_path, row_direction):
    import highdicom as hd
    import pydicom

    hu, _ = small_volume(h=12, w=14, s=5)
    (tmp_path / "ct").mkdir()
    uids = write_ct_series(tmp_path / "ct", hu, row_direction=row_direction)
    geometry, headers = read_dicom_source(tmp_path / "ct")
    assert geometry.display_shape == (12, 14, 5)
    SliceResult = results_on(14, 12)
    results = [SliceResult(0, None), SliceResult(1, 0.2, pancreas_box=(2, 3, 9, 7)),
               SliceResult(3, 0.9, pancreas_box=(1, 1, 12, 10), tumor_box=(4, 5, 6, 8))]
    path = write_dicom_seg(tmp_path / SEG_FILE, geometry, results, headers, CHECKPOINTS, "0.1.0")

    frames = read_seg_frames(path)  # sorted by z, then segment
    x0 = -100.0 * row_direction[0]
    if row_direction[0] > 0:
        # standard axial: the display frame is the DICOM pixel grid, slices inferior → superior
        assert frames == [
            (uids[1], [x0, -80.0, -37.5], 1, (2, 3, 9, 7)),
            (uids[3], [x0, -80.0, -32.5], 1, (1, 1, 12, 10)),
            (uids[3], [x0, -80.0, -32.5], 2, (4, 5, 6, 8)),
        ]
    else:
        # rows point to the patient's right: display column x is DICOM column 13 - x, and the
        # slice normal (row × column) points inferior, so the reader stacks slices superior →
        # inferior: display slice 1 is the written slice 3 (z = -32.5) and 3 is slice 1
        assert frames == [
            (uids[1], [x0, -80.0, -37.5], 1, (13 - 12, 1, 13 - 1, 10)),
            (uids[1], [x0, -80.0, -37.5], 2, (13 - 6, 5, 13 - 4, 8)),
            (uids[3], [x0, -80.0, -32.5], 1, (13 - 9, 3, 13 - 2, 7)),
        ]
    # each referenced file's own header has the frame's ImagePositionPatient
    by_uid = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, (tmp_path / "ct").iterdir())}
    for uid, position, _, _ in frames:
        assert [float(v) for v in by_uid[uid].ImagePositionPatient] == position
    # highdicom reads it back: the two segments and the three referenced instances
    seg = hd.seg.segread(str(path))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["pancreas box", "tumor box"]
    assert sorted(uid for _, _, uid in seg.get_source_image_uids()) == sorted({uids[1], uids[3]})


@pytest.mark.parametrize("row_direction", [(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)])
def test_dicom_seg_marks_the_pixels_the_model_saw_in_the_box(tmp_path, row_direction):
    """A bright rectangle in one file of the series, found in the slices the reader gives the
    model (read_dicom_series + to_display); its pixel box written as a SEG marks exactly the
    bright pixels of the file the frame references."""
    import pydicom

    from preprocessing.volumes import read_dicom_series

    hu, _ = small_volume(h=12, w=14, s=5)
    hu[2:7, 3:9, 1] = 2000  # rows 2..6, columns 3..8 of written slice 1
    (tmp_path / "ct").mkdir()
    write_ct_series(tmp_path / "ct", hu, row_direction=row_direction)
    volume = read_dicom_series(tmp_path / "ct")
    rows, cols, ks = np.nonzero(to_display(volume.array, volume.affine) == 2000)
    assert len(set(ks)) == 1
    box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
    geometry, headers = read_dicom_source(tmp_path / "ct")
    SliceResult = results_on(14, 12)
    write_dicom_seg(tmp_path / SEG_FILE, geometry, [SliceResult(int(ks[0]), 0.5, box)], headers, CHECKPOINTS)
    seg = pydicom.dcmread(str(tmp_path / SEG_FILE))
    assert int(seg.NumberOfFrames) == 1
    uid = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    source, = [ds for ds in map(pydicom.dcmread, (tmp_path / "ct").iterdir()) if ds.SOPInstanceUID == uid]
    assert np.array_equal(seg.pixel_array.astype(bool), source.pixel_array == 2000)

    # boxes.nii.gz over the same series: its voxels sit where the DICOM header puts the bright
    # pixels (position + column/row steps along ImageOrientationPatient, LPS), not via the reader
    write_box_nifti(tmp_path / BOXES_FILE, geometry, [SliceResult(int(ks[0]), 0.5, box)])
    boxes = nib.load(str(tmp_path / BOXES_FILE))
    ijk = np.argwhere(np.asarray(boxes.dataobj) == 1)
    ras = (boxes.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    rows_, cols_ = np.nonzero(source.pixel_array == 2000)
    iop = np.array([float(v) for v in source.ImageOrientationPatient])
    dy, dx = (float(v) for v in source.PixelSpacing)
    lps = (np.array([float(v) for v in source.ImagePositionPatient])
           + np.outer(cols_ * dx, iop[:3]) + np.outer(rows_ * dy, iop[3:]))
    def as_set(points):
        return sorted(map(tuple, np.round(points, 3)))

    assert len(ijk) == 5 * 6 and as_set(ras * [-1, -1, 1]) == as_set(lps)


def test_dicom_seg_written_for_the_projects_synthetic_series(tmp_path):
    """The series preprocessing.synthetic writes (files numbered from the top, no study date)
    gets a SEG too, and its boxes land in the same voxels as boxes.nii.gz."""
    import pydicom

    hu, _ = small_volume(h=12, w=14, s=4)
    synthetic.write_dicom_series(tmp_path / "nih", hu, SPACING, "PANCREAS_0001", 0)
    geometry, headers = read_dicom_source(tmp_path / "nih")
    results = [results_on(14, 12)(2, 0.6, pancreas_box=(0, 0, 3, 2))]
    write_dicom_seg(tmp_path / SEG_FILE, geometry, results, headers, CHECKPOINTS)
    write_box_nifti(tmp_path / BOXES_FILE, geometry, results)
    (uid, position, segment, bbox), = read_seg_frames(tmp_path / SEG_FILE)
    assert uid == headers[2].SOPInstanceUID and segment == 1 and bbox == (0, 0, 3, 2)
    assert position == [float(v) for v in headers[2].ImagePositionPatient]
    label = np.asarray(nib.load(str(tmp_path / BOXES_FILE)).dataobj)  # stored [column, row, slice]
    seg = pydicom.dcmread(str(tmp_path / SEG_FILE))
    assert np.array_equal(label[:, :, 2].T == 1, seg.pixel_array.astype(bool))


def test_dicom_seg_refuses_headers_of_another_order(tmp_path):
    hu, _ = small_volume(h=12, w=14, s=4)
    (tmp_path / "ct").mkdir()
    write_ct_series(tmp_path / "ct", hu)
    geometry, headers = read_dicom_source(tmp_path / "ct")
    SliceResult = results_on(14, 12)
    with pytest.raises(ValueError, match="not at stored slice 1"):
        write_dicom_seg(tmp_path / SEG_FILE, geometry, [SliceResult(1, 0.5, (0, 0, 2, 2))], headers[::-1], CHECKPOINTS)
    assert write_dicom_seg(tmp_path / SEG_FILE, geometry, [SliceResult(1, 0.5)], headers, CHECKPOINTS) is None
    assert not (tmp_path / SEG_FILE).exists()


@pytest.mark.skipif(not (SHARED_DATA / "ct" / "totalseg_dicom" / "dicom").is_dir(),
                    reason="../shared/data/ct/totalseg_dicom not present (real DICOM series)")
def test_dicom_seg_on_the_real_series(tmp_path):
    import highdicom as hd

    folder = SHARED_DATA / "ct" / "totalseg_dicom" / "dicom"
    geometry, headers = read_dicom_source(folder)
    assert geometry.display_shape == (512, 512, 20)
    SliceResult = results_on(512, 512)
    a, b, c = (grid_to_pixel_inclusive(g, 512, 512) for g in ((39, 48, 58, 62), (41, 47, 60, 64), (49, 53, 52, 56)))
    results = [SliceResult(5, 0.4, pancreas_box=a), SliceResult(12, 0.7, pancreas_box=b, tumor_box=c)]
    write_dicom_seg(tmp_path / SEG_FILE, geometry, results, headers, CHECKPOINTS)
    frames = read_seg_frames(tmp_path / SEG_FILE)
    expected = [(headers[5], 1, a), (headers[12], 1, b), (headers[12], 2, c)]
    # this anonymised series has empty SOPInstanceUIDs in its data sets: the file meta holds them
    assert all(h.SOPInstanceUID == "" for h in headers)
    assert [(uid, segment, bbox) for uid, _, segment, bbox in frames] == [
        (h.file_meta.MediaStorageSOPInstanceUID, segment, bbox) for h, segment, bbox in expected]
    assert [position for _, position, _, _ in frames] == [
        [float(v) for v in h.ImagePositionPatient] for h, _, _ in expected]
    seg = hd.seg.segread(str(tmp_path / SEG_FILE))
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID


# ----------------------------------------------------------------------------- montage.png


def test_montage_shows_the_most_suspicious_slices_with_their_boxes(tmp_path):
    slices = np.full((5, 40, 50), 60, dtype=np.uint8)
    SliceResult = results_on(50, 40)
    results = [SliceResult(0, 0.1), SliceResult(1, 0.9, (5, 6, 20, 30), (10, 12, 14, 18)),
               SliceResult(2, None, None), SliceResult(3, 0.5, (30, 5, 45, 25)), SliceResult(4, 0.9)]
    path = write_montage(tmp_path / MONTAGE_FILE, slices, results, n=3, columns=2, min_side=100)
    image = np.asarray(Image.open(path).convert("RGB"))
    scale, tile_w, tile_h = 2, 100, 80 + 20  # 40x50 slices zoomed x2 plus a 20-pixel caption
    assert image.shape == (2 * tile_h, 2 * tile_w, 3)
    # order: slice 1 (0.9), slice 4 (0.9, later on the tie), slice 3 (0.5)
    first = image[:tile_h, :tile_w]
    assert tuple(first[6 * scale, 5 * scale]) == (0, 200, 255)            # pancreas box corner, cyan
    assert tuple(first[12 * scale, 10 * scale]) == (255, 0, 0)            # tumor box corner, red
    assert tuple(first[2 * scale, 2 * scale]) == (60, 60, 60)             # outside the boxes: the slice
    second = image[:tile_h, tile_w:]
    assert not np.any((second[:80] != 60).any(axis=-1))                  # slice 4: no box drawn
    third = image[tile_h:, :tile_w]
    assert tuple(third[5 * scale, 30 * scale]) == (0, 200, 255)
    assert write_montage(tmp_path / "none.png", slices, [SliceResult(0, None)]) is None


# ----------------------------------------------------------------------------- summary, scan.json


def test_summary_and_scan_json_parse_strictly(tmp_path):
    geometry = geometry_from_affine(np.eye(4), (10, 8, 3))
    SliceResult = results_on(10, 8)
    write_volume_outputs(tmp_path / "b_case", volume="b_case", source="b.nii.gz", geometry=geometry,
                         result=VolumeResult([SliceResult(0, 0.125, (1, 1, 4, 4)), SliceResult(1, 0.0625)],
                                             patient("no tumor", 0.125, "top_k_mean")),
                         checkpoints=CHECKPOINTS, fingerprint="1" * 64,
                         fitness=[{"check": "hu_sanity", "status": "failed", "values": {}, "reason": "r"},
                                  {"check": "modality", "status": "unknown", "values": {}, "reason": "r"},
                                  {"check": "z_coverage", "status": "failed", "values": {}, "reason": "r"}],
                         calibration=CalibrationMap("isotonic", {"x": [0.0, 0.25], "y": [0.0, 0.5]}))
    write_volume_outputs(tmp_path / "c_case", volume="c_case", source="c.nii.gz", geometry=geometry,
                         result=VolumeResult([SliceResult(k, None) for k in range(3)], patient("inconclusive", 0.0, boxed=0)),
                         checkpoints=CHECKPOINTS, fingerprint="2" * 64,
                         fitness=[{"check": "modality", "status": "passed", "values": {}, "reason": "r"}],
                         calibration=CalibrationMap("platt", {"a": 1.0, "b": 0.0}))
    write_volume_error(tmp_path / "a_case", "a_case", 'a_case.nii.gz: corrupt, "truncated"\nfile')
    rows = collect_summary(tmp_path, ["c_case", "a_case", "b_case", "d_missing"])
    write_summary(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, strict=True)
        table = list(reader)
    assert table[0] == list(SUMMARY_COLUMNS)
    assert table[1:] == [
        ["a_case", "", "", "", "", "", "", "", "", 'a_case.nii.gz: corrupt, "truncated"\nfile'],
        ["b_case", "no tumor", "0.125", "0.25", "true", "hu_sanity;z_coverage", "3", "1", "0", ""],
        ["c_case", "inconclusive", "", "", "false", "", "3", "0", "", ""],
        ["d_missing", "", "", "", "", "", "", "", "", f"no complete output in {tmp_path / 'd_missing'}"],
    ]
    write_scan_json(tmp_path / "scan.json", {"threshold": 0.5, "aggregation": "max"}, CHECKPOINTS, rows)
    scan = strict_json(tmp_path / "scan.json")
    assert scan["counts"] == {"volumes": 4, "failed": 2, "decisions": {"inconclusive": 1, "no tumor": 1}}
    assert scan["config"] == {"threshold": 0.5, "aggregation": "max"}
    assert scan["checkpoints"][0] == {"stage": "pancreas_detection", "path": "ckpt/stage1", "sha256": "a" * 64}
    assert scan["versions"]["numpy"] == np.__version__ and scan["versions"]["highdicom"]
    with pytest.raises(ValueError):  # NaN is refused, not written as the non-standard NaN token
        write_scan_json(tmp_path / "scan.json", {"threshold": float("nan")}, CHECKPOINTS, rows)
    assert strict_json(tmp_path / "scan.json")["config"]["threshold"] == 0.5  # the earlier file is intact


# ----------------------------------------------------------------------------- already done


def test_fingerprint_and_is_done(tmp_path):
    ct = tmp_path / "in" / "ct.nii.gz"
    ct.parent.mkdir()
    ct.write_bytes(b"volume bytes")
    dicom = tmp_path / "in" / "series"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"one")
    (dicom / "2.dcm").write_bytes(b"two")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "ckpt" / "config.yaml").write_text("x: 1\n")
    checkpoints = checkpoint_identities({"pancreas_detection": tmp_path / "ckpt"})
    # the project-checkpoint folder is identified by its model.safetensors (as metrics.json does)
    assert checkpoints[0].sha256 == hashlib.sha256(b"weights").hexdigest()
    cfg = {"threshold": 0.5, "aggregation": "max"}
    base = fingerprint([ct], checkpoints, cfg)
    assert fingerprint([ct], checkpoints, dict(reversed(cfg.items()))) == base  # key order does not count
    assert fingerprint([ct], checkpoints, {**cfg, "threshold": 0.6}) != base
    assert fingerprint([ct], [CheckpointIdentity("pancreas_detection", "elsewhere", checkpoints[0].sha256)], cfg) == base
    assert fingerprint([ct], [CheckpointIdentity("pancreas_detection", "p", "0" * 64)], cfg) != base
    series = fingerprint([dicom], checkpoints, cfg)
    (dicom / "3.dcm").write_bytes(b"three")
    assert fingerprint([dicom], checkpoints, cfg) != series  # a slice added
    with pytest.raises(ValueError, match="not plain JSON"):
        fingerprint([ct], checkpoints, {"threshold": float("inf")})

    out = tmp_path / "out" / "ct"
    geometry = geometry_from_affine(np.eye(4), (10, 8, 3))
    kwargs = dict(volume="ct", source=str(ct), geometry=geometry,
                  result=VolumeResult([results_on(10, 8)(1, 0.9, (0, 0, 3, 3))], patient("tumor", 0.9)),
                  checkpoints=checkpoints)
    assert not is_done(out, base)                                        # nothing written yet
    write_volume_outputs(out, fingerprint=base, slices=np.zeros((3, 8, 10), np.uint8), **kwargs)
    assert is_done(out, base)
    assert strict_json(out / DONE_FILE)["files"] == sorted([REPORT_FILE, BOXES_FILE, MONTAGE_FILE, REPORT_HTML])
    assert not is_done(out, fingerprint([ct], checkpoints, {**cfg, "threshold": 0.6}))
    ct.write_bytes(b"volume bytes, changed")
    assert not is_done(out, fingerprint([ct], checkpoints, cfg))         # the input changed
    (out / BOXES_FILE).unlink()
    assert not is_done(out, base)                                        # a listed file is missing
    (out / DONE_FILE).write_text("{not json")
    assert not is_done(out, base)
    # a re-run without a montage removes the earlier one; a later failure unmarks the folder
    write_volume_outputs(out, fingerprint=base, **kwargs)
    assert is_done(out, base) and not (out / MONTAGE_FILE).exists() and (out / BOXES_FILE).exists()
    write_volume_error(out, "ct", "broken")
    assert not is_done(out, base) and not (out / REPORT_FILE).exists()
    assert strict_json(out / "error.json") == {"volume": "ct", "error": "broken"}


def test_failed_write_leaves_the_folder_unmarked(tmp_path, monkeypatch):
    from minigpt4.scan_outputs import run

    geometry = geometry_from_affine(np.eye(4), (10, 8, 3))
    rows = [results_on(10, 8)(1, 0.9, (0, 0, 3, 3))]
    kwargs = dict(volume="v", source="v", geometry=geometry, result=VolumeResult(rows, patient("tumor", 0.9)),
                  checkpoints=CHECKPOINTS, fingerprint="f" * 64)
    write_volume_outputs(tmp_path, **kwargs)
    before = (tmp_path / REPORT_FILE).read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run, "write_report_html", fail)  # the last file before done.json
    with pytest.raises(OSError, match="disk full"):
        write_volume_outputs(tmp_path, **{**kwargs, "result": VolumeResult(rows, patient("tumor", 0.95))})
    assert not is_done(tmp_path, "f" * 64)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert (tmp_path / REPORT_FILE).read_bytes() != before  # rewritten, but the folder is not marked done


# ----------------------------------------------------------------------------- sharding


def test_shard_covers_every_volume_exactly_once():
    names = [f"case_{n:03d}" for n in (7, 3, 11, 0, 5, 2, 9)]
    for world in (1, 2, 3, 8):
        parts = [shard(names, rank, world) for rank in range(world)]
        assert sorted(v for part in parts for v in part) == sorted(names)
        assert sum(len(p) for p in parts) == len(names)
    assert shard(names, 0, 3) == ["case_000", "case_005", "case_011"]
    assert shard(names, 2, 3) == ["case_003", "case_009"]
    assert shard(list(reversed(names)), 1, 3) == shard(names, 1, 3)  # input order does not matter
    with pytest.raises(ValueError, match="unique"):
        shard(["a", "b", "a"], 0, 2)
    with pytest.raises(ValueError, match="rank 2"):
        shard(names, 2, 2)


def test_rank_and_world_size_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world_size() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (2, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        rank_and_world_size()


def test_output_files_do_not_depend_on_where_they_are_written(tmp_path):
    """Two ranks writing the same volume give byte-identical report.json and boxes.nii.gz."""
    geometry = geometry_from_affine(np.diag([0.7, 0.8, 2.5, 1.0]), (14, 12, 5))
    kwargs = dict(volume="v", source="in/v.nii.gz", geometry=geometry,
                  result=VolumeResult([results_on(14, 12)(2, 0.8, (1, 1, 5, 5))], TUMOR),
                  checkpoints=CHECKPOINTS, fingerprint="f" * 64)
    write_volume_outputs(tmp_path / "rank0" / "v", **kwargs)
    write_volume_outputs(tmp_path / "rank1" / "v", **kwargs)
    for name in (REPORT_FILE, BOXES_FILE):
        assert (tmp_path / "rank0" / "v" / name).read_bytes() == (tmp_path / "rank1" / "v" / name).read_bytes()


def test_report_carries_the_calibrated_likelihood_and_the_fitness_checks():
    """Issue 28: ``patient.likelihood`` (raw beside calibrated, naming the val set), slice P(tumor)
    calibrated, ``fitness`` and ``outside_validated_range`` as given."""
    geometry = geometry_from_affine(np.diag([0.7, 0.8, 2.5, 1.0]), (14, 12, 5))
    SliceResult = results_on(14, 12)
    platt = CalibrationMap("platt", {"a": 0.0, "b": float(np.log(3))}, {"split": "val", "n_volumes": 20, "dataset": "MSD, NIH"})
    halve = CalibrationMap("isotonic", {"x": [0.0, 1.0], "y": [0.0, 0.5]}, target="slice P(tumor)")
    checks = [{"check": "slice_thickness", "status": "failed", "values": {"value": 5.0}, "reason": "5 mm"}]
    report = build_report("case", "case.nii.gz", geometry, patient("tumor", 0.75),
                          [SliceResult(2, 0.75, (1, 1, 5, 5)), SliceResult(3, None)], CHECKPOINTS,
                          fitness=checks, calibration=platt, slice_calibration=halve)
    assert report["patient"]["likelihood"] == {"raw": 0.75, "calibrated": 0.75,
                                               "calibration": {"method": "platt", "fitted_on": "val: 20 volumes of MSD, NIH"}}
    assert [s["p_tumor_calibrated"] for s in report["slices"]] == [0.375, None]
    assert report["fitness"] == checks and report["outside_validated_range"] is True
    inconclusive = build_report("case", "case.nii.gz", geometry, patient("inconclusive", 0.0, boxed=0),
                                [SliceResult(3, None)], CHECKPOINTS, fitness=[], calibration=platt)
    assert inconclusive["patient"]["likelihood"] is None and inconclusive["outside_validated_range"] is False
