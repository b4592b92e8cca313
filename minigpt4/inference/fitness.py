"""Is this scan fit for the model? The checks run on every scanned volume, in ONE place (issue 28.3).

Each check answers ``passed`` / ``failed`` / ``unknown`` with the values it saw and a reason in
words; a check that cannot be computed is ``unknown`` with the reason, never an exception. A
volume that fails one is answered all the same, flagged ``outside_validated_range`` in every output
(report.json, summary.csv, the demo). The thresholds and why each was chosen are
:data:`THRESHOLDS`; the checks are :data:`CHECKS`, in the order they are reported.

Inputs: the input's acquisition record (:func:`preprocessing.acquisition.measure_acquisition`,
measured by :func:`minigpt4.inference.readers.load_volume`), its DICOM headers (None for NIfTI),
the pipeline's slice results, and the training envelope of each stage's checkpoint
(:func:`minigpt4.models.checkpoints.checkpoint_envelope`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from minigpt4.models.checkpoints import checkpoint_envelope

STATUSES = ("passed", "failed", "unknown")
CHECKS = ("modality", "slice_thickness", "pixel_spacing", "orientation", "hu_sanity", "z_coverage", "contrast")


@dataclass(frozen=True)
class Threshold:
    value: Any
    reason: str


THRESHOLDS: dict[str, Threshold] = {
    "modality": Threshold("CT", "the model was trained on CT slices in Hounsfield units; MR or PET intensities "
                                "mean nothing to it"),
    "slice_thickness_tolerance_mm": Threshold(
        0.5, "a margin around the training range for the rounding scanners apply (2.5 vs 3 mm); thicker slices "
             "blur small lesions by partial volume in a way the model never saw. A chosen margin, not a measured limit"),
    "pixel_spacing_tolerance": Threshold(
        0.15, "relative margin around the training range: the in-plane spacing sets the pancreas' size in "
              "pixels, and sizes the model never saw are untested. A chosen margin, not a measured limit"),
    "max_tilt_deg": Threshold(
        2.0, "the training volumes are axial; a slice tilted by more than 2° (gantry tilt, an oblique "
             "reformat) cuts the pancreas differently, and the reader does not resample it"),
    "air_hu": Threshold(
        (-1060.0, -940.0), "air is −1000 HU by definition (padding −1024); a peak elsewhere means a wrong "
                           "rescale slope/intercept (e.g. ×0.5 puts air at −500) or not a CT at all"),
    "fat_hu": Threshold(
        (-140.0, -60.0), "fat is about −100 HU (−140 to −60 across scanners and kernels); a peak elsewhere "
                         "means the intensities are not Hounsfield units"),
    "edge_slices": Threshold(
        1, "a pancreas box on the first or last slice means the series may end inside the organ: the "
           "tumor could lie outside the scanned range"),
    "contrast": Threshold(
        "contrast-enhanced", "MSD Task07 and NIH Pancreas-CT (the paper's training data) are portal-venous "
                             "contrast-enhanced CTs; a checkpoint whose envelope records contrast agents is "
                             "compared with those instead"),
}

NO_CONTRAST_WORDS = ("none", "no", "no contrast", "non-contrast", "noncontrast", "nc", "0", "n/a")


def _entry(check: str, status: str, values: Mapping[str, Any], reason: str) -> dict:
    if status not in STATUSES:  # pragma: no cover - a programming error, not an input problem
        raise ValueError(f"unknown status {status!r}")
    return {"check": check, "status": status, "values": dict(values), "reason": reason}


def _ranges(envelopes: Mapping[str, Optional[dict]], key: str) -> dict[str, list[float]]:
    """``{stage: [min, max]}`` of ``key`` in the stages' envelopes that record it."""
    out = {}
    for stage, env in envelopes.items():
        span = (env or {}).get(key)
        if isinstance(span, dict) and span.get("min") is not None and span.get("max") is not None:
            out[stage] = [float(span["min"]), float(span["max"])]
    return out


