"""What a clinician and a PACS get from a scan (issue 28 items 4-6): ``sr.dcm`` (DICOM SR, TID 1500)
read back with highdicom and pydicom and validated with dciodvfy, ``report.html`` / ``index.html``
opened in headless Chromium, both with and without the keys the calibration step adds to
``report.json`` (``patient.likelihood``, ``fitness``, ``outside_validated_range``).

The DICOM series is written here (``write_ct_series``: display slice ``k`` = stored slice ``k``,
columns = display x, rows = display y), so a box's DICOM image coordinates are hand-computed:
inclusive pixels ``x1..x2``, ``y1..y2`` → the rectangle ``(x1, y1) (x2+1, y1) (x2+1, y2+1) (x1, y2+1)``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from minigpt4.inference.pipeline import VolumeResult
from minigpt4.scan_outputs import REPORT_FILE, SEG_FILE, build_report, read_dicom_source, write_volume_outputs
from minigpt4.scan_outputs.html import (
    INDEX_HTML,
    NOT_MEDICAL_DEVICE,
    REPORT_HTML,
    decision_text,
    fitness_text,
    likelihood_text,
    render_report_html,
    without_paths,
    write_index_html,
)
from minigpt4.scan_outputs.run import SR_FILE
from minigpt4.scan_outputs.sr import box_polyline, write_dicom_sr
from tests._phantoms import SHARED_DATA, small_volume
from tests.test_demo_e2e import CHROMIUM, browser_page
from tests.test_scan_outputs import CHECKPOINTS, patient, results_on, write_ct_series

DCIODVFY = shutil.which("dciodvfy")
LIKELIHOOD = {"raw": 0.9, "calibrated": 0.62, "calibration": {"method": "platt", "fitted_on": "val (40 volumes)"}}
FITNESS = [
    {"check": "modality", "status": "passed", "values": {"Modality": "CT"}, "reason": "CT"},
    {"check": "slice thickness", "status": "failed", "values": {"SliceThickness": 5.0}, "reason": "above 3 mm"},
    {"check": "contrast phase", "status": "unknown", "values": {}, "reason": "no ContrastBolusAgent tag"},
]


def calibrated(report: dict) -> dict:
    """``report`` with the keys the calibration step adds (CONTRACTS.md)."""
    report = json.loads(json.dumps(report))
    report["patient"]["likelihood"] = dict(LIKELIHOOD)
    report["fitness"] = [dict(c) for c in FITNESS]
    report["outside_validated_range"] = True
    for row in report["slices"]:  # the slice map's P(tumor), as the calibration step records it
        row["p_tumor_calibrated"] = None if row["p_tumor"] is None else round(row["p_tumor"] * 0.5, 6)
    return report


def dicom_scan(folder: Path, decision: str = "tumor", score: float = 0.9, row_direction=(1.0, 0.0, 0.0)):
    """A 5-slice 12 x 14 CT series under ``folder/ct`` and the pipeline's answers on it: slice 1
    a pancreas box, slice 3 a pancreas and a tumor box (4, 5, 6, 8), P(tumor) 0.2 and 0.9."""
    hu, _ = small_volume(h=12, w=14, s=5)
    (folder / "ct").mkdir(parents=True)
    uids = write_ct_series(folder / "ct", hu, row_direction=row_direction)
    geometry, headers = read_dicom_source(folder / "ct")
    make = results_on(14, 12)
    results = [make(0, None), make(1, 0.2, pancreas_box=(2, 3, 9, 7)),
               make(3, 0.9, pancreas_box=(1, 1, 12, 10), tumor_box=(4, 5, 6, 8))]
    slices = np.clip(hu.transpose(2, 0, 1) + 200, 0, 255).astype(np.uint8)
    return uids, geometry, headers, VolumeResult(results, patient(decision, score, boxed=2)), slices


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


# ----------------------------------------------------------------------------- sr.dcm


def write_sr_pair(tmp_path: Path, with_keys: bool):
    """The scan's files for the series (via write_volume_outputs), then the SR of ``report.json``
    (plus the calibration keys when ``with_keys``) written again by write_dicom_sr."""
    uids, geometry, headers, result, slices = dicom_scan(tmp_path)
    out = tmp_path / "out" / "case"
    source = str((tmp_path / "ct").resolve())  # an absolute, private path: it must not reach the SR
    write_volume_outputs(out, volume="case", source=source, geometry=geometry, result=result,
                         checkpoints=CHECKPOINTS, fingerprint="f" * 64, slices=slices, dicom_headers=headers)
    report = json.loads((out / REPORT_FILE).read_text())
    if with_keys:
        report = calibrated(report)
        write_dicom_sr(out / SR_FILE, report, headers, pydicom.dcmread(out / SEG_FILE, stop_before_pixels=True))
    return uids, headers, out, report


def text_items(group, meaning: str) -> list[str]:
    """The TEXT values of a measurement group's items named ``meaning`` (pydicom attributes)."""
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _groups(sr):
    import highdicom as hd

    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr.content


