"""``sr.dcm``: the volume's answer as a DICOM Structured Report (TID 1500 Measurement Report,
Comprehensive 3D SR), written with highdicom's TID 1500 classes from ``report.json``'s content.

What it holds (all read from the report dict; the DICOM headers only place it in the study):

* **evidence**: every image of the source series (``CurrentRequestedProcedureEvidenceSequence``)
  and the scan's ``seg.dcm`` when there is one;
* a **patient-level group** (TID 1501, tracking identifier ``patient-level finding``, its source
  image the most suspicious slice's): the
  qualitative evaluation "PDAC suspected" = Yes / No / Undetermined (``tumor`` / ``no tumor`` /
  ``inconclusive``), the calibrated likelihood as DCM "Probability of cancer" (only where
  ``patient.likelihood.calibrated`` is recorded: an uncalibrated score is never called a
  probability), the raw aggregated score under its own (private) name, the operating point's
  threshold, and the fitness checks as qualitative evaluations (each "Fitness check passed: <check>"
  = Yes / No / Undetermined for passed / failed / unknown; "Outside the validated range" = Yes / No);
* a **volumetric group** (TID 1411) per segment of ``seg.dcm`` that has frames (pancreas box,
  tumor box), referencing the SEG's segment and the source series;
* a **planar group** (TID 1410) per slice with a tumor box: the box as a closed POLYLINE
  ``ImageRegion`` on its source image, with the slice's P(tumor) as a measurement (and its
  calibrated P(tumor) where ``report.json`` has ``p_tumor_calibrated``).

Coordinates: the region's points are DICOM image coordinates (column, row) of the source image,
where (0, 0) is the top-left corner of the top-left pixel; a box whose inclusive voxel bounds
in ``report.json`` are columns ``c0..c1`` and rows ``r0..r1`` becomes the rectangle
``(c0, r0) (c1+1, r0) (c1+1, r1+1) (c0, r1+1) (c0, r0)``: the outline of exactly the pixels the
SEG marks. For a DICOM input the stored frame of ``report.json`` is ``[column, row, slice]`` of
the series (header ``k`` = stored slice ``k``, as :func:`~minigpt4.scan_outputs.read_dicom_source`
sorts them).

Concepts without a standard code use the private coding scheme ``99MGP`` (declared in the SR's
CodingSchemeIdentificationSequence).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from minigpt4.io import atomic_path, to_json
from minigpt4.scan_outputs.volume_files import installed_version, source_header

# highdicom and pydicom's code dictionaries are imported inside the functions, as volume.py's SEG
# writer does: importing highdicom costs about a second, paid only where a DICOM file is written.

PRIVATE_SCHEME = "99MGP"
ALGORITHM_NAME = "MiniGPT-Pancreas cascade"
PATIENT_GROUP = "patient-level finding"
SERIES_DESCRIPTION = "MiniGPT-Pancreas SR (research prototype, not a medical device)"
"""The SR's SeriesDescription (LO: at most 64 characters), what a PACS lists."""
DECISION_VALUES = {"tumor": "Yes", "no tumor": "No", "inconclusive": "Undetermined"}
"""``report.json`` ``patient.decision`` → the value of the "PDAC suspected" evaluation (SCT codes)."""
FITNESS_VALUES = {"passed": "Yes", "failed": "No", "unknown": "Undetermined"}


def _private(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning[:64])


