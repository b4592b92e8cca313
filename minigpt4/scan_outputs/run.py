"""Across volumes: one volume's folder as a unit (written, marked done, skipped when done),
``summary.csv``, ``scan.json`` and content fingerprints.

A volume folder ``<out>/<volume>/`` holds either its outputs plus ``done.json`` (the
fingerprint of what produced them and the files written), or ``error.json`` (why it failed).
``done.json`` is written last, so a folder interrupted mid-way is never taken as done.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pydicom

from minigpt4.inference.pipeline import VolumeResult
from minigpt4.identity import CheckpointIdentity, content_sha256, package_versions
from minigpt4.inference.geometry import VolumeGeometry
from minigpt4.io import to_json, write_json_atomic, write_text_atomic
from minigpt4.scan_outputs.html import REPORT_HTML, write_report_html
from minigpt4.scan_outputs.sr import write_dicom_sr
from minigpt4.scan_outputs.volume_files import (
    build_report,
    write_box_nifti,
    write_dicom_seg,
    write_montage,
    write_report,
)

DONE_FILE = "done.json"
ERROR_FILE = "error.json"
REPORT_FILE, BOXES_FILE, SEG_FILE, MONTAGE_FILE = "report.json", "boxes.nii.gz", "seg.dcm", "montage.png"
SR_FILE = "sr.dcm"
VOLUME_FILES = (REPORT_FILE, BOXES_FILE, SEG_FILE, MONTAGE_FILE, SR_FILE, REPORT_HTML)
SUMMARY_COLUMNS = ("volume", "decision", "score", "likelihood", "outside_validated_range", "failed_checks", "n_slices",
                   "n_boxed", "most_suspicious_slice", "error")
"""``score``: the raw patient score; ``likelihood``: the calibrated one (empty without a map: the
score is uncalibrated); ``outside_validated_range``: true / false (empty: not recorded);
``failed_checks``: the failed fitness checks, ``;``-separated."""
SCAN_FORMAT = "minigpt-pancreas-scan/1"


# ----------------------------------------------------------------------------- content hashes


def fingerprint(inputs: Sequence[str | os.PathLike], checkpoints: Sequence[CheckpointIdentity],
                cfg: Mapping[str, Any]) -> str:
    """What decides a volume's outputs, as one SHA-256 hex string.

    Args:
        inputs: the volume's input files or folders (a NIfTI file, a DICOM folder, a zip);
            their content counts, not their location.
        checkpoints: the stages' identities (their sha256s count, not their paths).
        cfg: the config values that change the outputs (threshold, aggregation, normalisation,
            decoding, ...), JSON-serialisable.
    """
    payload = {
        "inputs": [content_sha256(p) for p in inputs],
        "checkpoints": sorted([c.stage, c.sha256] for c in checkpoints),
        "config": cfg,
    }
    try:
        text = to_json(payload, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the scan config is not plain JSON data ({err})") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_marker(out_dir: Path) -> Optional[dict]:
    try:
        marker = json.loads((out_dir / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_done(out_dir: str | os.PathLike, fingerprint: str) -> bool:
    """True when ``out_dir`` holds a complete output of the same fingerprint: ``done.json`` is
    readable, its fingerprint equals ``fingerprint`` and every file it lists exists."""
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if marker is None or marker.get("fingerprint") != fingerprint or not isinstance(marker.get("files"), list):
        return False
    return all((out_dir / name).is_file() for name in marker["files"])


def mark_done(out_dir: str | os.PathLike, fingerprint: str, files: Sequence[str]) -> Path:
    """Write ``done.json`` (``{"fingerprint", "files"}``) last, atomically."""
    path = Path(out_dir) / DONE_FILE
    write_json_atomic(path, {"fingerprint": fingerprint, "files": sorted(files)})
    return path


def _start_volume(out_dir: Path) -> set[str]:
    """Unmark a volume folder before (re)writing it; returns the names of the output files a
    previous run may have left (this module's names and those its ``done.json`` lists)."""
    marker = _read_marker(out_dir) or {}
    listed = marker.get("files", []) if isinstance(marker.get("files"), list) else []
    previous = {str(n) for n in listed if isinstance(n, str) and Path(n).name == n and n not in ("", ".", "..")}
    for name in (DONE_FILE, ERROR_FILE):
        (out_dir / name).unlink(missing_ok=True)
    return previous | set(VOLUME_FILES)


def write_volume_outputs(out_dir: str | os.PathLike, *, volume: str, source: str, geometry: VolumeGeometry,
                         result: VolumeResult, checkpoints: Sequence[CheckpointIdentity], fingerprint: str,
                         slices: Any = None, dicom_headers: Optional[Sequence[Any]] = None,
                         montage_size: int = 8, software_version: str = "",
                         extra: Optional[dict] = None, fitness: Optional[Sequence[dict]] = None,
                         calibration: Any = None, slice_calibration: Any = None) -> list[str]:
    """Write one volume's files into ``out_dir`` and mark it done.

    ``result`` is what :func:`minigpt4.inference.pipeline.scan_slices` returned (``patient`` None:
    no patient answer, e.g. one checkpoint for every stage).

    ``fitness``, ``calibration`` and ``slice_calibration`` go into ``report.json``
    (:func:`~minigpt4.scan_outputs.volume_files.build_report`).
    Writes ``report.json``, ``boxes.nii.gz`` and ``report.html`` always; ``seg.dcm`` when
    ``dicom_headers`` (the source series, :func:`~minigpt4.scan_outputs.read_dicom_source`) are
    given and a slice has a box; ``sr.dcm`` (:func:`~minigpt4.scan_outputs.sr.write_dicom_sr`)
    for every DICOM input; ``montage.png`` when ``slices`` (display slice ``k`` → (H, W) uint8)
    are given and a slice has a P(tumor). An SR that cannot be written costs only the SR:
    ``report.json`` ``structured_report`` says why (``{"file": null, "error": ...}``; written:
    ``{"file": "sr.dcm", "error": null}``; no DICOM input: the key is null) and the other files
    are written. Output files of a previous run that this one does not rewrite are removed;
    ``done.json`` comes last. Any other failure leaves the folder unmarked (never half-written files).

    Returns:
        The names of the files written (without ``done.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _start_volume(out_dir)
    results = result.slices
    report = build_report(volume, source, geometry, result.patient, results, checkpoints, extra, fitness=fitness,
                          calibration=calibration, slice_calibration=slice_calibration)
    written = [write_box_nifti(out_dir / BOXES_FILE, geometry, results).name]
    seg = None
    if dicom_headers is not None:
        seg = write_dicom_seg(out_dir / SEG_FILE, geometry, results, dicom_headers, checkpoints, software_version)
        if seg is not None:
            written.append(seg.name)
    if slices is not None:
        montage = write_montage(out_dir / MONTAGE_FILE, slices, results, n=montage_size)
        if montage is not None:
            written.append(montage.name)
    if dicom_headers is not None:
        report["structured_report"] = _write_sr(out_dir / SR_FILE, report, dicom_headers, seg, software_version)
        if report["structured_report"]["file"]:
            written.append(SR_FILE)
    else:
        report["structured_report"] = None
    written.insert(0, write_report(out_dir / REPORT_FILE, report).name)
    montage_path = out_dir / MONTAGE_FILE if MONTAGE_FILE in written else None
    written.append(write_report_html(out_dir / REPORT_HTML, report, montage_path,
                                     files=[name for name in written if name != MONTAGE_FILE]).name)
    for name in previous - set(written):
        (out_dir / name).unlink(missing_ok=True)
    mark_done(out_dir, fingerprint, written)
    return written


def _write_sr(path: Path, report: dict, dicom_headers: Sequence[Any], seg: Optional[Path],
              software_version: str) -> dict:
    """Write ``sr.dcm``; returns the ``structured_report`` entry of ``report.json``. Any failure
    is recorded there instead of failing the volume: the answer and the other files stand."""
    try:
        seg_dataset = None if seg is None else pydicom.dcmread(str(seg), stop_before_pixels=True)
        write_dicom_sr(path, report, dicom_headers, seg_dataset, software_version)
    except Exception as err:  # noqa: BLE001 - highdicom raises many kinds; the SR alone is lost
        path.unlink(missing_ok=True)
        message = f"{type(err).__name__}: {err}"
        print(f"warning: {report.get('volume')}: {SR_FILE} not written: {message}", file=sys.stderr)
        return {"file": None, "error": message}
    return {"file": SR_FILE, "error": None}


def write_volume_error(out_dir: str | os.PathLike, volume: str, message: str) -> Path:
    """Record a failed volume (``error.json``: ``{"volume", "error"}``) and unmark its folder;
    the files of an earlier successful run are removed so they cannot be mistaken for this one's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _start_volume(out_dir):
        (out_dir / name).unlink(missing_ok=True)
    path = out_dir / ERROR_FILE
    write_json_atomic(path, {"volume": volume, "error": str(message)})
    return path


# ----------------------------------------------------------------------------- summary.csv


def summary_row(report: Mapping[str, Any]) -> dict:
    """A ``summary.csv`` row from a ``report.json`` dict."""
    patient = report["patient"] or {"decision": None, "score": None}
    likelihood = patient.get("likelihood") or {}
    fitness = report.get("fitness")
    outside = report.get("outside_validated_range")
    return {"volume": report["volume"], "decision": patient["decision"], "score": patient["score"],
            "likelihood": likelihood.get("calibrated"),
            "outside_validated_range": None if outside is None else str(bool(outside)).lower(),
            "failed_checks": None if fitness is None else ";".join(c["check"] for c in fitness if c["status"] == "failed"),
            "n_slices": report["counts"]["n_slices"], "n_boxed": report["counts"]["n_boxed"],
            "most_suspicious_slice": report["most_suspicious_slice"], "error": None}


def error_row(volume: str, message: str) -> dict:
    return {**{key: None for key in SUMMARY_COLUMNS}, "volume": volume, "error": str(message)}


def collect_summary(out_root: str | os.PathLike, volumes: Sequence[str]) -> list[dict]:
    """Summary rows of ``volumes`` (sorted by name) from their folders under ``out_root``: the
    ``report.json`` of a folder marked done, else its ``error.json``, else an error saying it
    has no complete output. What rank 0 calls after the ranks have written their volumes."""
    rows = []
    for volume in sorted(volumes):
        folder = Path(out_root) / volume
        marker = _read_marker(folder)
        if marker is not None and REPORT_FILE in marker.get("files", []) and (folder / REPORT_FILE).is_file():
            rows.append(summary_row(json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))))
        elif (folder / ERROR_FILE).is_file():
            rows.append(error_row(volume, json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))["error"]))
        else:
            rows.append(error_row(volume, f"no complete output in {folder}"))
    return rows