@pytest.mark.parametrize("with_keys", [True, False])
def test_sr_holds_the_finding_the_regions_and_the_references(tmp_path, with_keys):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    uids, headers, out, report = write_sr_pair(tmp_path, with_keys)
    assert report["structured_report"] == {"file": SR_FILE, "error": None}
    sr = hd.sr.srread(out / SR_FILE)
    content = _groups(sr)
    seg = pydicom.dcmread(out / SEG_FILE)

    # references: every image of the source series and the SEG, in the evidence
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == headers[0].StudyInstanceUID == sr.StudyInstanceUID
    evidence = {s.SeriesInstanceUID: sorted(i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence)
                for s in study.ReferencedSeriesSequence}
    assert evidence == {headers[0].SeriesInstanceUID: sorted(uids), seg.SeriesInstanceUID: [seg.SOPInstanceUID]}
    assert sr.PatientID == headers[0].PatientID and sr.Modality == "SR"
    assert sr.SeriesDescription == "MiniGPT-Pancreas SR (research prototype, not a medical device)"

    # the SEG's two segments, each a volumetric group on the source series
    volumetric = content.get_volumetric_roi_measurement_groups()
    assert [(g.referenced_segment.referenced_sop_instance_uid, g.referenced_segment.referenced_segment_numbers)
            for g in volumetric] == [(seg.SOPInstanceUID, [1]), (seg.SOPInstanceUID, [2])]
    assert {g.referenced_segment.source_series_for_segmentation.value for g in volumetric} == {headers[0].SeriesInstanceUID}

    # the one tumor box: an image region on slice 3's image, hand-computed, with its P(tumor)
    (planar,) = content.get_planar_roi_measurement_groups()
    region = planar.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert region.value.tolist() == [[4, 5], [7, 5], [7, 9], [4, 9], [4, 5]]
    tumor_row = next(row for row in report["slices"] if row["tumor_box"] is not None)
    assert region.value.tolist() == box_polyline(tumor_row["tumor_box"]).tolist()
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uids[3]  # SELECTED FROM
    p_tumor = {m.name.meaning: m.value for m in planar.get_measurements()}
    assert p_tumor.pop("Slice P(tumor) (model P(yes), uncalibrated)") == tumor_row["p_tumor"] == 0.9
    assert p_tumor == ({"Slice P(tumor), calibrated": 0.45} if with_keys else {})
    assert tumor_row.get("p_tumor_calibrated") == (0.45 if with_keys else None)

    # the patient-level finding, its scores, the algorithm and (where recorded) the fitness checks
    (finding,) = content.get_image_measurement_groups()
    assert finding.finding_type == codes.SCT.AdenocarcinomaOfPancreas
    (source,) = finding.source_images  # the most suspicious slice's image
    assert report["most_suspicious_slice"] == 3 and source.referenced_sop_instance_uid == uids[3]
    evaluations = {e.name.meaning: e.value.meaning for e in finding.get_qualitative_evaluations()}
    measurements = {m.name.meaning: m.value for m in finding.get_measurements()}
    assert evaluations["PDAC suspected"] == "Yes"
    assert measurements["Uncalibrated patient score (aggregated slice P(tumor))"] == report["patient"]["score"] == 0.9
    assert measurements["Decision threshold on the patient score"] == report["patient"]["threshold"]
    assert text_items(finding, "Algorithm Name") == ["MiniGPT-Pancreas cascade"]
    assert text_items(finding, "Algorithm Parameters") == [f"{c.stage} sha256 {c.sha256}" for c in CHECKPOINTS]
    assert text_items(planar, "Algorithm Name") == ["MiniGPT-Pancreas cascade"]
    if with_keys:
        assert measurements["Probability of cancer"] == report["patient"]["likelihood"]["calibrated"] == 0.62
        assert {k: v for k, v in evaluations.items() if k.startswith("Fitness")} == {
            "Fitness check passed: modality": "Yes", "Fitness check passed: slice thickness": "No",
            "Fitness check passed: contrast phase": "Undetermined"}
        assert evaluations["Outside the validated range"] == "Yes"
    else:  # no calibration map: the score is never called a probability; no checks recorded
        assert "Probability of cancer" not in measurements
        assert set(evaluations) == {"PDAC suspected", "Algorithm Family"}  # highdicom lists the family too

    # read by pydicom alone: the private coding scheme is declared; no private path anywhere
    raw = pydicom.dcmread(out / SR_FILE)
    assert raw.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MGP"
    data = (out / SR_FILE).read_bytes()
    assert str(tmp_path).encode() not in data and report["source"].encode() not in data


