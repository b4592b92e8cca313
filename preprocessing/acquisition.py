"""How a CT was acquired, measured the same way on training volumes and on a scanned input (issue 28.2).

:func:`measure_acquisition` turns one volume (HU voxels, its affine, the DICOM headers where there
are some) into a JSON-ready record: slice thickness and spacing, in-plane spacing, matrix size,
HU percentiles inside the body, the air and fat peaks of the HU histogram, the obliquity of the
slices, and the DICOM tags that say who made the scan and with which contrast (manufacturer,
modality, contrast agent, gantry tilt). The preprocessing CLI writes one record per volume
(``annotations/<DS>_acquisition.json``); the trainer folds the records of its train volumes into
an *envelope* (:func:`envelope_from_records`) stored in every checkpoint; the scan-time fitness
checks (:mod:`minigpt4.inference.fitness`) measure the input with the same function and compare.

Values a file does not hold are ``None`` (a NIfTI has no manufacturer, no contrast tag): the data
"does not say", never a guess.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from nibabel.orientations import io_orientation

ACQUISITION_SCHEMA = 1
ENVELOPE_SCHEMA = 1
BODY_HU = -500.0
"""Voxels above this are inside the body (soft tissue, fat at about −100, bone; lung parenchyma at
about −850 and outside air at −1000 are below). A threshold, not a segmentation: the table is in."""
HU_PERCENTILES = (1, 5, 50, 95, 99)
AIR_SEARCH = (-1500.0, -400.0)
"""Where the air peak of the histogram is looked for: padding outside the field of view
(−2000, −3024) lies below, so it never wins; a halved rescale puts air near −500, still inside."""
FAT_SEARCH = (-300.0, -20.0)
"""Where the fat peak is looked for (fat is about −100 HU; muscle and organs lie above 0)."""
HISTOGRAM_BIN = 10.0
MAX_SAMPLED_VOXELS = 4_000_000
"""Voxels used for the percentiles and peaks (a regular sub-grid beyond that): percentiles of a
4 M sample differ from the full volume's by well under one HU bin, at a fraction of the time."""
DICOM_TAGS = {"manufacturer": "Manufacturer", "model": "ManufacturerModelName", "modality": "Modality",
              "contrast_agent": "ContrastBolusAgent", "contrast_route": "ContrastBolusRoute",
              "series_description": "SeriesDescription", "gantry_tilt_deg": "GantryDetectorTilt",
              "slice_thickness_tag_mm": "SliceThickness", "kvp": "KVP", "convolution_kernel": "ConvolutionKernel"}
"""Record key → DICOM keyword read from the first header of a series (None when absent or empty)."""


def _sample(hu: np.ndarray) -> np.ndarray:
    """A regular sub-grid of at most :data:`MAX_SAMPLED_VOXELS` voxels, flattened, as float32."""
    step = 1
    while hu.size / step**2 > MAX_SAMPLED_VOXELS and step < 64:
        step += 1
    sub = hu[::step, ::step] if hu.ndim >= 2 else hu
    return np.asarray(sub, dtype=np.float32).ravel()


