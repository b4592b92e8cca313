"""PANORAMA's clinical sheet (``clinical_information.xlsx`` as published, or a CSV export of it).

One row per study: ``PANORAMA_patient_id``, ``PANORAMA_study_id`` (``<patient>_<study>``),
``anonymized_study_date``, ``patient_age`` (``067Y``), ``patient_sex``, ``scanner``, ``label``
(``PDAC`` | ``non-PDAC``: the patient truth, also for a PDAC study whose automatic label has no
lesion voxel) and ``level`` (the reference standard, or ``MSD_dataset`` / ``NIH_dataset`` for the
MSD Task07 and NIH Pancreas-CT scans PANORAMA re-distributes). This module owns the format: the
reader (:func:`read_sheet`) used by ``python -m preprocessing panorama`` and the writers used by
the phantom generator (:mod:`preprocessing.synthetic_panorama`).

A sheet with a required column missing or renamed, a row without a study id, a study id that does
not start with its patient id, a duplicated study or a label other than PDAC / non-PDAC is refused
with one line naming the file (and row).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import openpyxl  # the published sheet is .xlsx (openpyxl is also pandas' .xlsx reader)
from openpyxl.utils.exceptions import InvalidFileException

COLUMNS = ("PANORAMA_patient_id", "PANORAMA_study_id", "anonymized_study_date", "patient_age", "patient_sex",
           "scanner", "label", "level")
"""The published columns, in the published order."""
REQUIRED = ("PANORAMA_patient_id", "PANORAMA_study_id", "label", "level")
"""Without these a study cannot be labelled, grouped by patient or recognised as an MSD / NIH scan."""
PATIENT_LABELS = ("PDAC", "non-PDAC")
OTHER_DATASETS = {"MSD_dataset": "MSD", "NIH_dataset": "NIH"}
"""``level`` values that mark a scan of another dataset → that dataset's name."""
STUDY_ID = re.compile(r"^(?P<patient>\d+)_(?P<study>\d+)$")


class SheetError(ValueError):
    """The clinical sheet cannot be used; the message names the file (and row)."""


@dataclass(frozen=True)
class Study:
    """One row of the sheet, normalised.

    Attributes:
        study_id: ``100417_00001`` (the prepared folder's ``volume_name``).
        patient_id: ``100417``.
        patient_label: ``PDAC`` | ``non-PDAC``.
        level: reference standard as published (``histopathology``, ``MSD_dataset``, ...).
        study_date: ISO date ``YYYY-MM-DD`` or None.
        patient_age: years (``067Y`` → 67), the published text when it is not of that form, or None.
        patient_sex, scanner: as published, or None.
    """

    study_id: str
    patient_id: str
    patient_label: str
    level: str
    study_date: Optional[str] = None
    patient_age: Optional[object] = None
    patient_sex: Optional[str] = None
    scanner: Optional[str] = None

    @property
    def other_dataset(self) -> Optional[str]:
        """``MSD`` / ``NIH`` when the sheet flags this study as a scan of that dataset, else None."""
        return OTHER_DATASETS.get(self.level)

    def record_fields(self) -> dict:
        """The sheet's values as every slice record of the study carries them."""
        return {"patient_id": self.patient_id, "patient_label": self.patient_label, "reference_standard": self.level,
                "study_date": self.study_date, "patient_age": self.patient_age, "patient_sex": self.patient_sex,
                "scanner": self.scanner}


def _text(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _date(value) -> Optional[str]:
    if isinstance(value, (dt.datetime, dt.date)):
        return (value.date() if isinstance(value, dt.datetime) else value).isoformat()
    text = _text(value)
    if text and re.match(r"^\d{4}-\d{2}-\d{2}", text):
        return text[:10]
    return text


def _age(value):
    text = _text(value)
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)\s*Y?", text, flags=re.IGNORECASE)
    return int(m.group(1)) if m else text