def test_sr_region_of_a_series_stored_right_to_left(tmp_path):
    """Rows pointing to the patient's right (tests/test_scan_outputs.py): display column x is DICOM
    column 13 - x, and display slice 3 is the written slice 1. The tumor box (4, 5, 6, 8) on
    display slice 3 covers DICOM columns 7..9, rows 5..8 of the image written as slice 1."""
    import highdicom as hd

    uids, geometry, headers, result, _ = dicom_scan(tmp_path, row_direction=(-1.0, 0.0, 0.0))
    report = build_report("case", "case", geometry, result.patient, result.slices, CHECKPOINTS)
    write_dicom_sr(tmp_path / SR_FILE, report, headers)
    (planar,) = hd.sr.srread(tmp_path / SR_FILE).content.get_planar_roi_measurement_groups()
    assert planar.roi.value.tolist() == [[7, 5], [10, 5], [10, 9], [7, 9], [7, 5]]
    assert planar.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uids[1]


@pytest.mark.parametrize("decision, value", [("no tumor", "No"), ("inconclusive", "Undetermined")])
def test_sr_finding_of_other_decisions(tmp_path, decision, value):
    import highdicom as hd

    uids, geometry, headers, result, _ = dicom_scan(tmp_path, decision, 0.1)
    report = build_report("case", "case", geometry, result.patient, result.slices, CHECKPOINTS)
    # the keys as the calibration step writes them when nothing was recorded: null
    report.update(fitness=None, outside_validated_range=None)
    report["patient"]["likelihood"] = (None if decision == "inconclusive" else
                                       {"raw": 0.1, "calibrated": None, "calibration": None})
    write_dicom_sr(tmp_path / SR_FILE, report, headers)  # no SEG
    content = hd.sr.srread(tmp_path / SR_FILE).content
    (finding,) = content.get_image_measurement_groups()
    assert {e.name.meaning: e.value.meaning for e in finding.get_qualitative_evaluations()} == {
        "PDAC suspected": value, "Algorithm Family": "Artificial Intelligence"}
    names = [m.name.meaning for m in finding.get_measurements()]
    assert ("Uncalibrated patient score (aggregated slice P(tumor))" in names) == (decision != "inconclusive")
    assert "Probability of cancer" not in names
    assert content.get_volumetric_roi_measurement_groups() == []  # no SEG given, none referenced
    assert len(content.get_planar_roi_measurement_groups()) == 1  # the tumor box is still a region


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian package dicom3tools)")
@pytest.mark.parametrize("with_keys", [True, False])
def test_sr_and_seg_pass_dciodvfy(tmp_path, with_keys):
    _, _, out, _ = write_sr_pair(tmp_path, with_keys)
    assert dciodvfy_errors(out / SR_FILE) == []
    assert dciodvfy_errors(out / SEG_FILE) == []


def test_sr_refuses_a_report_of_another_series(tmp_path):
    uids, geometry, headers, result, _ = dicom_scan(tmp_path)
    report = build_report("case", "case", geometry, result.patient, result.slices, CHECKPOINTS)
    with pytest.raises(ValueError, match="report and series do not match"):
        write_dicom_sr(tmp_path / SR_FILE, report, headers[::-1])
    with pytest.raises(ValueError, match="not that of the DICOM series"):
        write_dicom_sr(tmp_path / SR_FILE, report, headers[:4])
    assert not (tmp_path / SR_FILE).exists()


