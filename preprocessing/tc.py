"""Tumor-classification (TC) folders (SPEC §4 item 10).

``build_tc``: crops of the pancreas box from prepared MSD and NIH folders. Candidate slices are
the pancreas-detection selection (:func:`preprocessing.slices.select_records`, ``pancreas``,
``ratio > threshold``) of each split; ``paper`` variant: MSD slices with tumor pixels → ``yes``,
NIH slices → ``no``; ``msd-only``: MSD slices with tumor → ``yes``, MSD slices without → ``no``
(no scanner/phase confound); ``panorama``: from a prepared PANORAMA folder, slices with PDAC lesion
voxels (label 1) of PDAC patients → ``yes``, pancreas slices of non-PDAC patients → ``no`` (same
centres and scanners; a PDAC patient's slices without lesion are not used). Per split the larger
class is down-sampled (seeded) to the smaller.
Every crop keeps the split of its source volume, so no volume crosses splits between stages.

``import_tc``: a TC folder from existing crops (the release's ``PANCREAS_00XX_slice_K.png`` = NIH/no,
``pancreas_XXX_slice_K.png`` = MSD/yes, or any crops listed in a CSV), split by volume. A CSV's
volume is named as its source folder names it (``pancreas_002.nii.gz`` → ``pancreas_002``) and keeps
the row's dataset, so the leakage check meets the source's ``(dataset, volume)`` key.

Output: ``slices/*.png``, ``annotations/TC_{train,val,test}.json``, ``annotations/split.json``
(with ``volume_datasets``: ``{volume_name: source dataset}``),
``manifest.json``. A record: ``q_id, image, answer, target ('tumor'), dataset, volume_name,
slice_index, slice_id, width, height`` (+ ``crop_box`` and ``source`` for built crops).
"""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from minigpt4.io import read_json, write_bytes_atomic, write_json_atomic
from preprocessing import layout, output_folder, pipeline, slices, splits
from preprocessing.sources import source_dataset

_RELEASE_NAME = re.compile(r"^(?P<volume>(?P<prefix>PANCREAS|pancreas)_\d+)_slice_(?P<k>\d+)\.png$")


def crop_box(box, width: int, height: int, margin: int = 0) -> tuple[int, int, int, int]:
    """Inclusive pancreas box + margin, clipped to the image: the crop keeps every box row/column.

    Returns ``(x1, y1, x2, y2)`` inclusive; the crop is ``image[y1:y2 + 1, x1:x2 + 1]``.
    """
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin}")
    x1, y1, x2, y2 = (int(v) for v in box)
    return (max(0, x1 - margin), max(0, y1 - margin), min(width - 1, x2 + margin), min(height - 1, y2 + margin))


def _prepared(root, expected: str) -> tuple[Path, dict, list, dict]:
    root = Path(root).resolve()
    ds = layout.dataset_name(root)
    if ds != expected:
        raise ValueError(f"{root}: holds {ds} data, expected a prepared {expected} folder")
    manifest = read_json(root / "manifest.json")
    infos = read_json(root / "annotations" / f"{ds}_slices_info.json")
    split = read_json(root / "annotations" / "split.json")
    return root, manifest, infos, split


def _balance(yes: list, no: list, rng) -> tuple[list, list]:
    n = min(len(yes), len(no))
    pick = lambda rows: rows if len(rows) == n else [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False).tolist())]  # noqa: E731
    return pick(yes), pick(no)


ANNOTATIONS = {f"annotations/TC_{s}.json" for s in splits.SPLITS} | {"annotations/split.json"}


def _start(out: Path, params: dict, overwrite: bool, inputs, planned: set[str]) -> dict:
    """Check the output folder (see :func:`output_folder.check_prepared_folder`) and mark it in progress;
    returns what :func:`_finish` needs to remove only files of earlier runs."""
    ours = (out / "manifest.json").is_file()
    owned = output_folder.check_prepared_folder(out, params, overwrite, inputs=inputs, kinds=("TC",))
    planned = set(planned) | ANNOTATIONS
    output_folder.check_no_foreign(out, owned, lambda rel: rel in planned)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "slices").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "manifest.json", {"dataset": "TC", "status": "incomplete", "parameters": params,
                                              "files": sorted(owned | planned)})
    return {"owned": owned | planned, "ours": ours}