def histogram_peak(values: np.ndarray, low: float, high: float, bin_width: float = HISTOGRAM_BIN) -> Optional[float]:
    """Centre of the most populated ``bin_width`` bin of ``values`` in ``[low, high)``; None when none lies there."""
    inside = values[(values >= low) & (values < high)]
    if inside.size == 0:
        return None
    edges = np.arange(low, high + bin_width, bin_width)
    counts, edges = np.histogram(inside, bins=edges)
    i = int(np.argmax(counts))
    return float((edges[i] + edges[i + 1]) / 2)


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a stored voxel axis and the patient axis closest to it:
    0 for an axial (or any axis-aligned) volume, the gantry tilt or obliquity otherwise."""
    axes = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(axes)):
        raise ValueError("degenerate affine (a zero or non-finite axis)")
    cosines = np.abs(axes / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), 0.0, 1.0))))


def slice_axis_name(affine: np.ndarray) -> str:
    """``axial`` / ``coronal`` / ``sagittal``: the patient plane of the stored slices (the plane
    normal to the stored third axis, as a scanner or converter writes its acquisition slices)."""
    axis = np.asarray(affine, dtype=float)[:3, 2]
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(axis)))]


def _tag(header: Any, keyword: str) -> Any:
    value = getattr(header, keyword, None)
    if value is None or value == "":
        return None
    if isinstance(value, (int, float, str)):
        return value
    try:  # pydicom's DSfloat / IS / PersonName / MultiValue
        if hasattr(value, "__iter__") and not isinstance(value, str):
            return [str(v) for v in value]
        number = float(value)
        return number
    except (TypeError, ValueError):
        return str(value)


def dicom_fields(headers: Optional[Sequence[Any]]) -> dict:
    """:data:`DICOM_TAGS` of the first header (all None without headers); numbers as floats."""
    first = headers[0] if headers else None
    out = {}
    for key, keyword in DICOM_TAGS.items():
        value = _tag(first, keyword) if first is not None else None
        if value is not None and key in ("gantry_tilt_deg", "slice_thickness_tag_mm", "kvp"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = None
        out[key] = value
    return out


def stored_slice_axis(affine: np.ndarray) -> int:
    """Index of the stored array axis closest to head–feet (the slice axis the readers display)."""
    return int(np.nonzero(io_orientation(np.asarray(affine, dtype=float))[:, 0] == 2)[0][0])


def measure_acquisition(hu: np.ndarray, affine: np.ndarray, axial_axis: int,
                        headers: Optional[Sequence[Any]] = None, slope: float = 1.0, inter: float = 0.0) -> dict:
    """One volume's acquisition record (JSON-ready).

    Args:
        hu: the voxels in Hounsfield units, any axis order (3-D).
        affine: (4, 4) stored voxel → RAS+ mm of the volume the voxels came from.
        axial_axis: the axis of ``hu`` that runs head–feet (the slice axis).
        headers: the DICOM headers of the series (pydicom Datasets, first = any slice), or None.
        slope, inter: the scaling of stored values to HU, applied to the sampled voxels only (no
            scaled copy of the whole volume).

    Returns:
        ``{"schema", "slice_spacing_mm", "slice_thickness_mm", "in_plane_spacing_mm": [row, col],
        "matrix": [rows, cols], "n_slices", "slice_plane", "obliquity_deg", "hu_percentiles":
        {"p1": .., ...} (inside the body), "air_peak_hu", "fat_peak_hu", "body_fraction",
        **dicom_fields}``. ``slice_thickness_mm`` is the DICOM SliceThickness where given, else
        the spacing between slices (a NIfTI stores no thickness).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {tuple(hu.shape)}")
    affine = np.asarray(affine, dtype=float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    stored_axial = stored_slice_axis(affine)
    in_plane_axes = [i for i in range(3) if i != stored_axial]
    in_plane = [round(float(zooms[i]), 4) for i in in_plane_axes]
    matrix = [int(hu.shape[i]) for i in range(3) if i != axial_axis]
    moved = np.moveaxis(hu, axial_axis, 0)  # (Z, ., .): sample in-plane, keep every slice
    values = _sample(np.moveaxis(moved, 0, -1))
    if slope != 1.0 or inter != 0.0:
        values = values * np.float32(slope) + np.float32(inter)
    body = values[values > BODY_HU]
    percentiles = ({f"p{p}": round(float(v), 1) for p, v in zip(HU_PERCENTILES, np.percentile(body, HU_PERCENTILES))}
                   if body.size else {f"p{p}": None for p in HU_PERCENTILES})
    tags = dicom_fields(headers)
    spacing = round(float(zooms[stored_axial]), 4)
    return {
        "schema": ACQUISITION_SCHEMA,
        "slice_spacing_mm": spacing,
        "slice_thickness_mm": tags["slice_thickness_tag_mm"] if tags["slice_thickness_tag_mm"] else spacing,
        "in_plane_spacing_mm": in_plane,
        "matrix": matrix,
        "n_slices": int(hu.shape[axial_axis]),
        "slice_plane": slice_axis_name(affine),
        "obliquity_deg": round(obliquity_deg(affine), 3),
        "hu_percentiles": percentiles,
        "air_peak_hu": histogram_peak(values, *AIR_SEARCH),
        "fat_peak_hu": histogram_peak(body, *FAT_SEARCH),
        "body_fraction": round(float(body.size / values.size), 4) if values.size else None,
        **tags,
    }


# ----------------------------------------------------------------------------- envelope


def _range(values: Iterable[Optional[float]]) -> Optional[dict]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"min": round(min(vals), 4), "max": round(max(vals), 4), "median": round(float(np.median(vals)), 4)}


def _names(values: Iterable[Any]) -> dict:
    counts: dict[str, int] = {}
    for v in values:
        key = "not recorded" if v is None else str(v)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def envelope_from_records(records: Mapping[str, Mapping[str, Any]], n_volumes: int,
                          sources: Sequence[str] = ()) -> dict:
    """The acquisition range of a set of training volumes.

    Args:
        records: ``{"<dataset>/<volume>": acquisition record}`` of the volumes that have one.
        n_volumes: how many training volumes there were (with or without a record).
        sources: where the records came from (dataset names), for the reader.

    Returns:
        ``{"schema", "n_volumes", "n_recorded", "sources", "slice_thickness_mm": {min, max, median},
        "slice_spacing_mm", "in_plane_spacing_mm", "matrix_rows", "matrix_cols", "hu_percentiles":
        {"p1": {min, max, median}, ...}, "air_peak_hu", "fat_peak_hu", "obliquity_deg",
        "manufacturer": {name: n}, "contrast_agent": {name: n}, "modality": {name: n}}``; a range is
        None where no record holds the value, a count ``"not recorded"`` where the data did not say.
    """
    recs = list(records.values())
    envelope: dict[str, Any] = {"schema": ENVELOPE_SCHEMA, "n_volumes": int(n_volumes), "n_recorded": len(recs),
                                "sources": sorted(set(sources))}
    for key in ("slice_thickness_mm", "slice_spacing_mm", "air_peak_hu", "fat_peak_hu", "obliquity_deg"):
        envelope[key] = _range(r.get(key) for r in recs)
    envelope["in_plane_spacing_mm"] = _range(v for r in recs for v in (r.get("in_plane_spacing_mm") or []))
    envelope["matrix_rows"] = _range((r.get("matrix") or [None, None])[0] for r in recs)
    envelope["matrix_cols"] = _range((r.get("matrix") or [None, None])[1] for r in recs)
    envelope["hu_percentiles"] = {f"p{p}": _range((r.get("hu_percentiles") or {}).get(f"p{p}") for r in recs)
                                  for p in HU_PERCENTILES}
    for key in ("manufacturer", "contrast_agent", "modality"):
        envelope[key] = _names(r.get(key) for r in recs)
    return envelope