def _rows_xlsx(path: Path) -> list[list]:
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, OSError, KeyError, ValueError) as err:
        raise SheetError(f"{path}: cannot read the clinical sheet ({type(err).__name__}: {err})") from None
    except Exception as err:  # noqa: BLE001 - a damaged zip raises zipfile.BadZipFile and others
        raise SheetError(f"{path}: cannot read the clinical sheet as .xlsx ({type(err).__name__}: {err})") from None
    try:
        sheet = book[book.sheetnames[0]]
        return [list(row) for row in sheet.iter_rows(values_only=True)]
    finally:
        book.close()


def _rows_csv(path: Path) -> list[list]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SheetError(f"{path}: not a UTF-8 CSV file ({err})") from None
    dialect = csv.excel
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        pass
    return [[cell if cell != "" else None for cell in row] for row in csv.reader(io.StringIO(text), dialect)]


def read_sheet(path) -> dict[str, Study]:
    """``{study_id: Study}`` of a clinical sheet (``.xlsx`` as published, or ``.csv``).

    Raises:
        FileNotFoundError: no such file.
        SheetError: unknown format, missing/renamed columns, bad rows (one line naming file and row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: clinical sheet not found")
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        rows = _rows_xlsx(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        rows = _rows_csv(path)
    else:
        raise SheetError(f"{path}: a clinical sheet must be .xlsx (as published) or .csv, not {suffix or 'no suffix'}")
    rows = [r for r in rows if any(_text(v) for v in r)]
    if not rows:
        raise SheetError(f"{path}: the clinical sheet is empty")
    header = [_text(v) or "" for v in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise SheetError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(h for h in header if h)}); "
                         f"expected PANORAMA's published columns {', '.join(COLUMNS)}")
    index = {c: header.index(c) for c in COLUMNS if c in header}
    studies: dict[str, Study] = {}
    for number, row in enumerate(rows[1:], start=2):
        def cell(column):
            i = index.get(column)
            return row[i] if i is not None and i < len(row) else None

        where = f"{path}: row {number}"
        patient, study = _text(cell("PANORAMA_patient_id")), _text(cell("PANORAMA_study_id"))
        if not study or not patient:
            raise SheetError(f"{where}: no {'PANORAMA_study_id' if not study else 'PANORAMA_patient_id'}")
        m = STUDY_ID.fullmatch(study)
        if not m or m["patient"] != patient:
            raise SheetError(f"{where}: study id {study!r} is not <patient>_<study> of patient {patient!r}")
        label = _text(cell("label"))
        fixed = {p.lower(): p for p in PATIENT_LABELS}.get((label or "").lower())
        if fixed is None:
            raise SheetError(f"{where}: label {label!r} of study {study} is not one of {', '.join(PATIENT_LABELS)}")
        if study in studies:
            raise SheetError(f"{where}: study {study} appears twice")
        studies[study] = Study(study, patient, fixed, _text(cell("level")) or "", _date(cell("anonymized_study_date")),
                               _age(cell("patient_age")), _text(cell("patient_sex")), _text(cell("scanner")))
    if not studies:
        raise SheetError(f"{path}: the clinical sheet has a header but no rows")
    return studies


# ----------------------------------------------------------------------------- writers (phantoms)


def _published_row(study: Study) -> list:
    date = dt.datetime.fromisoformat(study.study_date) if study.study_date else None
    age = f"{study.patient_age:03d}Y" if isinstance(study.patient_age, int) else study.patient_age
    return [int(study.patient_id), study.study_id, date, age, study.patient_sex, study.scanner,
            study.patient_label, study.level]


def xlsx_bytes(studies: Sequence[Study]) -> bytes:
    """The sheet as PANORAMA publishes it (one worksheet, the published columns and cell types)."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(list(COLUMNS))
    for study in studies:
        sheet.append(_published_row(study))
    fixed = dt.datetime(2024, 1, 1)
    book.properties.created = book.properties.modified = fixed
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


def csv_bytes(studies: Sequence[Study]) -> bytes:
    """A CSV export of the sheet (dates as ``YYYY-MM-DD``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for study in studies:
        row = _published_row(study)
        row[2] = study.study_date
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().encode()