def _finish(out: Path, params: dict, per_split: dict, split_doc: dict, t0: float, extra: dict,
            state: dict) -> dict:
    written = set(ANNOTATIONS)
    counts = {}
    for s in splits.SPLITS:
        rows = sorted(per_split[s], key=lambda r: (r["dataset"], r["volume_name"], r["slice_index"]))
        for q_id, r in enumerate(rows):
            r["q_id"] = q_id
            written.add(r["image"])
        write_json_atomic(out / "annotations" / f"TC_{s}.json", rows)
        counts[f"TC_{s}"] = len(rows)
        counts[f"TC_{s}_yes"] = sum(r["answer"] == "yes" for r in rows)
    write_json_atomic(out / "annotations" / "split.json", split_doc)
    removed = output_folder.clean_stale(out, state["owned"], written, temporaries=state["ours"])
    manifest = {"dataset": "TC", "status": "complete", "parameters": params, "versions": output_folder.versions(),
                "counts": counts, "stale_files_removed": removed,
                "timings": {"wall_s": round(time.perf_counter() - t0, 3)}, **extra, "files": sorted(written)}
    write_json_atomic(out / "manifest.json", manifest)
    print("TC: " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f" → {out}")
    return manifest


VARIANTS = ("paper", "msd-only", "panorama")


def _yes_no(variant: str, cand: dict) -> tuple[list, list]:
    """``(yes, no)`` lists of ``(dataset, record)`` among a split's candidate slices."""
    if variant == "panorama":
        yes = [("PANORAMA", r) for r in cand["PANORAMA"] if r["pixels_tumor"] > 0 and r["patient_label"] == "PDAC"]
        no = [("PANORAMA", r) for r in cand["PANORAMA"] if r["patient_label"] == "non-PDAC" and r["pixels_tumor"] == 0]
        return yes, no
    yes = [("MSD", r) for r in cand["MSD"] if r["pixels_tumor"] > 0]
    if variant == "paper":
        return yes, [("NIH", r) for r in cand["NIH"]]
    return yes, [("MSD", r) for r in cand["MSD"] if r["pixels_tumor"] == 0]


def build_tc(msd, nih, out, variant: str = "paper", margin: int = 0, threshold: float = 0.0, seed: int = 42,
             workers: int = 1, overwrite: bool = False, panorama=None) -> dict:
    """Crop the pancreas box of selected slices of prepared MSD (and NIH) folders, or of a PANORAMA folder.

    Args:
        msd: prepared MSD folder. nih: prepared NIH folder (``paper`` variant only).
        variant: ``paper`` (MSD tumor = yes, NIH = no), ``msd-only`` or ``panorama`` (``panorama``
            folder: PDAC lesion slices = yes, non-PDAC patients' pancreas slices = no).
        panorama: prepared PANORAMA folder (``panorama`` variant only).
        margin: pixels added on each side of the inclusive pancreas box (clipped to the slice).
        threshold: candidate slices have ``pancreas_bbox_ratio > threshold``.

    Returns:
        The manifest.
    """
    from PIL import Image

    t0 = time.perf_counter()
    if variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "paper" and not nih:
        raise ValueError("--variant paper needs --nih (a prepared NIH folder); use --variant msd-only without it")
    if (variant == "panorama") != bool(panorama) or (variant == "panorama" and (msd or nih)):
        raise ValueError("--panorama (a prepared PANORAMA folder) goes with --variant panorama, alone (no --msd/--nih); "
                         "the other variants need --msd")
    if variant != "panorama" and not msd:
        raise ValueError(f"--variant {variant} needs --msd (a prepared MSD folder)")
    slices._check_threshold(threshold)
    out = Path(out)
    extra = {}
    if variant == "panorama":
        pan_root, pan_manifest, pan_infos, pan_split = _prepared(panorama, "PANORAMA")
        sources = {"PANORAMA": (pan_root, pan_infos, pan_split)}
        if pan_manifest.get("overlap"):  # studies that are MSD/NIH scans keep that identity (leakage keys)
            extra["overlap"] = pan_manifest["overlap"]
    else:
        msd_root, _, msd_infos, msd_split = _prepared(msd, "MSD")
        sources = {"MSD": (msd_root, msd_infos, msd_split)}
    if variant == "paper":
        nih_root, _, nih_infos, nih_split = _prepared(nih, "NIH")
        sources["NIH"] = (nih_root, nih_infos, nih_split)
    params = {"variant": variant, "msd": str(sources["MSD"][0]) if "MSD" in sources else None,
              "nih": str(sources["NIH"][0]) if "NIH" in sources else None,
              "margin": int(margin), "threshold": float(threshold), "seed": int(seed)}
    if variant == "panorama":
        params["panorama"] = str(sources["PANORAMA"][0])
    rng = np.random.default_rng(seed)
    chosen = {}
    for s in splits.SPLITS:
        cand = {ds: slices.select_records(infos, split[s], "pancreas", threshold, seed=seed)
                for ds, (_, infos, split) in sources.items()}
        chosen[s] = _balance(*_yes_no(variant, cand), rng)
    planned = {slices.png_name(r["volume_name"], r["slice_index"])
               for yes, no in chosen.values() for _, r in yes + no}
    state = _start(out, params, overwrite, [v[0] for v in sources.values()], planned)
    per_split, split_doc = {}, {"seed": int(seed), "variant": variant,
                                "sources": {k: str(v[0]) for k, v in sources.items()}}
    for s in splits.SPLITS:
        yes, no = chosen[s]
        rows = []
        for answer, group in (("yes", yes), ("no", no)):
            for ds, r in group:
                root = sources[ds][0]
                src = root / r["image"]
                with Image.open(src) as im:
                    pixels = np.asarray(im)
                h, w = pixels.shape[:2]
                x1, y1, x2, y2 = crop_box(r["bbox_pancreas"], w, h, margin)
                crop = pixels[y1:y2 + 1, x1:x2 + 1]
                rel = slices.png_name(r["volume_name"], r["slice_index"])
                write_bytes_atomic(out / rel, pipeline.encode_png(crop))
                rows.append({"image": rel, "answer": answer, "target": "tumor", "dataset": ds,
                             "volume_name": r["volume_name"], "slice_index": r["slice_index"],
                             "slice_id": r["slice_id"], "width": int(crop.shape[1]), "height": int(crop.shape[0]),
                             "crop_box": [x1, y1, x2, y2], "source": r["image"]})
        per_split[s] = rows
        split_doc[s] = sorted({r["volume_name"] for r in rows} | set(
            v for ds in sources for v in sources[ds][2][s]))
    split_doc["volume_datasets"] = volume_datasets(
        [{"dataset": ds, "volume_name": v} for ds in sources for s in splits.SPLITS for v in sources[ds][2][s]])
    return _finish(out, params, per_split, split_doc, t0, extra, state)


