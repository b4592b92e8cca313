"""The msd / nih / abd pipeline: pair volumes, compute records, write PNGs and JSON.

One job per volume (run in a process pool with ``workers > 1``); each job loads the image and
its label map, brings both into the display frame (see :mod:`preprocessing.volumes`), computes
every slice's record with whole-volume numpy reductions, normalises and writes the PNGs of the
slices that contain a target. The parent then writes ``<DS>_slices_info.json``, ``split.json``,
the selected sets and ``manifest.json`` (last, so a folder with a complete manifest is complete).
"""

from __future__ import annotations

import io
import os
import platform
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from minigpt4.io import atomic_path, read_json, write_json_atomic
from preprocessing import normalize, slices, splits, volumes
from preprocessing.volumes import VolumeError

DEFAULT_LABELS = {
    "MSD": {"pancreas": 1, "tumor": 2},
    "NIH": {"pancreas": 1},
    "ABD": {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4},
}
PNG_COMPRESS_LEVEL = 6  # PIL's default; the benchmark floor uses the same


class PreparationError(ValueError):
    """A problem with the inputs or the output folder as a whole."""


@dataclass
class Options:
    """Parameters of one msd/nih/abd run (``parameters`` in the manifest)."""

    dataset: str
    images: list
    labels: str
    out: str
    normalization: str = "paper"
    window: tuple = normalize.DEFAULT_WINDOW
    threshold: float = 0.6
    test_ratio: float = 0.2
    val_ratio: float = 0.1
    seed: int = 42
    balanced: bool = False
    label_map: Optional[dict] = None
    on_error: str = "fail"
    workers: int = 1
    overwrite: bool = False
    exclude_overlap_with: Optional[list] = None
    """Folders (prepared or raw) whose scans must stay out of this dataset's val/test (ABD)."""

    def parameters(self) -> dict:
        """What determines the output (workers/overwrite do not)."""
        return {
            "dataset": self.dataset,
            "images": [str(Path(p).resolve()) for p in self.images],
            "labels": str(Path(self.labels).resolve()),
            "normalization": self.normalization,
            "window": [float(v) for v in self.window],
            "threshold": float(self.threshold),
            "test_ratio": float(self.test_ratio),
            "val_ratio": float(self.val_ratio),
            "seed": int(self.seed),
            "balanced": bool(self.balanced),
            "label_map": dict(self.label_map or DEFAULT_LABELS[self.dataset]),
            "on_error": self.on_error,
            # only when given, so folders prepared without the option keep their parameters
            **({"exclude_overlap_with": [str(Path(p).resolve()) for p in self.exclude_overlap_with]}
               if self.exclude_overlap_with else {}),
        }


# ----------------------------------------------------------------------------- discovery


@dataclass
class Job:
    dataset: str
    volume_name: str
    image: str  # NIfTI file or DICOM folder
    label: str
    kind: str  # "nifti" | "dicom"
    label_map: dict = field(default_factory=dict)
    strict_labels: bool = True
    normalization: str = "paper"
    window: tuple = normalize.DEFAULT_WINDOW
    out: str = ""
    balanced: bool = False
    seed: int = 42


def _number(name: str) -> Optional[int]:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _need_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found")
    return path