def _concepts() -> dict:
    """The codes the SR uses (built lazily: highdicom is imported only when an SR is written)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return {
        "pdac_suspected": _private("MGP001", "PDAC suspected"),
        "raw_score": _private("MGP002", "Uncalibrated patient score (aggregated slice P(tumor))"),
        "threshold": _private("MGP003", "Decision threshold on the patient score"),
        "slice_p_tumor": _private("MGP004", "Slice P(tumor) (model P(yes), uncalibrated)"),
        "outside_range": _private("MGP005", "Outside the validated range"),
        "slice_p_calibrated": _private("MGP006", "Slice P(tumor), calibrated"),
        "probability": codes.DCM.ProbabilityOfCancer,
        "no_units": hd.sr.CodedConcept("1", "UCUM", "no units"),
        "Yes": codes.SCT.Yes, "No": codes.SCT.No, "Undetermined": codes.SCT.Undetermined,
        "pdac": codes.SCT.AdenocarcinomaOfPancreas,
        "neoplasm": codes.SCT.Neoplasm,
        "pancreas": codes.SCT.Pancreas,
        "procedure": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    }


def fitness_concept(check: str):
    """The private code of one fitness check: a stable value derived from its name."""
    digest = hashlib.sha256(check.encode("utf-8")).hexdigest()[:10].upper()
    return _private(f"FIT{digest}", f"Fitness check passed: {check}")


def box_polyline(box: Mapping[str, Any]) -> np.ndarray:
    """(5, 2) float32 closed rectangle (column, row) around the pixels of a ``report.json`` box
    entry (``voxel_min`` / ``voxel_max``, inclusive; see the module docstring)."""
    c0, r0 = (float(v) for v in box["voxel_min"][:2])
    c1, r1 = (float(v) + 1.0 for v in box["voxel_max"][:2])
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)


def _check_box_on_header(box: Mapping[str, Any], header: Any, where: str) -> None:
    """Refuse a box whose first corner's RAS (``report.json``) is not where the source header
    puts that pixel (ImagePositionPatient + column/row steps, LPS): report and headers of
    different series or orders."""
    corner = box["corners"][0]
    column, row = corner["voxel"][0], corner["voxel"][1]
    iop = np.array([float(v) for v in header.ImageOrientationPatient])
    dy, dx = (float(v) for v in header.PixelSpacing)
    lps = np.array([float(v) for v in header.ImagePositionPatient]) + column * dx * iop[:3] + row * dy * iop[3:]
    ras = np.array([float(v) for v in corner["ras"]])
    found = np.array([-ras[0], -ras[1], ras[2]])
    tolerance = 0.5 * min(dx, dy, float(getattr(header, "SliceThickness", 0) or dx) or dx)
    if np.linalg.norm(found - lps) > max(tolerance, 1e-3):
        raise ValueError(f"{where}: report.json puts pixel ({column}, {row}) at LPS {np.round(found, 3).tolist()} mm, "
                         f"its DICOM header at {np.round(lps, 3).tolist()} mm: report and series do not match")


def _algorithm(report: Mapping[str, Any], software_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    parameters = [f"{c.get('stage', '?')} sha256 {c.get('sha256', '?')}" for c in report.get("checkpoints") or []]
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=software_version or "unknown",
                                         parameters=parameters or None, family=codes.cid7162.ArtificialIntelligence)


def stored_slice(report: Mapping[str, Any], k: int) -> Optional[int]:
    """The stored slice (DICOM header index) of display slice ``k``, or None when display slices
    are not stored slices (``report.json`` ``geometry.display_to_voxel``)."""
    mapping = np.asarray(report["geometry"]["display_to_voxel"])
    if np.count_nonzero(mapping[2, :3]) != 1 or mapping[2, 2] == 0:  # stored axis 2 must be the display slice axis
        return None
    return int((mapping @ np.array([0, 0, int(k), 1]))[2])


def _patient_group(report: Mapping[str, Any], concepts: dict, algorithm: Any, source: Optional[Any]):
    import highdicom as hd

    patient = report.get("patient")
    evaluations, measurements = [], []
    if patient is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(concepts["pdac_suspected"],
                                                       concepts[DECISION_VALUES[patient["decision"]]]))
        likelihood = patient.get("likelihood") or {}
        raw = likelihood.get("raw", patient.get("score"))
        if raw is not None:
            measurements.append(hd.sr.Measurement(concepts["raw_score"], float(raw), concepts["no_units"]))
        if likelihood.get("calibrated") is not None:
            measurements.append(hd.sr.Measurement(concepts["probability"], float(likelihood["calibrated"]),
                                                  concepts["no_units"]))
        if patient.get("threshold") is not None:
            measurements.append(hd.sr.Measurement(concepts["threshold"], float(patient["threshold"]),
                                                  concepts["no_units"]))
    for entry in report.get("fitness") or []:
        status = str(entry.get("status"))
        if status in FITNESS_VALUES:
            evaluations.append(hd.sr.QualitativeEvaluation(fitness_concept(str(entry.get("check"))),
                                                           concepts[FITNESS_VALUES[status]]))
    if isinstance(report.get("outside_validated_range"), bool):
        evaluations.append(hd.sr.QualitativeEvaluation(
            concepts["outside_range"], concepts["Yes" if report["outside_validated_range"] else "No"]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=PATIENT_GROUP, uid=_uid(report, "patient")),
        finding_type=concepts["pdac"], finding_sites=[hd.sr.FindingSite(concepts["pancreas"])],
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=None if source is None else [hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def _uid(report: Mapping[str, Any], what: str) -> str:
    from pydicom.uid import generate_uid

    content = to_json([report.get("volume"), report.get("patient"), report.get("checkpoints"),
                       [s.get("slice") for s in report.get("slices", [])], report.get("fitness")], sort_keys=True)
    return generate_uid(entropy_srcs=[content, what])


def write_dicom_sr(path: str | os.PathLike, report: Mapping[str, Any], source_headers: Sequence[Any],
                   seg: Optional[Any] = None, software_version: str = "") -> Path:
    """Write ``sr.dcm`` (see the module docstring). Atomic.

    Args:
        report: the volume's ``report.json`` content (:func:`~minigpt4.scan_outputs.build_report`
            plus what other steps add: ``patient.likelihood``, ``fitness``,
            ``outside_validated_range``; absent keys are left out of the SR).
        source_headers: the series' headers as :func:`~minigpt4.scan_outputs.read_dicom_source`
            returns them (header ``k`` = stored slice ``k``).
        seg: the scan's SEG as a pydicom Dataset (e.g. ``dcmread(seg.dcm, stop_before_pixels=True)``),
            or None when none was written (no box).
        software_version: the algorithm's version; the installed minigpt-pancreas version when empty.

    Raises:
        ValueError: the report does not fit the headers (slice count, a box's position), or the
            series has no StudyInstanceUID / SeriesInstanceUID to reference.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes

    software_version = software_version or installed_version()
    headers = [source_header(h) for h in source_headers]
    shape = report["geometry"]["shape"]
    first = headers[0]
    if list(shape) != [int(first.Columns), int(first.Rows), len(headers)]:
        raise ValueError(f"report.json geometry {shape} is not that of the DICOM series "
                         f"({first.Columns} columns x {first.Rows} rows x {len(headers)} slices)")
    for name in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not str(getattr(first, name, "") or ""):
            raise ValueError(f"the DICOM series has no {name} (anonymised?), so a structured report cannot "
                             "reference it or be filed in its study")
    concepts = _concepts()
    algorithm = _algorithm(report, software_version)
    suspicious = report.get("most_suspicious_slice")
    k_source = None if suspicious is None else stored_slice(report, suspicious)
    groups: list = [_patient_group(report, concepts, algorithm, None if k_source is None else headers[k_source])]
    if seg is not None:
        groups += _segment_groups(report, seg, first, concepts, algorithm)
    for row in report.get("slices", []):
        box = row.get("tumor_box")
        if box is None:
            continue
        k = int(box["voxel_min"][2])
        if k != int(box["voxel_max"][2]):
            raise ValueError(f"slice {row['slice']}: the display slice is not a stored slice of the series")
        _check_box_on_header(box, headers[k], f"slice {row['slice']}")
        region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box_polyline(box),
                                   source_image=hd.sr.SourceImageForRegion.from_source_image(headers[k]))
        measurements = [hd.sr.Measurement(concepts[name], float(row[key]), concepts["no_units"])
                        for key, name in (("p_tumor", "slice_p_tumor"), ("p_tumor_calibrated", "slice_p_calibrated"))
                        if row.get(key) is not None]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"tumor box, slice {row['slice']}",
                                                         uid=_uid(report, f"tumor {row['slice']}")),
            referenced_region=region, finding_type=concepts["neoplasm"],
            finding_sites=[hd.sr.FindingSite(concepts["pancreas"])], algorithm_id=algorithm,
            measurements=measurements or None))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid({"volume": ALGORITHM_NAME, "checkpoints": report.get("checkpoints")}, "device"),
            name=ALGORITHM_NAME, manufacturer_name="MiniGPT-Pancreas", model_name=ALGORITHM_NAME))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=concepts["procedure"], imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport)
    evidence = list(headers) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content,
        series_instance_uid=_uid(report, "sr series"), series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 2000,
        sop_instance_uid=_uid(report, "sr instance"), instance_number=1,
        manufacturer="MiniGPT-Pancreas", series_description=SERIES_DESCRIPTION,
        is_complete=True, is_final=False, is_verified=False)
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "MiniGPT-Pancreas private codes"
    item.CodingSchemeResponsibleOrganization = "MiniGPT-Pancreas project"
    sr.CodingSchemeIdentificationSequence = DicomSequence([item])
    with atomic_path(path) as tmp:
        sr.save_as(str(tmp), enforce_file_format=True)
    return Path(path)


def _segment_groups(report: Mapping[str, Any], seg: Any, first: Any, concepts: dict, algorithm: Any) -> list:
    """One TID 1411 group per segment of ``seg`` that has frames, referencing that segment and
    the source series."""
    import highdicom as hd

    used = {int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for item in getattr(seg, "PerFrameFunctionalGroupsSequence", [])}
    groups = []
    for description in seg.SegmentSequence:
        number = int(description.SegmentNumber)
        if number not in used:
            continue
        label = str(description.SegmentLabel)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"SEG segment {number}: {label}",
                                                         uid=_uid(report, f"segment {number}")),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(str(first.SeriesInstanceUID))),
            finding_type=concepts["neoplasm"] if "tumor" in label else concepts["pancreas"],
            algorithm_id=algorithm))
    return groups
