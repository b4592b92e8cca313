"""THE reader of prepared folders (docs/ARCHITECTURE.md, "Prepared folder").

Training, evaluation and the demo read prepared data only through :func:`read_prepared`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from minigpt4.io import read_json
from preprocessing.normalize import DEFAULT_WINDOW
from preprocessing.slices import select_records, select_with_empty
from preprocessing.splits import SPLITS

TASKS = ("pancreas_detection", "tumor_detection", "organ_detection", "tumor_classification")
DATASETS = ("MSD", "NIH", "ABD", "TC", "PANORAMA")
# task → datasets whose folders hold it
TASK_DATASETS = {
    "pancreas_detection": ("MSD", "NIH", "PANORAMA"),
    "tumor_detection": ("MSD", "PANORAMA"),
    "organ_detection": ("ABD",),
    "tumor_classification": ("TC",),
}


def _manifest(root: Path) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: prepared folder not found")
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a prepared folder (no manifest.json); run python -m preprocessing first")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("dataset") not in DATASETS:
        raise ValueError(f"{path}: manifest has no valid 'dataset' (one of {DATASETS})")
    if manifest.get("status") != "complete":
        raise ValueError(f"{root}: preparation did not finish (manifest status {manifest.get('status')!r}); "
                         "re-run the same python -m preprocessing command")
    return manifest


def dataset_name(root: str | os.PathLike) -> str:
    """``MSD`` | ``NIH`` | ``ABD`` | ``TC`` of a prepared folder (from its manifest)."""
    return _manifest(Path(root))["dataset"]


def read_normalization(root: str | os.PathLike) -> Optional[dict]:
    """How a prepared folder's slices were normalised: ``{"method": "paper" | "window", "window":
    [lo, hi]}`` from its manifest; None when the manifest does not record it."""
    parameters = _manifest(Path(root)).get("parameters") or {}
    if "normalization" not in parameters:
        return None
    return {"method": parameters["normalization"], "window": [float(v) for v in parameters.get("window") or DEFAULT_WINDOW]}


def _annotation_file(root: Path, dataset: str, task: str, split: str) -> Path:
    prefix = f"{dataset}_tumor" if task == "tumor_detection" else dataset
    return root / "annotations" / f"{prefix}_{split}.json"


def read_prepared(root: str | os.PathLike, task: str, split: str, threshold: Optional[float] = None,
                  organs: Optional[Sequence[str]] = None, empty_share: float = 0.0) -> list[dict]:
    """Selected records of one task and split of a prepared folder.

    Args:
        root: a folder written by ``python -m preprocessing msd|nih|abd|tc|tc-import``.
        task: ``pancreas_detection`` (MSD, NIH), ``tumor_detection`` (MSD),
            ``organ_detection`` (ABD) or ``tumor_classification`` (TC).
        split: ``train`` | ``val`` | ``test``.
        threshold: None → the records the CLI selected (``<DS>_{split}.json``); a value →
            reselect from ``<DS>_slices_info.json`` and ``split.json`` with the same function
            (:func:`preprocessing.slices.select_records`) at this threshold (threshold study).
            Not available for tumor_classification (crops are made at preparation time).
        organs: organ_detection only: restrict to these organs (``liver``, ``kidney``,
            ``spleen``, ``pancreas``); selection and organ balancing are then redone among them.
        empty_share: pancreas_detection only: add slices without pancreas (answer
            :data:`minigpt4.boxes.NO_BOX_ANSWER`, ``no_target: True``) to make this share of the
            records (:func:`preprocessing.slices.select_with_empty`); they need PNGs of every slice
            (a folder prepared with ``--all-slices``). 0: the paper's selection.

    Returns:
        Records (dicts) with ``image`` as an absolute path string, ``q_id``, ``target``,
        ``bbox`` (detection), ``answer`` (classification), ``width``, ``height``, ``dataset``,
        ``volume_name``, ``slice_index`` and the slice-info keys.

    Raises:
        FileNotFoundError: the folder, its manifest or an annotation file is missing.
        ValueError: unknown task/split, a folder of another task, an unfinished preparation.
    """
    root = Path(root).resolve()
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if empty_share and task != "pancreas_detection":
        raise ValueError(f"empty_share= only applies to pancreas_detection, not {task}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    manifest = _manifest(root)
    dataset = manifest["dataset"]
    if dataset not in TASK_DATASETS[task]:
        raise ValueError(f"{root}: holds {dataset} data, which has no {task} "
                         f"(expected a folder of {' or '.join(TASK_DATASETS[task])})")
    if organs is not None and task != "organ_detection":
        raise ValueError(f"organs= only applies to organ_detection, not {task}")
    if threshold is not None and task == "tumor_classification":
        raise ValueError("threshold re-selection is not available for tumor_classification: the crops are "
                         "chosen when the TC folder is made (python -m preprocessing tc --threshold ...)")
    if threshold is None and organs is None and not empty_share:
        path = _annotation_file(root, dataset, task, split)
        records = read_json(path)
    else:
        if threshold is None:
            threshold = manifest["parameters"]["threshold"]
        info_path = root / "annotations" / f"{dataset}_slices_info.json"
        infos = read_json(info_path)
        split_doc = read_json(root / "annotations" / "split.json")
        if split not in split_doc:
            raise ValueError(f"{root / 'annotations' / 'split.json'}: no {split!r} list")
        target = {"pancreas_detection": "pancreas", "tumor_detection": "tumor", "organ_detection": "organs"}[task]
        seed = int(manifest["parameters"].get("seed", 42))
        if empty_share:
            records = select_with_empty(infos, split_doc[split], target, threshold, empty_share, seed=seed)
            n_empty = sum(bool(r.get("no_target")) for r in records)
            if records and n_empty == 0:
                raise ValueError(f"{root}: empty_share={empty_share} but the {split} split has no PNG of a slice without "
                                 "pancreas; prepare the folder again with --all-slices")
        else:
            records = select_records(infos, split_doc[split], target, threshold, organs=organs, seed=seed)
        path = info_path
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records")
    out = []
    for rec in records:
        if not isinstance(rec, dict) or "image" not in rec or not rec["image"]:
            raise ValueError(f"{path}: record without an image: {str(rec)[:120]}")
        rec = dict(rec)
        rec["image"] = str(root / rec["image"])
        out.append(rec)
    return out


def read_volumes(root: str | os.PathLike, split: str) -> dict[str, list[dict]]:
    """Every slice of every volume of ``split`` (``<DS>_slices_info.json`` + ``split.json``).

    Unlike :func:`read_prepared` nothing is selected: slices without a target are included
    (``eval_cascade.py`` scans whole volumes). MSD / NIH / ABD folders only.

    Returns:
        ``{volume_name: [slice-info record, ...]}`` by volume name, each list by ``slice_index``;
        ``image`` is an absolute path string, or None for a slice whose PNG was not written
        (folders prepared without ``--all-slices`` have PNGs of target slices only).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_prepared`; also a TC folder.
    """
    root = Path(root).resolve()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    dataset = _manifest(root)["dataset"]
    if dataset == "TC":
        raise ValueError(f"{root}: a TC folder holds crops, not whole volumes; give a prepared MSD or NIH folder")
    infos = read_json(root / "annotations" / f"{dataset}_slices_info.json")
    split_doc = read_json(root / "annotations" / "split.json")
    if split not in split_doc:
        raise ValueError(f"{root / 'annotations' / 'split.json'}: no {split!r} list")
    wanted = set(split_doc[split])
    volumes: dict[str, list[dict]] = {}
    for rec in infos:
        if rec["volume_name"] in wanted:
            rec = dict(rec)
            rec["image"] = str(root / rec["image"]) if rec.get("image") else None
            volumes.setdefault(rec["volume_name"], []).append(rec)
    return {name: sorted(recs, key=lambda r: r["slice_index"]) for name, recs in sorted(volumes.items())}


def read_acquisition(root: str | os.PathLike) -> dict[str, dict]:
    """``{volume_name: acquisition record}`` of a prepared folder (``<DS>_acquisition.json``,
    :func:`preprocessing.acquisition.measure_acquisition`); a TC folder gives those of the MSD / NIH
    folders its crops come from (``split.json`` ``sources`` of ``tc``, ``inherited_from`` of
    ``tc-import --split-from``). Empty when none is recorded (folders prepared before issue 28, TC folders
    made from the release's crops): the envelope then says "not recorded" for those volumes.

    Raises:
        FileNotFoundError / ValueError: not a complete prepared folder (as :func:`read_prepared`).
    """
    root = Path(root).resolve()
    dataset = _manifest(root)["dataset"]
    if dataset == "TC":
        split_doc = read_json(root / "annotations" / "split.json")
        records: dict[str, dict] = {}
        for folder in (split_doc.get("inherited_from") or split_doc.get("sources") or {}).values():
            source = Path(folder) if Path(folder).is_absolute() else root / folder
            if (source / "manifest.json").is_file():
                records.update(read_acquisition(source))
        return records
    path = root / "annotations" / f"{dataset}_acquisition.json"
    return read_json(path) if path.is_file() else {}
