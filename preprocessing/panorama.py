"""``python -m preprocessing panorama``: the PANORAMA public training set through the same pipeline.

Inputs as released: images ``<patient>_<study>_0000.nii.gz`` (the Zenodo batches; ``.mha`` too,
grand-challenge's format, read with SimpleITK), labels ``<patient>_<study>.nii.gz`` in
``manual_labels/`` and ``automatic_labels/`` (a manual label is preferred over an automatic one),
and the clinical sheet (:mod:`preprocessing.clinical`). Every study is one volume of
:mod:`preprocessing.pipeline` (same orientation handling, records, normalisation and PNGs as
MSD/NIH/ABD): ``volume_name`` is the study (``100417_00001``), the pancreas box is the union of
labels 1, 4 and 5 (lesion, parenchyma, duct), the tumor box label 1 (SPEC §9), and every record
also carries the sheet's values (:meth:`preprocessing.clinical.Study.record_fields`) and
``label_source`` (``manual`` | ``automatic``).

Split (:func:`split_by_patient`): by patient, never by study, seeded and stratified by the
patient's label (PDAC when any of their studies is PDAC); ``split.json`` adds ``study_patient``.
Scans of other datasets: a study the sheet flags ``MSD_dataset`` / ``NIH_dataset`` (``level``)
or that ``--exclude-overlap-with`` finds by content (:mod:`preprocessing.overlap`) never reaches
val/test. A matched study goes to train under its MSD/NIH identity (manifest ``overlap``, read
by the leakage guard: a model trained on it is refused on that MSD/NIH volume's test split); a
flagged study that no given folder matches is put in no split at all (``split.json``
``excluded``), since which MSD/NIH volume it is, and so where that volume is evaluated, is
unknown. The patient's other studies go to train with it.

Bad input, one line each (``error: ...``, exit 2; with ``--on-error skip`` the study is left out
and listed in the manifest's ``skipped``): an image without a label, a label without an image, a
study missing from the sheet, a file named otherwise, two labels of one source for a study, an
unreadable label, image/label geometry that disagrees, label values outside 0–6; the sheet's
own problems (renamed columns, bad rows) always stop. Notes (printed, recorded, not errors):
sheet rows without files (a subset of the batches), manual labels that replaced automatic ones,
patients whose studies come from different label folders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from preprocessing import clinical, splits, volumes
from preprocessing.output_folder import PreparationError
from preprocessing.pipeline import DEFAULT_LABELS, Job, Options, _need_dir, _visible, prepare

DATASET = "PANORAMA"
LABEL_SOURCES = ("manual", "automatic")
"""In order of preference: a manual label replaces an automatic one of the same study."""
IMAGE_NAME = re.compile(r"^(?P<study>\d+_\d+)_0000\.(?P<ext>nii\.gz|nii|mha)$")
LABEL_NAME = re.compile(r"^(?P<study>\d+_\d+)\.nii(\.gz)?$")
NOTE_LIMIT = 5


def label_folders(items: Sequence[str]) -> list[tuple[str, str]]:
    """``--labels`` items → ``[(source, folder), ...]``.

    An item is ``manual=DIR`` / ``automatic=DIR``, or a folder whose name says which
    (``manual_labels``, ``automatic_labels`` as released).

    Raises:
        PreparationError: the source of a folder cannot be told.
    """
    out = []
    for item in items:
        source, sep, folder = str(item).partition("=")
        if sep and source in LABEL_SOURCES:
            out.append((source, folder))
            continue
        name = Path(item).name.lower()
        found = [s for s in LABEL_SOURCES if s in name]
        if len(found) != 1:
            raise PreparationError(f"--labels {item}: cannot tell manual from automatic labels by the folder's name; "
                                   "name it manual_labels/ or automatic_labels/ as released, or write manual=DIR / "
                                   "automatic=DIR")
        out.append((found[0], str(item)))
    return out


def _problem(name: str, path, reason: str) -> dict:
    return {"volume": name, "file": str(path), "reason": reason}


def discover(opts: Options, sheet: dict[str, clinical.Study], log=print) -> tuple[list[Job], list[dict], dict]:
    """Pair images, labels and sheet rows.

    Returns:
        ``(jobs, problems, notes)``: problems as :func:`preprocessing.pipeline.discover`'s
        (unpaired or misnamed files, studies missing from the sheet); notes for the manifest
        (``sheet_rows_without_files``, ``manual_replaced_automatic``, ``mixed_label_sources``).
    """
    image_dirs = [_need_dir(p, "--images") for p in opts.images]
    problems: list[dict] = []
    images: dict[str, tuple[Path, str]] = {}
    for folder in image_dirs:
        for p in _visible(folder):
            if not p.is_file() or not (volumes.is_nifti(p) or volumes.is_mha(p)):
                continue
            m = IMAGE_NAME.fullmatch(p.name)
            if not m:
                problems.append(_problem(p.name, p, "not named <patient>_<study>_0000.nii.gz (or .mha) as PANORAMA's "
                                                    "images are; rename it or move it out of --images"))
                continue
            study = m["study"]
            if study in images:
                raise PreparationError(f"{images[study][0]} and {p}: two images for study {study}; keep one")
            images[study] = (p, "mha" if m["ext"] == "mha" else "nifti")
    if not images:
        raise PreparationError(f"{', '.join(map(str, opts.images))}: no PANORAMA images found (expected "
                               "<patient>_<study>_0000.nii.gz or .mha files)")
    labels: dict[str, dict[str, Path]] = {}
    for source, folder in opts.labels:
        folder = _need_dir(folder, f"--labels ({source})")
        for p in _visible(folder):
            if not p.is_file() or not volumes.is_nifti(p):
                continue
            m = LABEL_NAME.fullmatch(p.name)
            if not m:
                problems.append(_problem(p.name, p, "not named <patient>_<study>.nii.gz as PANORAMA's labels are"))
                continue
            earlier = labels.setdefault(m["study"], {}).get(source)
            if earlier is not None:
                raise PreparationError(f"{earlier} and {p}: two {source} labels for study {m['study']}; keep one")
            labels[m["study"]][source] = p
    jobs, replaced = [], []
    for study in sorted(set(images) | set(labels)):
        by_source = labels.get(study, {})
        if study not in images:
            source = next(s for s in LABEL_SOURCES if s in by_source)
            problems.append(_problem(study, by_source[source], f"label without image (no {study}_0000.nii.gz or "
                                                               f".mha in {', '.join(map(str, opts.images))})"))
            continue
        image, kind = images[study]
        if not by_source:
            problems.append(_problem(study, image, "image without label (no {0}.nii.gz in {1})".format(
                study, ", ".join(str(p) for _, p in opts.labels))))
            continue
        if study not in sheet:
            problems.append(_problem(study, image, f"study {study} is not in the clinical sheet {opts.clinical}"))
            continue
        source = next(s for s in LABEL_SOURCES if s in by_source)
        if len(by_source) > 1:
            replaced.append(study)
        extra = {**sheet[study].record_fields(), "label_source": source}
        jobs.append(Job(DATASET, study, str(image), str(by_source[source]), kind, dict(DEFAULT_LABELS[DATASET]),
                        True, opts.normalization, tuple(opts.window), str(opts.out), opts.balanced, opts.seed,
                        assume_orientation=opts.assume_orientation, all_slices=opts.all_slices, extra=extra))
    # notes: not errors, but said once each
    without_files = sorted(set(sheet) - set(images) - set(labels))
    if without_files:
        log(f"note: {len(without_files)} of the {len(sheet)} studies of {opts.clinical} have no image or label here "
            f"(first: {', '.join(without_files[:NOTE_LIMIT])}); they are not prepared")
    if replaced:
        log(f"note: {len(replaced)} stud{'y has' if len(replaced) == 1 else 'ies have'} a manual and an automatic "
            f"label; the manual one is used ({', '.join(replaced[:NOTE_LIMIT])})")
    sources_by_patient: dict[str, dict[str, str]] = {}
    for job in jobs:
        sources_by_patient.setdefault(job.extra["patient_id"], {})[job.volume_name] = job.extra["label_source"]
    mixed = {p: s for p, s in sorted(sources_by_patient.items()) if len(set(s.values())) > 1}
    for patient, studies in list(mixed.items())[:NOTE_LIMIT]:
        log(f"note: patient {patient}: studies in different label folders ("
            + ", ".join(f"{s} {src}_labels" for s, src in sorted(studies.items()))
            + "); each keeps its own label_source, the patient stays in one split")
    notes = {"label_sources": {s: sum(1 for j in jobs if j.extra["label_source"] == s) for s in LABEL_SOURCES},
             "sheet_rows_without_files": {"count": len(without_files), "first": without_files[:20]},
             "manual_replaced_automatic": replaced, "mixed_label_sources": mixed}
    return jobs, problems, notes


def split_by_patient(studies: Sequence[str], sheet: dict[str, clinical.Study], overlap_found: Optional[dict],
                     test_ratio: float, val_ratio: float, seed: int) -> dict:
    """The PANORAMA split: by patient, seeded, stratified by the patient's label.

    Args:
        studies: prepared study ids.
        sheet: the clinical sheet.
        overlap_found: ``{study: {"dataset", "volume", "file"}}`` of studies that are MSD/NIH scans
            by content (``--exclude-overlap-with``), or None.

    Returns:
        ``{"seed", "test_ratio", "val_ratio", "train", "val", "test", "study_patient", "split_by",
        "stratified_by", "kept_in_train", "excluded"}``: the patients of each stratum are split by
        :func:`preprocessing.splits.split_volumes` (the same rounding as every dataset); a patient
        with an MSD/NIH study (flag or content) goes to train, its flagged-but-unmatched studies to
        ``excluded`` (``{study: reason}``).
    """
    matched = dict(overlap_found or {})
    patients: dict[str, list[str]] = {}
    for study in sorted(set(studies)):
        patients.setdefault(sheet[study].patient_id, []).append(study)
    held, excluded, kept = set(), {}, []
    for patient, own in patients.items():
        for study in own:
            if study in matched:
                held.add(patient)
                kept.append(study)
            elif sheet[study].other_dataset:
                held.add(patient)
                excluded[study] = (f"the sheet's level says {sheet[study].level}, and no --exclude-overlap-with folder "
                                   f"holds the same scan: which {sheet[study].other_dataset} volume it is is unknown")
    strata = {label: sorted(p for p, own in patients.items() if p not in held
                            and any(sheet[s].patient_label == "PDAC" for s in own) == (label == "PDAC"))
              for label in clinical.PATIENT_LABELS}
    out = {"seed": int(seed), "test_ratio": float(test_ratio), "val_ratio": float(val_ratio),
           "train": [], "val": [], "test": []}
    for members in strata.values():
        part = splits.split_volumes(members, test_ratio, val_ratio, seed)
        for name in splits.SPLITS:
            out[name] += [s for p in part[name] for s in patients[p]]
    out["train"] += [s for p in held for s in patients[p] if s not in excluded]
    for name in splits.SPLITS:
        out[name] = sorted(out[name])
    out["study_patient"] = {s: sheet[s].patient_id for s in sorted(set(studies))}
    out["split_by"] = "patient"
    out["stratified_by"] = "patient_label"
    out["kept_in_train"] = sorted(kept + [s for p in held for s in patients[p] if s not in excluded and s not in kept])
    out["excluded"] = dict(sorted(excluded.items()))
    return out


def lesion_mismatches(studies: Sequence[str], sheet: dict[str, clinical.Study], infos: Sequence[dict],
                      log=print) -> dict:
    """Where the label and the sheet disagree (the sheet stays the patient truth): PDAC studies whose
    label has no lesion voxel (an automatic label that missed it) and non-PDAC studies with lesion
    voxels. Each kind is said once (a note) and returned for the manifest."""
    lesion = {s: 0 for s in studies}
    for record in infos:
        lesion[record["volume_name"]] = lesion.get(record["volume_name"], 0) + int(record["pixels_tumor"])
    pdac_without = sorted(s for s in studies if sheet[s].patient_label == "PDAC" and lesion[s] == 0)
    non_pdac_with = {s: lesion[s] for s in sorted(studies) if sheet[s].patient_label == "non-PDAC" and lesion[s] > 0}
    if pdac_without:
        log(f"note: {len(pdac_without)} PDAC stud{'y has' if len(pdac_without) == 1 else 'ies have'} no lesion "
            f"(label 1) voxel ({', '.join(pdac_without[:NOTE_LIMIT])}); they stay PDAC: the sheet is the patient truth")
    if non_pdac_with:
        log(f"note: {len(non_pdac_with)} non-PDAC stud{'y has' if len(non_pdac_with) == 1 else 'ies have'} lesion "
            "(label 1) voxels (" + ", ".join(f"{s}: {n}" for s, n in list(non_pdac_with.items())[:NOTE_LIMIT])
            + "); they stay non-PDAC, and their lesion slices give no tumor classification crop")
    return {"pdac_without_lesion_voxels": pdac_without, "non_pdac_with_lesion_voxels": non_pdac_with}


def prepare_panorama(opts: Options, log=print) -> dict:
    """Run ``python -m preprocessing panorama``. Returns the manifest.

    ``opts.labels``: ``[(source, folder), ...]`` (:func:`label_folders`); ``opts.clinical``: the sheet.

    Raises:
        FileNotFoundError, PreparationError, clinical.SheetError, VolumeError: one line each.
    """
    if not opts.clinical:
        raise PreparationError("--clinical: the clinical sheet (clinical_information.xlsx) is required")
    if opts.label_map is not None:
        raise PreparationError("--label-map is not available for PANORAMA (its label values are fixed: 0-6)")
    for _, folder in opts.labels:
        _need_dir(folder, "--labels")
    sheet = clinical.read_sheet(opts.clinical)
    found: dict = {}

    def discover_fn(o: Options):
        jobs, problems, notes = discover(o, sheet, log)
        found.update(notes)
        return jobs, problems

    def split_fn(done: list[str], overlap_found: Optional[dict], infos: list[dict]):
        split = split_by_patient(done, sheet, overlap_found, opts.test_ratio, opts.val_ratio, opts.seed)
        if split["excluded"]:
            log(f"{DATASET}: {len(split['excluded'])} stud{'y' if len(split['excluded']) == 1 else 'ies'} flagged "
                "MSD_dataset/NIH_dataset by the sheet and not matched by content: in no split (split.json 'excluded'"
                f"{'' if opts.exclude_overlap_with else '; give --exclude-overlap-with MSD NIH to keep them in train'})")
        counts = {label: sum(1 for s in done if sheet[s].patient_label == label) for label in clinical.PATIENT_LABELS}
        found.update(lesion_mismatches(done, sheet, infos, log))
        return split, {"clinical": {"sheet": str(Path(opts.clinical).resolve()), "studies_in_sheet": len(sheet),
                                    "prepared_by_label": counts, **found},
                       "excluded": split["excluded"]}

    manifest = prepare(opts, log=log, discover_fn=discover_fn, split_fn=split_fn)
    return manifest