def test_an_sr_that_fails_costs_only_the_sr(tmp_path, monkeypatch):
    """The SR's failure is stated in report.json; the answer and the other files are written and
    the volume is marked done."""
    from minigpt4.scan_outputs import is_done, run

    uids, geometry, headers, result, slices = dicom_scan(tmp_path)

    def fail(*args, **kwargs):
        raise ValueError("no Frame of Reference in header 3")

    monkeypatch.setattr(run, "write_dicom_sr", fail)
    written = write_volume_outputs(tmp_path / "v", volume="v", source="v", geometry=geometry, result=result,
                                   checkpoints=CHECKPOINTS, fingerprint="f" * 64, slices=slices, dicom_headers=headers)
    assert written == [REPORT_FILE, "boxes.nii.gz", SEG_FILE, "montage.png", REPORT_HTML]
    report = json.loads((tmp_path / "v" / REPORT_FILE).read_text())
    assert report["structured_report"] == {"file": None, "error": "ValueError: no Frame of Reference in header 3"}
    assert report["patient"]["decision"] == "tumor" and is_done(tmp_path / "v", "f" * 64)
    assert not (tmp_path / "v" / SR_FILE).exists()
    assert "sr.dcm could not be written: ValueError: no Frame of Reference" in (tmp_path / "v" / REPORT_HTML).read_text()


# ----------------------------------------------------------------------------- words


def test_words_with_and_without_the_calibration_keys(tmp_path):
    _, geometry, _, result, _ = dicom_scan(tmp_path)
    plain = build_report("case", "case", geometry, result.patient, result.slices, CHECKPOINTS)
    # the cascade's verdict line where report.json records it (issue 25.5), else the page's own words
    assert plain["patient"]["verdict"].startswith("tumor suspected on the 2 slice(s) where a pancreas was found")
    assert decision_text(plain) == plain["patient"]["verdict"][0].upper() + plain["patient"]["verdict"][1:] + "."
    without_verdict = json.loads(json.dumps(plain))
    del without_verdict["patient"]["verdict"]
    # (the fixture's patient records 3 assessed slices: report.json's "assessed" is what the page counts)
    assert decision_text(without_verdict) == ("Pancreatic tumor (PDAC) suspected. A pancreas was found and assessed "
                                              "on 2 of 3 slices.")
    # build_report records the likelihood (no map here); a report of an older scan has no such key
    assert likelihood_text(plain) == "Uncalibrated score 0.900 (not a probability: no calibration map was given)."
    older = json.loads(json.dumps(plain))
    del older["patient"]["likelihood"]
    assert likelihood_text(older) == ("Likelihood: not recorded; uncalibrated score 0.900 (not a probability: no "
                                      "calibration map was given).")
    assert fitness_text(plain) == "Fitness checks: not recorded."
    # the calibration step writes the keys as null where nothing was recorded: the same words
    nulls = {**plain, "fitness": None, "outside_validated_range": None,
             "patient": {**plain["patient"], "likelihood": {"raw": 0.9, "calibrated": None, "calibration": None}}}
    assert fitness_text(nulls) == "Fitness checks: not recorded."
    assert likelihood_text(nulls) == "Uncalibrated score 0.900 (not a probability: no calibration map was given)."
    full = calibrated(plain)
    assert likelihood_text(full) == "Calibrated likelihood 62 % (platt, fitted on val (40 volumes)); raw score 0.900."
    assert fitness_text(full) == ("Fitness checks: OUTSIDE THE VALIDATED RANGE (the answer is given, but this scan is "
                                  "unlike the training data); failed: slice thickness; could not be checked: contrast phase.")
    # a likelihood recorded without a map: still no percentage
    full["patient"]["likelihood"] = {"raw": 0.9, "calibrated": None, "calibration": None}
    assert likelihood_text(full) == "Uncalibrated score 0.900 (not a probability: no calibration map was given)."
    assert "%" not in likelihood_text(full)
    negative = build_report("c", "c", geometry, patient("no tumor", 0.1, boxed=2, total=5), result.slices, CHECKPOINTS)
    # the cascade's verdict line (issue 25.5) says how much was assessed
    assert decision_text(negative) == "No tumor found on the 2 slice(s) where a pancreas was found (2 of 5 slice(s))."
    del negative["patient"]["verdict"], negative["assessed"]  # a report without them: counted from the slices
    assert decision_text(negative) == ("No tumor found on the 2 slices where a pancreas was found (of 5); the rest of "
                                       "the volume was not assessed.")
    negative["assessed"] = {"slices_with_pancreas": 14, "slices_total": 80}  # issue 25.5's key wins where present
    assert decision_text(negative).startswith("No tumor found on the 14 slices where a pancreas was found (of 80)")
    negative["patient"]["verdict"] = "no tumor found on the 14 slice(s) where a pancreas was found (14 of 80 slice(s))"
    assert decision_text(negative) == "No tumor found on the 14 slice(s) where a pancreas was found (14 of 80 slice(s))."
    inconclusive = build_report("c", "c", geometry, patient("inconclusive", 0.0, boxed=2, total=5), result.slices,
                                CHECKPOINTS)
    del inconclusive["patient"]["verdict"], inconclusive["assessed"]
    assert decision_text(inconclusive).startswith("Inconclusive: a pancreas was found on only 2 of 5 slices")
    assert likelihood_text(inconclusive) == "No likelihood: there is no patient-level score."
    inconclusive["patient"]["verdict"] = "inconclusive: a pancreas was found on 2 of 5 slice(s), fewer than the 3 needed"
    assert decision_text(inconclusive) == ("Inconclusive: a pancreas was found on 2 of 5 slice(s), fewer than the 3 "
                                           "needed. This is not a negative result.")


