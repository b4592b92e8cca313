"""PANORAMA-format phantoms: the public training set's file layout, small enough for the quickstart.

``generate(out, ...)`` writes, from one synthetic "scanner" (one size, spacing and orientation for
every study, so nothing but the anatomy tells PDAC from non-PDAC):

* ``images/<patient>_<study>_0000.nii.gz`` (as the Zenodo batches name them; ``.mha`` with
  ``image_format="mha"``, grand-challenge's format);
* ``manual_labels/<patient>_<study>.nii.gz`` for the PDAC studies (but the last PDAC patient's),
  ``automatic_labels/<patient>_<study>.nii.gz`` for the others, values as released: 0 background,
  1 PDAC lesion (a hypodense lesion inside the pancreas), 3 arteries (the aorta), 4 pancreas
  parenchyma, 5 pancreatic duct (2 veins and 6 common bile duct are not drawn);
* ``clinical_information.xlsx`` (the published columns and cell types) and its CSV export
  ``clinical_information.csv``: label PDAC | non-PDAC, level ``histopathology`` / ``radiology``,
  or ``MSD_dataset`` for ``msd_flagged`` extra non-PDAC patients (scans the sheet says come from
  MSD Task07);
* ``manifest.json`` listing these files (re-runs replace only them).

The first patient of each class has ``studies`` studies (a patient with several scans: the split
must keep them together); its later studies are new phantoms (new anatomy, not a follow-up of the
same body). Patients are numbered from 900001 so they never collide with real PANORAMA ids.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from minigpt4.io import atomic_path, write_bytes_atomic, write_json_atomic
from preprocessing import clinical, synthetic

FIRST_PATIENT = 900001
SCANNER = "SYNTHETIC"
FORMATS = ("nifti", "mha")


def plan(n_patients: int, studies: int = 2, msd_flagged: int = 0) -> list[dict]:
    """The phantom set: ``[{"patient", "study", "pdac", "source", "level"}, ...]`` in writing order.

    Half the patients (rounded up) are PDAC; the first patient of each class has ``studies``
    studies; the last of several PDAC patients has automatic labels (as 194 of PANORAMA's 676 PDAC cases),
    every other PDAC label manual, every non-PDAC label automatic. ``msd_flagged`` extra non-PDAC
    patients have level ``MSD_dataset``.
    """
    if n_patients < 2:
        raise ValueError(f"need at least 2 patients (one PDAC, one non-PDAC), got {n_patients}")
    if studies < 1 or msd_flagged < 0:
        raise ValueError(f"studies must be >= 1 and msd_flagged >= 0, got {studies} and {msd_flagged}")
    n_pdac = (n_patients + 1) // 2
    rows = []
    for i in range(n_patients + msd_flagged):
        pdac = i < n_pdac
        first_of_class = i in (0, n_pdac)
        patient = str(FIRST_PATIENT + i)
        for k in range(1, (studies if first_of_class and i < n_patients else 1) + 1):
            source = "manual" if pdac and (i != n_pdac - 1 or n_pdac == 1) else "automatic"
            level = "MSD_dataset" if i >= n_patients else "histopathology" if pdac else "radiology"
            rows.append({"patient": patient, "study": f"{patient}_{k:05d}", "pdac": pdac, "source": source,
                         "level": level})
    return rows


def sheet_rows(rows: list[dict], seed: int = 0) -> list[clinical.Study]:
    """The clinical sheet of a :func:`plan` (ages, sexes and dates drawn from ``seed``)."""
    rng = np.random.default_rng([seed, 7])
    out, ages = [], {}
    for i, row in enumerate(rows):
        age = ages.setdefault(row["patient"], int(rng.integers(45, 85)))
        flagged = row["level"] == "MSD_dataset"  # as the real sheet: no date, age, sex or scanner for MSD rows
        date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 2500)))
        out.append(clinical.Study(row["study"], row["patient"], "PDAC" if row["pdac"] else "non-PDAC", row["level"],
                                  None if flagged else date.isoformat(), None if flagged else age,
                                  None if flagged else ("F" if i % 2 else "M"), None if flagged else SCANNER))
    return out


def write_mha(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Atomic ``.mha`` write of a stored-frame array (X, Y, Z) and its RAS affine (axis-aligned)."""
    import SimpleITK as sitk  # heavy optional dependency (grand-challenge's .mha); only for .mha files

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :]
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (lps[:, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:, 3]])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # SimpleITK picks the writer by the suffix: the temporary name keeps ".mha" at its end
        target = tmp.with_name(tmp.name + ".mha")
        try:
            sitk.WriteImage(image, str(target), useCompression=True)
            target.replace(tmp)
        finally:
            target.unlink(missing_ok=True)