def _read_csv(images: Path, csv_path: Path) -> list[dict]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CSV not found")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"image", "dataset", "volume", "slice_index", "answer"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)} (need {sorted(need)})")
        rows = []
        for line, row in enumerate(reader, 2):
            answer = row["answer"].strip().lower()
            if answer not in ("yes", "no"):
                raise ValueError(f"{csv_path}:{line}: answer must be yes or no, got {row['answer']!r}")
            try:
                k = int(row["slice_index"])
            except ValueError:
                raise ValueError(f"{csv_path}:{line}: slice_index is not an integer: {row['slice_index']!r}") from None
            volume = splits.volume_stem(row["volume"])
            if not volume:
                raise ValueError(f"{csv_path}:{line}: column 'volume' is empty")
            try:  # MSD / NIH by a known name (Task07_Pancreas, Pancreas-CT, ...): the leakage check's keys
                dataset = source_dataset(row["dataset"] or "", volume)
            except ValueError as err:
                raise ValueError(f"{csv_path}:{line}: {err}") from None
            # the paper's JSON names volumes as files (pancreas_002.nii.gz): keys use the stem, as the source folder does
            rows.append({"file": images / row["image"], "dataset": dataset, "volume_name": volume,
                         "slice_index": k, "answer": answer})
    return rows


def volume_datasets(rows) -> dict[str, str]:
    """``{volume_name: source dataset}`` (``split.json`` ``volume_datasets``: the leakage check's
    key of each TC volume is ``(dataset, volume_name)``).

    Raises:
        ValueError: one volume name under two datasets (the split lists names only).
    """
    found: dict[str, str] = {}
    for r in rows:
        if found.setdefault(r["volume_name"], r["dataset"]) != r["dataset"]:
            raise ValueError(f"volume {r['volume_name']!r} is listed under two datasets "
                             f"({found[r['volume_name']]}, {r['dataset']}); volume names must be unique")
    return dict(sorted(found.items()))