def test_without_paths_keeps_names_only():
    assert without_paths("/home/ana/ct/case7.nii.gz: not gzip") == "case7.nii.gz: not gzip"
    assert without_paths(r"C:\Users\ana\case7.zip: bad zip") == "case7.zip: bad zip"
    assert without_paths("no complete output in /srv/scans/out/v7") == "no complete output in v7"
    assert without_paths("P(tumor) 0.9 of 1/2 slices") == "P(tumor) 0.9 of 1/2 slices"


def test_page_is_self_contained_and_names_no_private_path(tmp_path):
    uids, geometry, headers, result, slices = dicom_scan(tmp_path)
    source = str((tmp_path / "ct").resolve())
    write_volume_outputs(tmp_path / "out" / "case", volume="case", source=source, geometry=geometry, result=result,
                         checkpoints=CHECKPOINTS, fingerprint="f" * 64, slices=slices, dicom_headers=headers)
    page = (tmp_path / "out" / "case" / REPORT_HTML).read_text()
    assert source not in page and str(tmp_path) not in page and "ckpt/stage1" not in page
    for needle in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert needle not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("data:image/png;base64,") == 1  # the montage, inline
    assert all(c.sha256 in page for c in CHECKPOINTS)
    for name in (REPORT_FILE, "boxes.nii.gz", SEG_FILE, SR_FILE):
        assert f'<a href="{name}">' in page
    assert NOT_MEDICAL_DEVICE in page


# ----------------------------------------------------------------------------- in the browser