def _no_envelope(notes: Mapping[str, str]) -> str:
    said = "; ".join(f"{stage}: {note}" for stage, note in notes.items()) or "no checkpoint given"
    return f"no training envelope to compare with ({said})"


def check_modality(acq: Optional[dict], headers: Optional[Sequence[Any]], **_: Any) -> dict:
    if not headers:
        return _entry("modality", "unknown", {"modality": None},
                      "a NIfTI file records no modality; the HU check tells whether the values look like CT")
    modality = getattr(headers[0], "Modality", None) or None
    if modality is None:
        return _entry("modality", "unknown", {"modality": None}, "the DICOM series has no Modality tag (0008,0060)")
    expected = THRESHOLDS["modality"].value
    status = "passed" if str(modality).upper() == expected else "failed"
    return _entry("modality", status, {"modality": str(modality), "expected": expected},
                  f"DICOM Modality is {modality}" + ("" if status == "passed" else
                                                     f", not {expected}: {THRESHOLDS['modality'].reason}"))


def _against_envelope(check: str, value: Optional[float], ranges: dict, tolerance: float, relative: bool,
                      unit: str, what: str, notes: Mapping[str, str]) -> dict:
    values = {"value": value, "training_range": ranges, "tolerance": tolerance, "unit": unit}
    if value is None:
        return _entry(check, "unknown", values, f"the input's {what} could not be measured")
    if not ranges:
        return _entry(check, "unknown", values, _no_envelope(notes))
    outside = []
    for stage, (low, high) in ranges.items():
        pad_low, pad_high = (low * tolerance, high * tolerance) if relative else (tolerance, tolerance)
        if not low - pad_low <= value <= high + pad_high:
            outside.append(f"{stage} [{low:g}, {high:g}] {unit}")
    if outside:
        return _entry(check, "failed", values,
                      f"{what} {value:g} {unit} lies outside the training range of " + ", ".join(outside)
                      + f" (tolerance {'±' + format(tolerance * 100, 'g') + ' %' if relative else '±' + format(tolerance, 'g') + ' ' + unit})")
    return _entry(check, "passed", values, f"{what} {value:g} {unit} lies within the training range of every stage")


def check_slice_thickness(acq: Optional[dict], envelopes: Mapping[str, Optional[dict]], notes: Mapping[str, str],
                          **_: Any) -> dict:
    value = None if acq is None else acq.get("slice_thickness_mm")
    return _against_envelope("slice_thickness", value, _ranges(envelopes, "slice_thickness_mm"),
                             THRESHOLDS["slice_thickness_tolerance_mm"].value, False, "mm", "slice thickness", notes)


def check_pixel_spacing(acq: Optional[dict], envelopes: Mapping[str, Optional[dict]], notes: Mapping[str, str],
                        **_: Any) -> dict:
    spacing = None if acq is None else acq.get("in_plane_spacing_mm")
    value = max(float(v) for v in spacing) if spacing else None  # the coarser axis decides
    return _against_envelope("pixel_spacing", value, _ranges(envelopes, "in_plane_spacing_mm"),
                             THRESHOLDS["pixel_spacing_tolerance"].value, True, "mm", "in-plane pixel spacing", notes)


def check_orientation(acq: Optional[dict], headers: Optional[Sequence[Any]], **_: Any) -> dict:
    limit = THRESHOLDS["max_tilt_deg"].value
    tilt = None
    if headers and getattr(headers[0], "GantryDetectorTilt", None) not in (None, ""):
        tilt = float(headers[0].GantryDetectorTilt)
    if acq is None:
        return _entry("orientation", "unknown", {"gantry_tilt_deg": tilt}, "the input's geometry could not be measured")
    values = {"slice_plane": acq.get("slice_plane"), "obliquity_deg": acq.get("obliquity_deg"),
              "gantry_tilt_deg": tilt, "max_tilt_deg": limit}
    problems = []
    if acq.get("slice_plane") != "axial":
        problems.append(f"the stored slices are {acq.get('slice_plane')}, not axial")
    if acq.get("obliquity_deg") is not None and float(acq["obliquity_deg"]) > limit:
        problems.append(f"the voxel axes are tilted {float(acq['obliquity_deg']):.1f}° from the patient axes")
    if tilt is not None and abs(tilt) > limit:
        problems.append(f"DICOM GantryDetectorTilt is {tilt:g}°")
    if problems:
        return _entry("orientation", "failed", values, "; ".join(problems) + f" (more than {limit:g}°: "
                      + THRESHOLDS["max_tilt_deg"].reason + ")")
    return _entry("orientation", "passed", values, f"axial slices, tilt at most {limit:g}°")