def discover(opts: Options) -> tuple[list[Job], list[dict]]:
    """Pair images with labels. Returns (jobs, problems) where problems are unpaired files."""
    ds = opts.dataset
    label_dir = _need_dir(opts.labels, "--labels")
    image_dirs = [_need_dir(p, "--images") for p in opts.images]
    pairs: list[tuple[str, Path, Optional[Path], str]] = []  # name, image, label, kind
    problems: list[dict] = []
    if ds in ("MSD", "ABD"):
        labels = {volumes.nifti_stem(p): p for p in _visible(label_dir) if volumes.is_nifti(p)}
        used = set()
        for folder in image_dirs:
            for p in _visible(folder):
                if not volumes.is_nifti(p):
                    continue
                stem = volumes.nifti_stem(p)
                name = stem[: -len("_0000")] if ds == "ABD" and stem.endswith("_0000") else stem
                label = labels.get(name)
                used.add(name)
                pairs.append((name, p, label, "nifti"))
        for name in sorted(set(labels) - used):
            problems.append({"volume": name, "file": str(labels[name]), "reason": "label without image"})
    else:  # NIH: DICOM series folders or NIfTI images, labels label00XX.nii.gz, paired by number
        labels = {}
        for p in _visible(label_dir):
            if volumes.is_nifti(p) and _number(p.name) is not None:
                labels[_number(volumes.nifti_stem(p))] = p
        used = set()
        for folder in image_dirs:
            for p in _visible(folder):
                if p.is_dir():
                    kind = "dicom"
                elif volumes.is_nifti(p):
                    kind = "nifti"
                else:
                    continue
                number = _number(volumes.nifti_stem(p) if kind == "nifti" else p.name)
                if number is None:
                    problems.append({"volume": p.name, "file": str(p), "reason": "no patient number in the name"})
                    continue
                used.add(number)
                pairs.append((f"PANCREAS_{number:04d}", p, labels.get(number), kind))
        for number in sorted(set(labels) - used):
            problems.append({"volume": f"PANCREAS_{number:04d}", "file": str(labels[number]),
                             "reason": "label without image"})
    names = [n for n, *_ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PreparationError(f"{', '.join(map(str, opts.images))}: several images for volume(s) {dup}")
    if not pairs:
        raise PreparationError(f"{', '.join(map(str, opts.images))}: no {ds} images found "
                               f"(expected {'*.nii.gz' if ds != 'NIH' else 'DICOM series folders or *.nii.gz'})")
    label_map = dict(opts.label_map or DEFAULT_LABELS[ds])
    jobs = []
    for name, image, label, kind in sorted(pairs):
        if label is None:
            problems.append({"volume": name, "file": str(image), "reason": f"missing label file in {label_dir}"})
            continue
        jobs.append(Job(ds, name, str(image), str(label), kind, label_map, opts.label_map is None,
                        opts.normalization, tuple(opts.window), str(opts.out), opts.balanced, opts.seed))
    return jobs, problems


# ----------------------------------------------------------------------------- one volume


def _right_component(mask: np.ndarray) -> np.ndarray:
    """Keep the connected components of a display-frame mask whose centre lies in the image-left
    half (the patient's right): "kidney" means the right kidney (SPEC §4 item 11)."""
    from scipy import ndimage

    if not mask.any():
        return mask
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    centres = ndimage.center_of_mass(mask, labelled, range(1, n + 1))
    half = mask.shape[1] / 2.0
    keep = [i + 1 for i, c in enumerate(centres) if c[1] < half]
    return np.isin(labelled, keep) if keep else np.zeros_like(mask)


def target_masks(dataset: str, label_d: np.ndarray, label_map: dict) -> dict[str, np.ndarray]:
    """Display-frame label map → {target: (H, W, S) bool}."""
    if dataset == "MSD":
        tumor = label_d == label_map["tumor"]
        return {"pancreas": (label_d == label_map["pancreas"]) | tumor, "tumor": tumor}
    masks = {t: label_d == label_map[t] for t in slices.DATASET_TARGETS[dataset]}
    if dataset == "ABD":
        masks["kidney"] = _right_component(masks["kidney"])
    return masks


def _check_label_values(job: Job, label: np.ndarray) -> None:
    if not job.strict_labels:
        return
    allowed = sorted(set(job.label_map.values()) | {0})
    lo, hi = int(label.min()), int(label.max())
    if lo >= 0 and hi <= allowed[-1] and allowed == list(range(allowed[-1] + 1)):
        return
    bad = sorted(set(np.unique(label).tolist()) - set(allowed))
    if bad:
        raise VolumeError(job.label, f"unexpected label values {bad[:10]} (expected {allowed} for {job.dataset}; "
                                     "use --label-map for other label schemes)")


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) uint8 → PNG bytes (8-bit grayscale)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="L").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _negatives(job: Job, candidates: np.ndarray, n: int) -> np.ndarray:
    if n <= 0 or candidates.size == 0:
        return candidates[:0]
    rng = np.random.default_rng([job.seed, zlib.crc32(job.volume_name.encode())])
    return np.sort(rng.choice(candidates, size=min(n, candidates.size), replace=False))