def _rendered(page) -> tuple[str, np.ndarray]:
    text = page.inner_text("body")
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")).astype(float)
    requested = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert [url for url in requested if not url.startswith("data:")] == []  # nothing fetched
    return text, shot


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs Debian's chromium at /usr/bin/chromium")
def test_report_and_index_pages_in_chromium(tmp_path):
    pytest.importorskip("playwright")
    uids, geometry, headers, result, slices = dicom_scan(tmp_path)
    out = tmp_path / "out"
    kwargs = dict(geometry=geometry, result=result, checkpoints=CHECKPOINTS, fingerprint="f" * 64, slices=slices,
                  dicom_headers=headers)
    write_volume_outputs(out / "plain", volume="plain", source=str(tmp_path / "ct"), **kwargs)
    # the calibrated volume's page, as scan.py writes it once report.json carries the calibration keys
    report = calibrated(json.loads((out / "plain" / REPORT_FILE).read_text()))
    report["volume"] = "calibrated"
    (out / "calibrated").mkdir()
    (out / "calibrated" / REPORT_FILE).write_text(json.dumps(report))
    (out / "calibrated" / REPORT_HTML).write_text(
        render_report_html(report, (out / "plain" / "montage.png").read_bytes(), [REPORT_FILE]))
    (out / "broken").mkdir()
    (out / "broken" / "error.json").write_text(json.dumps({"volume": "broken", "error": f"{tmp_path}/x.nii.gz: truncated"}))
    write_index_html(out / INDEX_HTML, out, ["plain", "calibrated", "broken"], ["plain", "calibrated"])

    with browser_page((out / "calibrated" / REPORT_HTML).as_uri()) as page:
        text, shot = _rendered(page)
        assert "Tumor suspected on the 2 slice(s) where a pancreas was found" in text
        assert "Calibrated likelihood 62 % (platt, fitted on val (40 volumes)); raw score 0.900." in text
        assert "OUTSIDE THE VALIDATED RANGE" in text and "slice thickness\tfailed\tSliceThickness = 5.0" in text
        assert "Research prototype, not a medical device" in text and "patient threshold 0.500" in text
        assert page.evaluate("document.querySelector('#montage').naturalWidth") > 0  # the inline PNG decoded
        assert page.locator("#pt-curve circle").count() == 2  # slices 1 and 3 were classified
        assert shot.std() > 20 and shot.shape[0] > 600
        page.screenshot(path=str(Path(__file__).resolve().parents[1] / "test-artifacts" / "report_html.png"), full_page=True)
    with browser_page((out / "plain" / REPORT_HTML).as_uri()) as page:
        text, shot = _rendered(page)
        assert "Uncalibrated score 0.900 (not a probability" in text  # recorded without a map
        assert "Fitness checks: not recorded." in text and "%" not in text.split("Fitness")[0]
        assert shot.std() > 20
    with browser_page((out / INDEX_HTML).as_uri()) as page:
        text, shot = _rendered(page)
        rows = page.locator("#volumes tbody tr")
        assert rows.count() == 3
        assert rows.nth(0).inner_text().split("\t")[0] == "broken" and "x.nii.gz: truncated" in rows.nth(0).inner_text()
        assert "Calibrated likelihood 62 %" in rows.nth(1).inner_text()
        assert "outside the validated range" in rows.nth(1).inner_text()
        assert "fitness not recorded" in rows.nth(2).inner_text()
        assert str(tmp_path) not in page.content()
        page.click("text=calibrated")
        assert page.url.endswith("/calibrated/report.html")
        assert shot.std() > 10


def test_demo_message_names_the_page_and_the_sr(tmp_path):
    """The demo's words after a scan's files (minigpt4.demo.app.scan_files_text): the page and the
    SR among the downloads, an SR that failed; the likelihood and the fitness are in the scan's
    own message already (ScanResult.chat_text), never said twice."""
    from minigpt4.demo.app import scan_files_text

    _, geometry, _, result, _ = dicom_scan(tmp_path)
    report = calibrated(build_report("case", "case", geometry, result.patient, result.slices, CHECKPOINTS))
    report["structured_report"] = {"file": None, "error": "ValueError: bad header"}
    assert scan_files_text(report, [REPORT_FILE, REPORT_HTML]).split("\n\n") == [
        "Among the scan files below: `report.html` (a page to read).", "⚠️ sr.dcm could not be written: ValueError: bad header"]
    report["structured_report"] = {"file": "sr.dcm", "error": None}
    assert scan_files_text(report, [REPORT_FILE]) == ""


@pytest.mark.skipif(not (SHARED_DATA / "ct" / "totalseg_dicom" / "dicom").is_dir(),
                    reason="../shared/data/ct/totalseg_dicom not present (real DICOM series)")
def test_sr_of_the_real_anonymised_series_is_refused_with_its_reason(tmp_path):
    """The real series is anonymised down to empty Study/SeriesInstanceUIDs: an SR could not be
    filed in its study, so none is written and report.json says why; the answer stands."""
    from minigpt4.boxes import grid_to_pixel_inclusive

    geometry, headers = read_dicom_source(SHARED_DATA / "ct" / "totalseg_dicom" / "dicom")
    make = results_on(512, 512)
    box = grid_to_pixel_inclusive((49, 53, 52, 56), 512, 512)
    result = VolumeResult([make(12, 0.7, pancreas_box=box, tumor_box=box)], patient("tumor", 0.7))
    written = write_volume_outputs(tmp_path, volume="real", source="real", geometry=geometry, result=result,
                                   checkpoints=CHECKPOINTS, fingerprint="f" * 64, dicom_headers=headers)
    assert SR_FILE not in written and SEG_FILE in written
    assert json.loads((tmp_path / REPORT_FILE).read_text())["structured_report"] == {
        "file": None, "error": "ValueError: the DICOM series has no StudyInstanceUID (anonymised?), so a structured "
                               "report cannot reference it or be filed in its study"}