def write_summary(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``summary.csv``: a header of :data:`SUMMARY_COLUMNS` and one row per volume (None → empty
    cell; scores with full precision). Atomic."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in SUMMARY_COLUMNS})
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------- scan.json


def write_scan_json(path: str | os.PathLike, config: Mapping[str, Any], checkpoints: Sequence[CheckpointIdentity],
                    rows: Sequence[Mapping[str, Any]], extra: Optional[dict] = None) -> Path:
    """``scan.json``: ``{format, config, versions, checkpoints, counts, ...extra}``; counts from
    the summary rows (volumes, failed, and per decision). Strict JSON, atomic."""
    decisions: dict[str, int] = {}
    for row in rows:
        if not row.get("error"):
            decisions[str(row["decision"])] = decisions.get(str(row["decision"]), 0) + 1
    scan = {"format": SCAN_FORMAT, "config": dict(config), "versions": package_versions(),
            "checkpoints": [c.as_dict() for c in checkpoints],
            "counts": {"volumes": len(rows), "failed": sum(bool(r.get("error")) for r in rows),
                       "decisions": dict(sorted(decisions.items()))}}
    for key, value in (extra or {}).items():
        if key in scan:
            raise ValueError(f"extra scan.json key {key!r} would replace a standard one")
        scan[key] = value
    write_json_atomic(path, scan)
    return Path(path)


# ----------------------------------------------------------------------------- sharding