def process_volume(job: Job) -> dict:
    """Load, check, compute records and write PNGs for one volume.

    Returns:
        ``{"volume", "records", "written", "timings"}`` or ``{"volume", "error": {"file",
        "problem"}}`` (errors are returned, not raised, so they cross process boundaries intact).
    """
    t0 = time.perf_counter()
    try:
        if job.kind == "dicom":
            image = volumes.read_dicom_series(job.image)
        else:
            image = volumes.load_nifti(job.image)
        label_vol = volumes.load_nifti(job.label)
        label = volumes.label_array(label_vol)
        label = volumes.align_label_to_image(label, label_vol.affine, image.array.shape, image.affine,
                                             job.label, job.image)
        _check_label_values(job, label)
    except VolumeError as err:
        return {"volume": job.volume_name, "error": {"file": err.path, "problem": err.problem}}
    t1 = time.perf_counter()
    transform = volumes.display_transform(image.affine)
    from nibabel.orientations import apply_orientation

    label_d = apply_orientation(label, transform)
    image_d = apply_orientation(image.array, transform)
    masks = target_masks(job.dataset, label_d, job.label_map)
    records = slices.volume_records(job.dataset, job.volume_name, masks)
    present = np.zeros(label_d.shape[2], dtype=bool)
    for m in masks.values():
        present |= m.any(axis=(0, 1))
    write = np.nonzero(present)[0]
    if job.balanced:
        write = np.union1d(write, _negatives(job, np.nonzero(~present)[0], int(present.sum())))
    t2 = time.perf_counter()
    out = Path(job.out)
    for k in write.tolist():
        hu = image_d[:, :, k]
        if image.slope != 1.0 or image.inter != 0.0:
            hu = hu.astype(np.float32) * np.float32(image.slope) + np.float32(image.inter)
        pixels = normalize.normalize_slice(hu, job.normalization, job.window)
        rel = slices.png_name(job.volume_name, k)
        with atomic_path(out / rel) as tmp:
            tmp.write_bytes(encode_png(pixels))
        records[k]["image"] = rel
    t3 = time.perf_counter()
    return {"volume": job.volume_name, "records": records, "written": len(write),
            "has_target": bool(present.any()),
            "timings": {"read_s": t1 - t0, "stats_s": t2 - t1, "write_s": t3 - t2}}


# ----------------------------------------------------------------------------- whole run


def versions() -> dict:
    import nibabel
    import PIL
    import pydicom

    return {"python": platform.python_version(), "numpy": np.__version__, "nibabel": nibabel.__version__,
            "pydicom": pydicom.__version__, "pillow": PIL.__version__}


def check_output_folder(out: Path, parameters: dict, overwrite: bool) -> None:
    """Refuse an output folder made with other parameters unless ``overwrite``."""
    manifest = out / "manifest.json"
    if manifest.is_file() and not overwrite:
        try:
            old = read_json(manifest).get("parameters")
        except ValueError:
            old = None
        if old != parameters:
            diff = sorted(k for k in set(parameters) | set(old or {}) if (old or {}).get(k) != parameters.get(k))
            raise PreparationError(f"{out}: folder was prepared with different parameters ({', '.join(diff)}); "
                                   "use --overwrite to replace it or choose another --out")


