"""``report.html`` per volume and ``index.html`` across a scan: pages a person reads.

Both are self-contained (no script, no font, no request: styles inline, the montage inline as a
``data:`` PNG, the P(tumor) curve as inline SVG; links point only at sibling files) and are
written from ``report.json``'s content alone (plus ``montage.png``), so they show whatever the
scan recorded: a key that is absent (``patient.likelihood``, ``fitness``,
``outside_validated_range``, ``assessed``) reads "not recorded", and a score without a
calibration map is an "uncalibrated score", never a percentage.

No private path reaches a page: the input's path (``source``) and the checkpoints' paths are
never shown, only the volume's name and the checkpoints' SHA-256.

The word functions (:func:`decision_text`, :func:`likelihood_text`, :func:`fitness_text`) are
shared with the demo, so the page, the demo and the index say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import quote

from minigpt4.inference.calibration import likelihood_entry, likelihood_text as likelihood_words
from minigpt4.io import write_text_atomic

REPORT_HTML, INDEX_HTML = "report.html", "index.html"
NOT_MEDICAL_DEVICE = ("Research prototype, not a medical device: not for diagnosis or treatment decisions; "
                      "a clinician must read the CT.")
NOT_RECORDED = "not recorded"
N_SUSPICIOUS = 8
"""Rows of the "most suspicious slices" table (the montage shows as many)."""
CONFIG_KEYS = ("aggregation", "top_k", "threshold", "slice_threshold", "min_boxed_slices", "crop_margin",
               "normalisation", "max_new_tokens")
"""The scan settings the page shows (``report.json`` ``config``), in this order."""


# ----------------------------------------------------------------------------- words


def _assessed(report: Mapping[str, Any]) -> tuple[int, int]:
    """``(slices with a pancreas box, slices in the volume)``: ``assessed`` where recorded, else
    counted from the slice rows."""
    assessed = report.get("assessed") or {}
    if isinstance(assessed.get("slices_with_pancreas"), int) and isinstance(assessed.get("slices_total"), int):
        return assessed["slices_with_pancreas"], assessed["slices_total"]
    boxed = sum(row.get("pancreas_box") is not None for row in report.get("slices", []))
    return boxed, int((report.get("counts") or {}).get("n_slices", len(report.get("slices", []))))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def decision_text(report: Mapping[str, Any]) -> str:
    """The patient-level answer in words, saying what was assessed: ``patient.verdict`` where
    ``report.json`` records it, else built from the decision and the slices with a pancreas box."""
    patient = report.get("patient")
    boxed, total = _assessed(report)
    if patient is None:
        return (f"No patient-level answer (one checkpoint served every stage); a pancreas box on "
                f"{boxed} of {_plural(total, 'slice')}.")
    decision = patient.get("decision")
    verdict = patient.get("verdict")
    if isinstance(verdict, str) and verdict:  # the cascade's own verdict line (issue 25.5), where recorded
        text = verdict[0].upper() + verdict[1:].rstrip(".") + "."
        return text + (" This is not a negative result." if decision == "inconclusive" else "")
    if decision == "tumor":
        return (f"Pancreatic tumor (PDAC) suspected. A pancreas was found and assessed on {boxed} of "
                f"{_plural(total, 'slice')}.")
    if decision == "no tumor":
        return (f"No tumor found on the {_plural(boxed, 'slice')} where a pancreas was found "
                f"(of {total}); the rest of the volume was not assessed.")
    if decision == "inconclusive":
        return (f"Inconclusive: a pancreas was found on only {boxed} of {_plural(total, 'slice')}, too few to "
                "answer. This is not a negative result.")
    return f"Decision {decision!r}: not one this page knows."


def likelihood_text(report: Mapping[str, Any]) -> str:
    """The likelihood in words, as a sentence: the words of
    :func:`minigpt4.inference.calibration.likelihood_text` (the one owner of that wording: a
    percentage only with a calibration map), or that the report records none."""
    patient = report.get("patient")
    if patient is None or patient.get("decision") == "inconclusive":
        return "No likelihood: there is no patient-level score."
    likelihood = patient.get("likelihood")
    if not isinstance(likelihood, Mapping):  # a report of an older scan: the raw score only
        raw = patient.get("score")
        if raw is None:
            return f"Likelihood: {NOT_RECORDED}."
        return f"Likelihood: {NOT_RECORDED}; {likelihood_words(likelihood_entry(raw, None))}."
    words = likelihood_words(likelihood)
    return words[0].upper() + words[1:] + "."


def fitness_text(report: Mapping[str, Any]) -> str:
    """One line on the fitness checks: not recorded, all passed, or which failed / are unknown."""
    checks = report.get("fitness")
    outside = report.get("outside_validated_range")
    if not isinstance(checks, list):
        return "Fitness checks: " + NOT_RECORDED + "."
    failed = [str(c.get("check")) for c in checks if c.get("status") == "failed"]
    unknown = [str(c.get("check")) for c in checks if c.get("status") == "unknown"]
    parts = []
    if outside is True:
        parts.append("OUTSIDE THE VALIDATED RANGE (the answer is given, but this scan is unlike the training data)")
    if failed:
        parts.append("failed: " + ", ".join(failed))
    if unknown:
        parts.append("could not be checked: " + ", ".join(unknown))
    if not parts:
        return f"Fitness checks: all {len(checks)} passed."
    return "Fitness checks: " + "; ".join(parts) + "."


def _flags(report: Mapping[str, Any]) -> str:
    if report.get("outside_validated_range") is True:
        return "outside the validated range"
    if not isinstance(report.get("fitness"), list):
        return "fitness " + NOT_RECORDED
    unknown = sum(c.get("status") == "unknown" for c in report["fitness"])
    return "none" if not unknown else f"{_plural(unknown, 'check')} unknown"


# ----------------------------------------------------------------------------- pieces


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:[\\/]|/)(?:[^\s'\"]*[\\/])?([^\s'\"\\/]*)")


def without_paths(text: str) -> str:
    """``text`` with every absolute path reduced to its last part (``/home/a/ct/x.nii: bad`` →
    ``x.nii: bad``): error messages name the input, the page must not show where it lives."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "…", text)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Arial,sans-serif;margin:24px auto;max-width:1100px;color:#111;