def _planned_files(rows: list[dict], image_format: str) -> list[str]:
    suffix = ".mha" if image_format == "mha" else ".nii.gz"
    files = []
    for row in rows:
        files += [f"images/{row['study']}_0000{suffix}", f"{row['source']}_labels/{row['study']}.nii.gz"]
    return files + ["clinical_information.xlsx", "clinical_information.csv"]


def generate(out, n_patients: int = 8, n_slices: int = 12, size: int = 64, orient: str = "LPS", seed: int = 0,
             image_format: str = "nifti", studies: int = 2, msd_flagged: int = 0, log=print,
             overwrite: bool = False) -> dict:
    """Write a PANORAMA-format phantom set under ``out`` (see the module docstring).

    Returns:
        ``{"images": folder, "labels": [manual folder, automatic folder], "clinical": xlsx path,
        "csv": csv path, "studies": {study: {"patient", "label", "source"}}}``: the arguments of
        ``python -m preprocessing panorama``.
    """
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {FORMATS}, got {image_format!r}")
    out = Path(out)
    rows = plan(n_patients, studies, msd_flagged)
    planned = _planned_files(rows, image_format)
    owned = synthetic._start_output(out, planned, overwrite)
    for folder in ("images", "manual_labels", "automatic_labels"):  # both label folders, as released
        (out / folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "manifest.json", {"dataset": "synthetic", "status": "incomplete",
                                              "files": sorted(owned | set(planned))})
    for i, row in enumerate(rows):
        hu, label, spacing = synthetic.phantom(size, n_slices, seed=seed * 100003 + 50_000 + i, scheme="panorama",
                                               tumor=row["pdac"])
        img_arr, img_aff = synthetic.stored(hu, spacing, orient)
        lab_arr, lab_aff = synthetic.stored(label, spacing, orient)
        if image_format == "mha":
            write_mha(out / "images" / f"{row['study']}_0000.mha", img_arr, img_aff)
        else:
            synthetic.write_nifti(out / "images" / f"{row['study']}_0000.nii.gz", img_arr, img_aff)
        synthetic.write_nifti(out / f"{row['source']}_labels" / f"{row['study']}.nii.gz", lab_arr, lab_aff)
    sheet = sheet_rows(rows, seed)
    write_bytes_atomic(out / "clinical_information.xlsx", clinical.xlsx_bytes(sheet))
    write_bytes_atomic(out / "clinical_information.csv", clinical.csv_bytes(sheet))
    for rel in sorted(owned - set(planned)):  # files of an earlier, larger run
        (out / rel).unlink()
    write_json_atomic(out / "manifest.json", {
        "dataset": "synthetic", "status": "complete",
        "parameters": {"scheme": "panorama", "n_patients": n_patients, "slices": n_slices, "size": size,
                       "orient": orient, "seed": seed, "image_format": image_format, "studies": studies,
                       "msd_flagged": msd_flagged},
        "files": sorted(planned)})
    n_pdac = sum(1 for s in sheet if s.patient_label == "PDAC")
    log(f"wrote {len(rows)} PANORAMA-format studies of {n_patients + msd_flagged} patients ({n_pdac} PDAC studies; "
        f"{size}x{size}x{n_slices}, {orient}, {image_format}) to {out}")
    return {"images": str(out / "images"), "labels": [str(out / "manual_labels"), str(out / "automatic_labels")],
            "clinical": str(out / "clinical_information.xlsx"), "csv": str(out / "clinical_information.csv"),
            "studies": {r["study"]: {"patient": r["patient"], "label": "PDAC" if r["pdac"] else "non-PDAC",
                                     "source": r["source"]} for r in rows}}
