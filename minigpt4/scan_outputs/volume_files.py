"""One volume's output files: ``report.json``, ``boxes.nii.gz``, ``seg.dcm`` (DICOM input) and
``montage.png``. Every file is written to a temporary name and renamed into place.

Coordinates in ``report.json``: a box is an inclusive pixel box on a display slice; its voxel
bounds are inclusive indices of the stored array; ``ras`` of a corner is the affine applied to
that corner pixel's voxel index, i.e. the corner voxel's **centre** (the box's physical extent
reaches half a voxel further). RAS values are rounded to 1e-4 mm.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from minigpt4.drawing import CYAN, RED, annotate, display_scale
from minigpt4.identity import CheckpointIdentity
from minigpt4.inference.calibration import CalibrationMap, calibrate_slices, likelihood_entry
from minigpt4.inference.fitness import outside_validated_range
from minigpt4.inference.geometry import (
    VolumeGeometry,
    check_results,
    geometry_from_affine,
    slice_boxes,
)
from minigpt4.inference.pipeline import PatientResult, SliceResult
from minigpt4.io import to_json, write_json_atomic
from minigpt4.nifti_io import write_nifti
from preprocessing.volumes import read_dicom_headers
from minigpt4.io import atomic_path

REPORT_FORMAT = "minigpt-pancreas-scan-report/1"
PANCREAS_LABEL, TUMOR_LABEL = 1, 2
SEGMENTS = ((PANCREAS_LABEL, "pancreas box"), (TUMOR_LABEL, "tumor box"))


# ----------------------------------------------------------------------------- report.json


def _box_entry(geometry: VolumeGeometry, box: Sequence[int], k: int) -> dict:
    x1, y1, x2, y2 = (int(v) for v in box)
    lo, hi = geometry.voxel_box((x1, y1, x2, y2), k)
    corners = []
    for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)):
        voxel = geometry.voxel_of(x, y, k)
        corners.append({"pixel": [x, y], "voxel": list(voxel),
                        "ras": [round(v, 4) for v in geometry.ras_of(voxel)]})
    return {"pixels": [x1, y1, x2, y2], "voxel_min": list(lo), "voxel_max": list(hi), "corners": corners}


def most_suspicious(results: Sequence[SliceResult]) -> Optional[int]:
    """Slice index with the highest P(tumor) (the lowest index on ties); None when none has one."""
    scored = [r for r in results if r.p_tumor is not None]
    if not scored:
        return None
    return min(scored, key=lambda r: (-float(r.p_tumor), r.slice_index)).slice_index


def build_report(volume: str, source: str, geometry: VolumeGeometry, patient: Optional[PatientResult],
                 results: Sequence[SliceResult], checkpoints: Sequence[CheckpointIdentity],
                 extra: Optional[dict] = None, *, fitness: Optional[Sequence[dict]] = None,
                 calibration: Optional[CalibrationMap] = None,
                 slice_calibration: Optional[CalibrationMap] = None) -> dict:
    """The content of ``report.json`` (a JSON-ready dict; see the module docstring for the frames).

    Args:
        volume: the volume's name (its output folder's name).
        source: where it came from (the input path as given).
        patient: the volume's answer; None when there is none (one checkpoint for every stage).
        results: the pipeline's :class:`~minigpt4.inference.pipeline.SliceResult` per slice the
            model was run on (any order; written sorted by slice).
        extra: more top-level keys (e.g. ``{"config": {...}}``); may not replace the standard ones.
        fitness: the input's fitness checks (:func:`minigpt4.inference.fitness.check_fitness`):
            ``fitness`` and ``outside_validated_range`` (both null when not given: not recorded).
        calibration: the patient score's map (``patient.likelihood``: raw and calibrated, or
            ``calibrated`` null: an uncalibrated score); ``slice_calibration`` P(tumor)'s
            (``p_tumor_calibrated`` per slice).
    """
    check_results(geometry, patient, results)
    rows = []
    for r in sorted(results, key=lambda r: r.slice_index):
        k = int(r.slice_index)
        pancreas, tumor = slice_boxes(geometry, r)
        rows.append({
            "slice": k,
            "p_tumor": None if r.p_tumor is None else float(r.p_tumor),
            "p_tumor_calibrated": calibrate_slices([r.p_tumor], slice_calibration)[0],
            "classified_on": r.classified_on,
            "pancreas_answer": r.pancreas_answer,
            "pancreas_box": None if pancreas is None else _box_entry(geometry, pancreas, k),
            "tumor_answer": r.tumor_answer,
            "tumor_box": None if tumor is None else _box_entry(geometry, tumor, k),
        })
    inconclusive = patient is not None and patient.decision == "inconclusive"
    report = {
        "format": REPORT_FORMAT,
        "volume": volume,
        "source": str(source),
        "patient": None if patient is None else {
            "decision": patient.decision, "score": None if inconclusive else float(patient.score),
            "threshold": float(patient.threshold), "aggregation": patient.aggregation,
            "top_k": patient.top_k if patient.aggregation == "top_k_mean" else None,
            "n_slices_boxed": int(patient.n_slices_boxed),
            "likelihood": likelihood_entry(None if inconclusive else float(patient.score), calibration)},
        "most_suspicious_slice": most_suspicious(results),
        "counts": {"n_slices": geometry.n_slices, "n_results": len(rows),
                   "n_classified": sum(r.p_tumor is not None for r in results),
                   "n_boxed": sum(any(b is not None for b in slice_boxes(geometry, r)) for r in results)},
        "geometry": geometry.as_dict(),
        "checkpoints": [c.as_dict() for c in checkpoints],
        "fitness": None if fitness is None else [dict(c) for c in fitness],
        "outside_validated_range": None if fitness is None else outside_validated_range(fitness),
        "slices": rows,
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(f"extra report key {key!r} would replace a standard one")
        report[key] = value
    return report


def write_report(path: str | os.PathLike, report: dict) -> Path:
    write_json_atomic(path, report)
    return Path(path)


# ----------------------------------------------------------------------------- boxes.nii.gz


def box_label_volume(geometry: VolumeGeometry, results: Sequence[SliceResult]) -> np.ndarray:
    """(X, Y, Z) uint8 in the stored frame: 1 inside pancreas boxes, 2 inside tumor boxes (tumor
    wins where both), 0 elsewhere."""
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    for which, value in ((0, PANCREAS_LABEL), (1, TUMOR_LABEL)):  # tumor last: it wins
        for r in results:
            box = slice_boxes(geometry, r)[which]
            if box is not None:
                lo, hi = geometry.voxel_box(box, r.slice_index)
                labels[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = value
    return labels


def write_box_nifti(path: str | os.PathLike, geometry: VolumeGeometry, results: Sequence[SliceResult]) -> Path:
    """``boxes.nii.gz``: :func:`box_label_volume` with the input's own shape and affine (qform and
    sform, code 1), so it opens over the CT in 3D Slicer / ITK-SNAP. Atomic."""
    check_results_geometry_only(geometry, results)
    write_nifti(Path(path), box_label_volume(geometry, results), geometry.affine)
    return Path(path)


def check_results_geometry_only(geometry: VolumeGeometry, results: Sequence[SliceResult]) -> None:
    """:func:`check_results` of the slices alone (any decision is fine here)."""
    check_results(geometry, None, results)


# ----------------------------------------------------------------------------- DICOM SEG


def read_dicom_source(folder: str | os.PathLike) -> tuple[VolumeGeometry, list]:
    """A DICOM series' geometry and its headers (pydicom Datasets without pixel data), header
    ``k`` = stored slice ``k``, sorted exactly as :func:`preprocessing.volumes.read_dicom_series`
    stacks the slices (both use :func:`preprocessing.volumes.read_dicom_headers`).

    Raises:
        preprocessing.volumes.VolumeError: as the reader does (mixed series, oblique, gaps...).
    """
    headers, affine = read_dicom_headers(folder)
    first = headers[0][1]
    geometry = geometry_from_affine(affine, (int(first.Columns), int(first.Rows), len(headers)))
    return geometry, [ds for _, ds in headers]


def _lps(point: Sequence[float]) -> np.ndarray:
    return np.array([-point[0], -point[1], point[2]], dtype=np.float64)


def seg_frames(geometry: VolumeGeometry, results: Sequence[SliceResult], n_source: int,
               rows: int, columns: int) -> tuple[list[int], np.ndarray]:
    """Stored slices with a box and their masks in DICOM pixel order.

    Returns:
        ``(slices, masks)``: stored slice numbers ``k`` (ascending) and (len(slices), rows,
        columns, 2) uint8, ``masks[n, r, c, s]`` = 1 where segment ``s + 1`` (pancreas box,
        tumor box; they may overlap) covers DICOM pixel (row r, column c) of slice ``slices[n]``.
    """
    if geometry.shape != (columns, rows, n_source):
        raise ValueError(f"geometry {geometry.shape} is not that of the DICOM series "
                         f"({columns} columns x {rows} rows x {n_source} slices)")
    boxes: dict[int, list[tuple[int, tuple, tuple]]] = {}
    for r in results:
        for segment, box in enumerate(slice_boxes(geometry, r)):
            if box is None:
                continue
            lo, hi = geometry.voxel_box(box, r.slice_index)
            if lo[2] != hi[2]:
                raise ValueError(f"slice {r.slice_index}: the display slice is not a stored slice of the series")
            boxes.setdefault(lo[2], []).append((segment, lo, hi))
    slices = sorted(boxes)
    masks = np.zeros((len(slices), rows, columns, 2), dtype=np.uint8)
    for n, k in enumerate(slices):
        for segment, lo, hi in boxes[k]:  # stored [column, row, slice] → DICOM frame [row, column]
            masks[n, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1, segment] = 1
    return slices, masks


# Patient/study attributes a SEG copies from its source (Type 2: present, possibly empty).
# Anonymisers (and the project's synthetic series) drop some; highdicom needs them present.
SOURCE_TYPE2_ATTRIBUTES = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                           "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def source_header(header: Any) -> Any:
    """The header as highdicom needs it: absent :data:`SOURCE_TYPE2_ATTRIBUTES` set empty, and
    an empty SOPClassUID/SOPInstanceUID (seen in anonymised series) taken from the file meta
    (MediaStorageSOP...UID, the same identity). A copy when anything changes."""
    import copy

    missing = [name for name in SOURCE_TYPE2_ATTRIBUTES if name not in header]
    meta = getattr(header, "file_meta", None) or {}
    from_meta = [(name, meta.get(f"MediaStorage{name}")) for name in ("SOPClassUID", "SOPInstanceUID")
                 if not str(header.get(name, "") or "")]
    if not missing and not from_meta:
        return header
    header = copy.deepcopy(header)
    for name in missing:
        setattr(header, name, "")
    for name, value in from_meta:
        if not value:
            raise ValueError(f"DICOM header without {name} (neither in the data set nor in its file meta)")
        setattr(header, name, value)
    return header


def installed_version() -> str:
    """The installed minigpt-pancreas version ("unknown" for a source checkout not installed)."""
    from importlib import metadata

    try:
        return metadata.version("minigpt-pancreas")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_dicom_seg(path: str | os.PathLike, geometry: VolumeGeometry, results: Sequence[SliceResult],
                    source_headers: Sequence[Any], checkpoints: Sequence[CheckpointIdentity],
                    software_version: str = "") -> Optional[Path]:
    """A DICOM Segmentation (highdicom, BINARY) of the boxes over the source series.

    Two segments, ``pancreas box`` (1) and ``tumor box`` (2), one frame per boxed slice per
    segment; each frame references its source image (SOPInstanceUID) and carries its
    ImagePositionPatient. UIDs are derived from the source series, the checkpoints and the
    boxes, so the same scan gives the same UIDs. Atomic.

    Args:
        source_headers: the series' headers as :func:`read_dicom_source` returns them
            (header ``k`` = stored slice ``k``).
        software_version: recorded in the SEG; the installed minigpt-pancreas version when empty.

    Returns:
        The path, or None (nothing written) when no slice has a box.

    Raises:
        ValueError: the headers do not match the geometry (size, count, or a referenced slice's
            ImagePositionPatient further than half a slice from where the affine puts it).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid


    check_results_geometry_only(geometry, results)
    software_version = software_version or installed_version()
    first = source_headers[0]
    slices, masks = seg_frames(geometry, results, len(source_headers), int(first.Rows), int(first.Columns))
    if not slices:
        return None
    step = float(np.linalg.norm(geometry.affine[:3, 2]))
    for k in slices:
        expected = _lps(geometry.ras_of((0, 0, k)))
        found = np.array([float(v) for v in source_headers[k].ImagePositionPatient])
        if np.linalg.norm(found - expected) > 0.5 * step:
            raise ValueError(f"DICOM header {k} (SOPInstanceUID {source_headers[k].SOPInstanceUID}) lies at "
                             f"{found.tolist()} mm, not at stored slice {k} ({np.round(expected, 3).tolist()} mm): "
                             "headers and geometry come from different series or orders")
    if not str(getattr(first, "FrameOfReferenceUID", "") or ""):
        raise ValueError(f"DICOM series {getattr(first, 'SeriesInstanceUID', '?')} has no FrameOfReferenceUID, "
                         "so a DICOM SEG cannot be placed over it")
    content = to_json([str(first.SeriesInstanceUID), [c.sha256 for c in checkpoints], slices,
                          hashlib.sha256(masks.tobytes()).hexdigest()])
    algorithm = hd.AlgorithmIdentificationSequence(
        name="MiniGPT-Pancreas cascade", version=software_version,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={c.stage: c.sha256[:16] for c in checkpoints} or None)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=PANCREAS_LABEL, segment_label="pancreas box",
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=codes.SCT.Pancreas,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm),
        hd.seg.SegmentDescription(
            segment_number=TUMOR_LABEL, segment_label="tumor box",
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm),
    ]
    seg = hd.seg.Segmentation(
        source_images=[source_header(source_headers[k]) for k in slices],
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[content, "series"]),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(entropy_srcs=[content, "instance"]),
        instance_number=1,
        manufacturer="MiniGPT-Pancreas",
        manufacturer_model_name="MiniGPT-Pancreas cascade",
        software_versions=software_version,
        device_serial_number="none",
        series_description="MiniGPT-Pancreas boxes",
        content_description="Model boxes: pancreas, suspected tumor (not a diagnosis)",
        content_label="BOXES",
        omit_empty_frames=True,
    )
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return Path(path)