def check_hu_sanity(acq: Optional[dict], **_: Any) -> dict:
    air_low, air_high = THRESHOLDS["air_hu"].value
    fat_low, fat_high = THRESHOLDS["fat_hu"].value
    if acq is None:
        return _entry("hu_sanity", "unknown", {}, "the input's intensities could not be measured")
    air, fat = acq.get("air_peak_hu"), acq.get("fat_peak_hu")
    values = {"air_peak_hu": air, "fat_peak_hu": fat, "air_expected_hu": [air_low, air_high],
              "fat_expected_hu": [fat_low, fat_high], "hu_percentiles": acq.get("hu_percentiles")}
    problems = []
    if air is None:
        problems.append("no voxel lies near air (−1500 to −400 HU)")
    elif not air_low <= air <= air_high:
        problems.append(f"the air peak is at {air:g} HU, expected {air_low:g} to {air_high:g} ({THRESHOLDS['air_hu'].reason})")
    if fat is None:
        problems.append("no voxel of the body lies near fat (−300 to −20 HU)")
    elif not fat_low <= fat <= fat_high:
        problems.append(f"the fat peak is at {fat:g} HU, expected {fat_low:g} to {fat_high:g} ({THRESHOLDS['fat_hu'].reason})")
    if problems:
        return _entry("hu_sanity", "failed", values, "; ".join(problems))
    return _entry("hu_sanity", "passed", values, f"air at {air:g} HU and fat at {fat:g} HU, as Hounsfield units should be")


def check_z_coverage(results: Sequence[Any], n_slices: Optional[int], **_: Any) -> dict:
    edge = THRESHOLDS["edge_slices"].value
    boxed = sorted(int(r.slice_index) for r in results if getattr(r, "pancreas_box", None) is not None)
    values = {"n_slices": n_slices, "first_pancreas_slice": boxed[0] if boxed else None,
              "last_pancreas_slice": boxed[-1] if boxed else None, "n_pancreas_slices": len(boxed)}
    if not n_slices:
        return _entry("z_coverage", "unknown", values, "the number of slices is not known")
    if not boxed:
        return _entry("z_coverage", "unknown", values, "no slice got a pancreas box: coverage of the organ cannot be judged")
    ends = [k for k in (boxed[0], boxed[-1]) if k < edge or k > n_slices - 1 - edge]
    if ends:
        where = " and ".join(sorted({"first" if k < edge else "last" for k in ends}))
        return _entry("z_coverage", "failed", values,
                      f"pancreas boxes reach the {where} slice ({THRESHOLDS['edge_slices'].reason})")
    return _entry("z_coverage", "passed", values,
                  f"the pancreas boxes (slices {boxed[0]}–{boxed[-1]}) lie inside the series (0–{n_slices - 1})")


def _contrast_given(value: str) -> bool:
    return value.strip().lower() not in NO_CONTRAST_WORDS