background:#fff;line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ccc}
.banner{background:#fff3cd;border:2px solid #b58100;padding:8px 12px;font-weight:600}
.answer{font-size:1.25em;font-weight:700;margin:12px 0 4px}
.flag{background:#f8d7da;border:2px solid #a00;padding:8px 12px;font-weight:700;margin:8px 0}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#eee}.failed{color:#a00;font-weight:700}.unknown{color:#8a5a00}
.passed{color:#060}code{font-size:.9em}img{max-width:100%;border:1px solid #444}.muted{color:#555}
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            f'<p class="banner" id="not-a-device">{_e(NOT_MEDICAL_DEVICE)}</p>\n{body}\n'
            f'<p class="muted">{_e(NOT_MEDICAL_DEVICE)}</p>\n</body></html>\n')


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    """Rows of already-escaped HTML cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _box_text(box: Optional[Mapping[str, Any]]) -> str:
    return "—" if box is None else _e("[" + ", ".join(str(v) for v in box["pixels"]) + "]")


def _fitness_section(report: Mapping[str, Any]) -> str:
    checks = report.get("fitness")
    line = f"<p>{_e(fitness_text(report))}</p>"
    if not isinstance(checks, list):
        return line
    rows = []
    for check in checks:
        status = str(check.get("status"))
        values = ", ".join(f"{k} = {v}" for k, v in (check.get("values") or {}).items())
        rows.append([_e(check.get("check")), f'<span class="{_e(status)}">{_e(status)}</span>', _e(values or "—"),
                     _e(check.get("reason") or "—")])
    return line + _table(("check", "status", "values seen", "reason"), rows, "fitness")


def pt_curve_svg(report: Mapping[str, Any], width: int = 720, height: int = 220) -> str:
    """P(tumor) along z as an inline SVG: one dot per classified slice (red where a tumor box was
    drawn), a line through them, the patient threshold dashed."""
    rows = sorted(report.get("slices", []), key=lambda row: row["slice"])
    n = max(1, int((report.get("counts") or {}).get("n_slices", 0)) or (rows[-1]["slice"] + 1 if rows else 1))
    left, right, top, bottom = 44, 12, 12, 34
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(k: float) -> float:
        return left + (plot_w * (k / (n - 1)) if n > 1 else plot_w / 2)

    def y(p: float) -> float:
        return top + plot_h * (1.0 - p)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="pt-curve" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="P(tumor) along z">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#888"/>']
    for p in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 6}" y="{y(p) + 4:.1f}" font-size="11" text-anchor="end">{p:.1f}</text>')
    for k in sorted({0, n - 1, (n - 1) // 2}):
        parts.append(f'<text x="{x(k):.1f}" y="{height - 18}" font-size="11" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" font-size="11" text-anchor="middle">'
                 "display slice (axial order as stored)</text>")
    threshold = (report.get("patient") or {}).get("threshold")
    if threshold is not None:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(float(threshold)):.1f}" '
                     f'y2="{y(float(threshold)):.1f}" stroke="#b58100" stroke-dasharray="6 4"/>'
                     f'<text x="{left + plot_w - 4}" y="{y(float(threshold)) - 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="#8a5a00">patient threshold {float(threshold):.3f}</text>')
    scored = [row for row in rows if row.get("p_tumor") is not None]
    if len(scored) > 1:
        points = " ".join(f"{x(row['slice']):.1f},{y(float(row['p_tumor'])):.1f}" for row in scored)
        parts.append(f'<polyline points="{points}" fill="none" stroke="#1f5fa8" stroke-width="1.5"/>')
    for row in scored:
        colour = "#c00000" if row.get("tumor_box") is not None else "#1f5fa8"
        parts.append(f'<circle cx="{x(row["slice"]):.1f}" cy="{y(float(row["p_tumor"])):.1f}" r="3" fill="{colour}">'
                     f'<title>slice {row["slice"]}: P(tumor) {float(row["p_tumor"]):.3f}</title></circle>')
    if not scored:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" font-size="13" '
                     'text-anchor="middle">no slice was classified</text>')
    parts.append("</svg>")
    return "".join(parts)


def _suspicious_table(report: Mapping[str, Any]) -> str:
    scored = sorted((row for row in report.get("slices", []) if row.get("p_tumor") is not None),
                    key=lambda row: (-float(row["p_tumor"]), row["slice"]))[:N_SUSPICIOUS]
    if not scored:
        return "<p>No slice was classified, so none is most suspicious.</p>"
    calibrated = any(row.get("p_tumor_calibrated") is not None for row in scored)
    rows = [[_e(row["slice"]), _e(f"{float(row['p_tumor']):.3f}")]
            + ([_e("—" if row.get("p_tumor_calibrated") is None else f"{float(row['p_tumor_calibrated']):.3f}")]
               if calibrated else [])
            + [_e(row.get("classified_on") or "—"), _box_text(row.get("pancreas_box")), _box_text(row.get("tumor_box"))]
            for row in scored]
    headers = ("slice", "P(tumor)", *(("P(tumor) calibrated",) if calibrated else ()), "classified on",
               "pancreas box (pixels x1, y1, x2, y2)", "tumor box (pixels)")
    return _table(headers, rows, "suspicious")


def _operating_point(report: Mapping[str, Any]) -> str:
    patient = report.get("patient") or {}
    config = report.get("config") if isinstance(report.get("config"), Mapping) else {}
    settings = {**{k: config[k] for k in CONFIG_KEYS if k in config},
                **{k: patient[k] for k in ("threshold", "aggregation", "top_k") if patient.get(k) is not None}}
    if not settings:
        return f"<p>Operating point: {NOT_RECORDED}.</p>"
    rows = [[_e(k.replace("_", " ")), _e(settings[k])] for k in CONFIG_KEYS if k in settings]
    return ("<p>The settings that turned slice answers into the patient answer (the scan's configuration; "
            "<code>eval_cascade.py</code> chooses them on validation volumes).</p>" + _table(("setting", "value"), rows, "operating-point"))


def _checkpoints(report: Mapping[str, Any]) -> str:
    rows = [[_e(c.get("stage", "?")), f"<code>{_e(c.get('sha256', '?'))}</code>"] for c in report.get("checkpoints") or []]
    return _table(("stage", "checkpoint SHA-256"), rows, "checkpoints") if rows else f"<p>Checkpoints: {NOT_RECORDED}.</p>"


def render_report_html(report: Mapping[str, Any], montage_png: Optional[bytes] = None,
                       files: Sequence[str] = ()) -> str:
    """The page of one volume (a complete HTML document).

    Args:
        report: the volume's ``report.json`` content.
        montage_png: ``montage.png``'s bytes (inlined), or None.
        files: sibling files to link (names in the volume folder), e.g. ``report.json``, ``sr.dcm``.
    """
    name = str(report.get("volume", "volume"))
    outside = report.get("outside_validated_range") is True
    body = [f"<h1>MiniGPT-Pancreas: {_e(name)}</h1>",
            f'<p class="answer" id="decision">{_e(decision_text(report))}</p>',
            f'<p id="likelihood">{_e(likelihood_text(report))}</p>']
    if outside:
        body.append(f'<p class="flag" id="outside">{_e(fitness_text(report))}</p>')
    body += ['<h2>Is this scan fit for the model?</h2>', _fitness_section(report),
             "<h2>P(tumor) along z</h2>",
             "<p>The tumor classifier's P(yes) per slice it was run on (uncalibrated); red: a tumor box was drawn.</p>",
             pt_curve_svg(report), "<h2>Most suspicious slices</h2>"]
    if montage_png is not None:
        data = base64.b64encode(montage_png).decode("ascii")
        body.append("<p>Highest P(tumor) first; pancreas box cyan, tumor box red.</p>"
                    f'<img id="montage" alt="most suspicious slices with their boxes" src="data:image/png;base64,{data}">')
    body += [_suspicious_table(report), "<h2>Operating point</h2>", _operating_point(report)]
    structured = report.get("structured_report")
    if isinstance(structured, Mapping) and structured.get("error"):
        body.append(f'<p class="flag" id="sr-error">sr.dcm could not be written: {_e(without_paths(str(structured["error"])))}</p>')
    body += ["<h2>Model</h2>", _checkpoints(report)]
    if files:
        links = " · ".join(f'<a href="{quote(f)}">{_e(f)}</a>' for f in files)
        body.append(f'<h2>Files</h2><p id="files">{links}</p>')
    return _page(f"MiniGPT-Pancreas: {name}", "\n".join(body))


def write_report_html(path: str | os.PathLike, report: Mapping[str, Any], montage: Optional[str | os.PathLike] = None,
                      files: Sequence[str] = ()) -> Path:
    """``report.html`` (:func:`render_report_html`), ``montage`` read from its file when it exists. Atomic."""
    montage_png = Path(montage).read_bytes() if montage is not None and Path(montage).is_file() else None
    write_text_atomic(path, render_report_html(report, montage_png, files))
    return Path(path)


# ----------------------------------------------------------------------------- index.html


def render_index_html(entries: Sequence[tuple[str, Optional[Mapping[str, Any]], Optional[str], bool]]) -> str:
    """The scan's index: one row per volume.

    Args:
        entries: ``(volume, report or None, error or None, has_page)`` per volume.
    """
    rows = []
    for volume, report, error, has_page in entries:
        name = f'<a href="{quote(volume)}/{REPORT_HTML}">{_e(volume)}</a>' if has_page else _e(volume)
        if report is None:
            rows.append([name, '<span class="failed">failed</span>', "—", _e(without_paths(error or "no complete output"))])
            continue
        flags = _flags(report)
        css = "failed" if flags == "outside the validated range" else ""
        rows.append([name, _e(decision_text(report)), _e(likelihood_text(report)),
                     f'<span class="{css}">{_e(flags)}</span>'])
    body = [f"<h1>MiniGPT-Pancreas scan: {len(entries)} volume{'' if len(entries) == 1 else 's'}</h1>",
            _table(("volume", "decision", "likelihood", "flags (failed: the error)"), rows, "volumes")]
    return _page("MiniGPT-Pancreas scan", "\n".join(body))


def write_index_html(path: str | os.PathLike, out_root: str | os.PathLike, volumes: Sequence[str],
                     done: Sequence[str]) -> Path:
    """``index.html`` over ``volumes`` (sorted): the ``report.json`` of those in ``done`` (the
    folders marked done), else the folder's ``error.json``. Atomic."""
    entries = []
    for volume in sorted(volumes):
        folder = Path(out_root) / volume
        report, error = None, None
        if volume in done and (folder / "report.json").is_file():
            report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        elif (folder / "error.json").is_file():
            error = json.loads((folder / "error.json").read_text(encoding="utf-8")).get("error")
        entries.append((volume, report, error, report is not None and (folder / REPORT_HTML).is_file()))
    write_text_atomic(path, render_index_html(entries))
    return Path(path)