# ----------------------------------------------------------------------------- montage.png


def write_montage(path: str | os.PathLike, slices: Any, results: Sequence[SliceResult], n: int = 8,
                  columns: int = 4, min_side: int = 256) -> Optional[Path]:
    """``montage.png``: the ``n`` slices with the highest P(tumor) (highest first, lower slice
    first on ties), each with its pancreas (cyan) and tumor (red) box and a caption
    ``slice k  P(tumor) p``. Drawn with :func:`minigpt4.drawing.annotate`, as the demo draws. Atomic.

    Args:
        slices: indexable by display slice ``k`` → (H, W) uint8, the normalised slice the model saw
            (e.g. the (Z, H, W) array of the inference reader).
        min_side: tiles are zoomed (integer, nearest) to at least this many pixels.

    Returns:
        The path, or None (nothing written) when no slice has a P(tumor).
    """
    from PIL import Image, ImageDraw


    chosen = sorted((r for r in results if r.p_tumor is not None), key=lambda r: (-float(r.p_tumor), r.slice_index))[:n]
    if not chosen:
        return None
    tiles = []
    for r in chosen:
        image = np.asarray(slices[r.slice_index], dtype=np.uint8)
        height, width = image.shape[:2]
        boxes = [((b[0], b[1], b[2] + 1, b[3] + 1), colour)  # inclusive pixels → the extent annotate draws
                 for b, colour in zip(r.inclusive_boxes(width, height), (CYAN, RED)) if b is not None]
        tile = annotate(image, boxes, scale=display_scale(*image.shape[:2], min_side=min_side))
        caption = Image.new("RGB", (tile.width, 20), (0, 0, 0))
        ImageDraw.Draw(caption).text((4, 4), f"slice {r.slice_index}  P(tumor) {float(r.p_tumor):.3f}", fill=(255, 255, 255))
        framed = Image.new("RGB", (tile.width, tile.height + caption.height))
        framed.paste(tile, (0, 0))
        framed.paste(caption, (0, tile.height))
        tiles.append(framed)
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for number, tile in enumerate(tiles):
        sheet.paste(tile, ((number % columns) * width, (number // columns) * height))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