def check_contrast(acq: Optional[dict], headers: Optional[Sequence[Any]], envelopes: Mapping[str, Optional[dict]],
                   **_: Any) -> dict:
    if not headers:
        return _entry("contrast", "unknown", {"contrast_agent": None},
                      "a NIfTI file records no contrast; the training data are contrast-enhanced CTs")
    first = headers[0]
    if "ContrastBolusAgent" not in first:
        return _entry("contrast", "unknown", {"contrast_agent": None},
                      "the DICOM series has no ContrastBolusAgent tag (0018,0010)")
    agent = str(first.ContrastBolusAgent or "").strip()
    recorded = {name for env in envelopes.values() for name in ((env or {}).get("contrast_agent") or {})
                if name != "not recorded"}
    values = {"contrast_agent": agent or None, "route": str(getattr(first, "ContrastBolusRoute", "") or "") or None,
              "training": sorted(recorded) if recorded else THRESHOLDS["contrast"].value}
    if not agent or not _contrast_given(agent):
        return _entry("contrast", "failed", values,
                      f"ContrastBolusAgent says {agent or 'nothing'!r}: a non-contrast scan ({THRESHOLDS['contrast'].reason})")
    return _entry("contrast", "passed", values, f"contrast agent {agent!r} recorded, as in the training data")


_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "modality": check_modality, "slice_thickness": check_slice_thickness, "pixel_spacing": check_pixel_spacing,
    "orientation": check_orientation, "hu_sanity": check_hu_sanity, "z_coverage": check_z_coverage,
    "contrast": check_contrast,
}


def check_fitness(acquisition: Optional[dict], headers: Optional[Sequence[Any]], results: Sequence[Any],
                  n_slices: Optional[int], envelopes: Optional[Mapping[str, tuple[Optional[dict], str]]] = None) -> list[dict]:
    """Every check of :data:`CHECKS` on one volume; never raises.

    Args:
        acquisition: the input's record (:func:`preprocessing.acquisition.measure_acquisition`), or
            None when it could not be measured.
        headers: the DICOM series' headers (pydicom Datasets), None for NIfTI.
        results: the pipeline's :class:`~minigpt4.inference.pipeline.SliceResult` per slice.
        n_slices: the number of slices of the volume.
        envelopes: ``{stage: (envelope or None, note)}`` from
            :func:`minigpt4.models.checkpoints.checkpoint_envelope`.

    Returns:
        ``[{"check", "status", "values", "reason"}, ...]`` in :data:`CHECKS` order (report.json ``fitness``).
    """
    envelopes = envelopes or {}
    kwargs = {"acq": acquisition, "headers": headers, "results": list(results or []), "n_slices": n_slices,
              "envelopes": {stage: env for stage, (env, _) in envelopes.items()},
              "notes": {stage: note for stage, (_, note) in envelopes.items()}}
    out = []
    for name in CHECKS:
        try:
            out.append(_FUNCTIONS[name](**kwargs))
        except Exception as err:  # noqa: BLE001 - a check that cannot be computed is unknown, never a crash
            out.append(_entry(name, "unknown", {}, f"could not be computed ({type(err).__name__}: {err})"))
    return out


def outside_validated_range(checks: Sequence[Mapping[str, Any]]) -> bool:
    """True when any check failed (an unknown check does not flag the volume; it is reported as such)."""
    return any(c.get("status") == "failed" for c in checks)


def fitness_summary(checks: Sequence[Mapping[str, Any]]) -> str:
    """One line for a person: ``outside the validated range: slice_thickness, hu_sanity failed``,
    ``within the validated range: all 7 checks passed`` or ``no check failed: 5 passed, 2 unknown
    (modality, contrast)`` (an unknown check is never counted as passed)."""
    failed = [c["check"] for c in checks if c.get("status") == "failed"]
    unknown = [c["check"] for c in checks if c.get("status") == "unknown"]
    if failed:
        return "outside the validated range: " + ", ".join(failed) + " failed"
    if not unknown:
        return f"within the validated range: all {len(checks)} checks passed"
    return f"no check failed: {len(checks) - len(unknown)} passed, {len(unknown)} unknown ({', '.join(unknown)})"


def stage_envelopes(paths: Mapping[str, str | os.PathLike]) -> dict[str, tuple[Optional[dict], str]]:
    """``{stage: (training envelope or None, note)}`` from each stage checkpoint's header (no
    tensors read): what :func:`check_fitness` compares every input with.

    Raises:
        FileNotFoundError: a checkpoint is missing. ValueError: an unreadable header.
    """
    return {stage: checkpoint_envelope(path) for stage, path in sorted(paths.items())}