def inherited_split(volumes: dict[str, set], split_from) -> dict:
    """The cascade's split for crop volumes: each volume takes the split it has in the prepared
    folder of its dataset (``split.json`` of an MSD / NIH folder among ``split_from``), so that no
    TC test crop comes from a volume an earlier stage trained on.

    Args:
        volumes: ``{dataset: {volume_name, ...}}`` of the crops.
        split_from: prepared folders (``python -m preprocessing msd|nih``).
    Returns:
        ``{"inherited_from": {dataset: folder}, "train": [...], "val": [...], "test": [...]}``.
    Raises:
        ValueError: a crop dataset without a folder, two folders of one dataset, or crop volumes
            that the folder does not hold (listed).
    """
    where, sources = {}, {}
    for folder in split_from:
        root = Path(folder).resolve()
        ds = layout.dataset_name(root)
        if ds in sources:
            raise ValueError(f"--split-from: two {ds} folders ({sources[ds]}, {root})")
        sources[ds] = str(root)
        split_path = root / "annotations" / "split.json"
        where[ds] = splits.split_of(splits.check_split(read_json(split_path), split_path))
    doc: dict = {"inherited_from": sources, **{s: [] for s in splits.SPLITS}}
    for ds, names in sorted(volumes.items()):
        if ds not in where:
            raise ValueError(f"--split-from: no prepared {ds} folder given for the {ds} crops "
                             f"(given: {sorted(sources) or 'none'})")
        unknown = sorted(v for v in names if v not in where[ds])
        if unknown:
            raise ValueError(f"--split-from {sources[ds]}: {len(unknown)} {ds} crop volume(s) are not in its "
                             f"split.json: {unknown[:10]}")
        for v in names:
            doc[where[ds][v]].append(v)
    for s in splits.SPLITS:
        doc[s].sort()
    return doc


def import_tc(images, out, csv_path: Optional[str] = None, test_ratio: float = 0.2, val_ratio: float = 0.1,
              seed: int = 42, overwrite: bool = False, split_from: Optional[list] = None) -> dict:
    """Turn existing crops into a TC folder (split by volume; ratios 0 and 1 allowed).

    Without a CSV, file names decide: ``PANCREAS_00XX_slice_K.png`` → NIH, ``no``;
    ``pancreas_XXX_slice_K.png`` → MSD, ``yes``; any other PNG is an error naming it.
    With ``split_from`` (prepared MSD / NIH folders), every crop volume keeps the split of the
    cascade (:func:`inherited_split`) instead of a new draw; the ratios are then unused.
    """
    from PIL import Image

    t0 = time.perf_counter()
    images = Path(images).resolve()
    out = Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: --images folder not found")
    if csv_path:
        rows = _read_csv(images, Path(csv_path))
    else:
        rows = []
        for p in sorted(images.glob("*.png")):
            m = _RELEASE_NAME.match(p.name)
            if not m:
                raise ValueError(f"{p}: name is neither PANCREAS_00XX_slice_K.png (NIH) nor pancreas_XXX_slice_K.png "
                                 "(MSD); give a --csv for other crops")
            nih = m["prefix"] == "PANCREAS"
            rows.append({"file": p, "dataset": "NIH" if nih else "MSD", "volume_name": m["volume"],
                         "slice_index": int(m["k"]), "answer": "no" if nih else "yes"})
    if not rows:
        raise ValueError(f"{images}: no crops found")
    params = {"import": str(images), "csv": str(Path(csv_path).resolve()) if csv_path else None,
              "test_ratio": float(test_ratio), "val_ratio": float(val_ratio), "seed": int(seed)}
    if split_from:
        by_dataset: dict[str, set] = {}
        for r in rows:
            by_dataset.setdefault(r["dataset"], set()).add(r["volume_name"])
        split_doc = inherited_split(by_dataset, split_from)
        params["split_from"] = split_doc["inherited_from"]
    else:
        split_doc = splits.split_volumes({r["volume_name"] for r in rows}, test_ratio, val_ratio, seed)
    split_doc["volume_datasets"] = volume_datasets(rows)
    where = splits.split_of(split_doc)
    names = set()
    for r in rows:
        rel = f"slices/{r['file'].name}"
        if rel in names:
            raise ValueError(f"{r['file']}: two crops share the file name {r['file'].name}")
        names.add(rel)
    state = _start(out, params, overwrite, [images, csv_path], names)
    per_split = {s: [] for s in splits.SPLITS}
    for r in rows:
        src = r["file"]
        if not src.is_file():
            raise FileNotFoundError(f"{src}: crop image not found")
        rel = f"slices/{src.name}"
        try:
            with Image.open(src) as im:
                width, height = im.size
        except OSError as err:
            raise ValueError(f"{src}: not a readable image ({err})") from None
        dst = out / rel
        write_bytes_atomic(dst, src.read_bytes())
        per_split[where[r["volume_name"]]].append(
            {"image": rel, "answer": r["answer"], "target": "tumor", "dataset": r["dataset"],
             "volume_name": r["volume_name"], "slice_index": r["slice_index"],
             "slice_id": f"{r['volume_name']}_slice_{r['slice_index']}", "width": width, "height": height})
    return _finish(out, params, per_split, split_doc, t0, {}, state)