def clean_stale(out: Path, keep: set[str]) -> int:
    """Remove PNGs of earlier runs that this run did not write, and temporary leftovers."""
    removed = 0
    for folder in (out / "slices", out / "annotations"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            rel = f"{folder.name}/{p.name}"
            stale_png = folder.name == "slices" and re.fullmatch(r".+_slice_\d+\.png", p.name) and rel not in keep
            if stale_png or (p.name.startswith(".") and p.name.endswith(".tmp")):
                p.unlink()
                removed += 1
    return removed


def run_jobs(jobs: Sequence, worker, workers: int):
    """Map ``worker`` over jobs, in-process for one worker, else with a fork/spawn pool."""
    if workers <= 1 or len(jobs) <= 1:
        return [worker(j) for j in jobs]
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
        return pool.map(worker, jobs, chunksize=1)


def write_selections(ann: Path, dataset: str, infos: list[dict], split: dict, threshold: float,
                     seed: int, balanced: bool) -> dict:
    """Write ``<DS>_{split}.json`` (+ tumor, + balanced) with :func:`slices.select_records`."""
    counts = {}
    sets = [(dataset, "organs" if dataset == "ABD" else "pancreas")]
    if dataset == "MSD":
        sets.append(("MSD_tumor", "tumor"))
    for prefix, target in sets:
        for s in splits.SPLITS:
            selected = slices.select_records(infos, split[s], target, threshold, seed=seed)
            write_json_atomic(ann / f"{prefix}_{s}.json", selected)
            counts[f"{prefix}_{s}"] = len(selected)
            balanced_path = ann / f"{prefix}_balanced_{s}.json"
            if balanced and target != "organs":
                bal = slices.select_balanced(infos, split[s], target, threshold, seed=seed)
                write_json_atomic(balanced_path, bal)
                counts[f"{prefix}_balanced_{s}"] = len(bal)
            elif balanced_path.exists():  # left by an earlier --balanced run of this folder
                balanced_path.unlink()
    return counts


def prepare(opts: Options, log=print) -> dict:
    """Run the msd / nih / abd pipeline. Returns the manifest.

    Raises:
        FileNotFoundError: an input folder is missing.
        PreparationError: bad output folder, no images, invalid options.
        VolumeError: a bad volume with ``on_error='fail'`` (names the file and the problem).
    """
    t_start = time.perf_counter()
    ds = opts.dataset
    if opts.normalization not in normalize.METHODS:
        raise PreparationError(f"unknown normalization {opts.normalization!r}")
    if opts.on_error not in ("fail", "skip"):
        raise PreparationError(f"--on-error must be fail or skip, got {opts.on_error!r}")
    slices._check_threshold(opts.threshold)
    if opts.label_map is not None:
        missing = [t for t in slices.DATASET_TARGETS[ds] if t not in opts.label_map]
        extra = [t for t in opts.label_map if t not in slices.DATASET_TARGETS[ds]]
        if missing or extra:
            raise PreparationError(f"--label-map must give exactly {list(slices.DATASET_TARGETS[ds])} "
                                   f"(missing {missing}, unknown {extra})")
    out = Path(opts.out)
    params = opts.parameters()
    check_output_folder(out, params, opts.overwrite)
    jobs, problems = discover(opts)
    problems.sort(key=lambda p: p["volume"])
    if problems and opts.on_error == "fail":
        if len(problems) == 1:
            raise VolumeError(problems[0]["file"], problems[0]["reason"])
        raise PreparationError(f"{len(problems)} unpaired inputs (use --on-error skip to go on without them): "
                               + "; ".join(f"{p['file']}: {p['reason']}" for p in problems[:10]))
    ann = out / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    (out / "slices").mkdir(parents=True, exist_ok=True)
    # Marks the folder as in progress: read_prepared refuses it until the final manifest.
    write_json_atomic(out / "manifest.json", {"dataset": ds, "status": "incomplete", "parameters": params})
    workers = max(1, int(opts.workers or os.cpu_count() or 1))
    log(f"{ds}: {len(jobs)} volumes, {workers} worker(s) → {out}")
    results = run_jobs(jobs, process_volume, workers)
    skipped = list(problems)
    infos, written, timings, without_target = [], set(), {"read_s": 0.0, "stats_s": 0.0, "write_s": 0.0}, []
    for job, res in zip(jobs, results):
        if "error" in res:
            if opts.on_error == "fail":
                raise VolumeError(res["error"]["file"], res["error"]["problem"])
            skipped.append({"volume": job.volume_name, "file": res["error"]["file"], "reason": res["error"]["problem"]})
            log(f"skipped {job.volume_name}: {res['error']['file']}: {res['error']['problem']}")
            continue
        infos.extend(res["records"])
        written.update(r["image"] for r in res["records"] if r["image"])
        if not res["has_target"]:
            without_target.append(job.volume_name)
        for k, v in res["timings"].items():
            timings[k] += v
    done = sorted({r["volume_name"] for r in infos})
    if not done:
        raise PreparationError(f"{out}: no volume could be prepared ({len(skipped)} skipped)")
    overlap_found = None
    if opts.exclude_overlap_with:  # the same scans in other datasets: never in this val/test
        from preprocessing import overlap

        own = [(j.volume_name, j.image, j.kind) for j in jobs if j.volume_name in set(done)]
        overlap_found = overlap.find_overlap(own, opts.exclude_overlap_with, workers)
        split = overlap.split_keeping_in_train(done, list(overlap_found), opts.test_ratio, opts.val_ratio, opts.seed)
        log(f"{ds}: {len(overlap_found)} volume(s) are scans of {', '.join(map(str, opts.exclude_overlap_with))}: kept in train")
    else:
        split = splits.split_volumes(done, opts.test_ratio, opts.val_ratio, opts.seed)
    write_json_atomic(ann / f"{ds}_slices_info.json", infos)
    write_json_atomic(ann / "split.json", split)
    counts = write_selections(ann, ds, infos, split, opts.threshold, opts.seed, opts.balanced)
    removed = clean_stale(out, written)
    timings["wall_s"] = time.perf_counter() - t_start
    manifest = {
        "dataset": ds, "status": "complete", "parameters": params, "versions": versions(),
        "counts": {"volumes": len(done), "slices": len(infos), "pngs": len(written),
                   "split_volumes": {s: len(split[s]) for s in splits.SPLITS}, **counts},
        "skipped": skipped, "volumes_without_target": without_target, "stale_files_removed": removed,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if overlap_found is not None:
        manifest["overlap"] = overlap_found
    write_json_atomic(out / "manifest.json", manifest)
    log(f"{ds}: {len(done)} volumes, {len(written)} PNGs, selected "
        + ", ".join(f"{k}={v}" for k, v in counts.items()) + f" ({timings['wall_s']:.1f} s)")
    return manifest
