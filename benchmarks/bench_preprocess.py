"""Preprocessing speed: the pipeline against the I/O floor measured in the same run.

Generates ``--n`` synthetic 512×512×100 MSD phantoms (once, cached in ``--data``), then times

* **pipeline**: ``python -m preprocessing msd`` (in-process ``prepare``) with 1 worker and with
  ``--workers`` (default: all cores), into a fresh folder each time;
* **floor**: reading the same image and label volumes fully (nibabel, gzip) and encoding and
  writing the same PNGs (the pipeline's own 8-bit slices, decoded beforehand) and nothing else.

Prints the wall times, slices per second and the ratio pipeline / floor (target ≤ 1.5 with one
worker). Usage: ``python benchmarks/bench_preprocess.py [--n 8] [--size 512] [--slices 100]``.

``--dataset panorama``: the same on PANORAMA-format volumes (``python -m preprocessing panorama``):
``--n`` studies of the phantom generator (:mod:`preprocessing.synthetic_panorama`, one study per
patient, stored LPS) whose labels are rewritten as float64, as most of the real release's labels
are (``../shared/data/panorama``), so reading and converting them is part of what is timed; the
clinical sheet is read by the pipeline, the floor reads the same image and label files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
from PIL import Image  # noqa: E402

from minigpt4.io import write_bytes_atomic  # noqa: E402
from preprocessing import synthetic, synthetic_panorama  # noqa: E402
from preprocessing.panorama import prepare_panorama  # noqa: E402
from preprocessing.pipeline import Options, encode_png, prepare  # noqa: E402


def volume_files(data: Path, dataset: str, name: str) -> tuple[Path, Path]:
    """(image, label) files of volume ``name`` in a generated folder."""
    if dataset == "panorama":
        label = next(p for p in (data / "manual_labels" / f"{name}.nii.gz", data / "automatic_labels" / f"{name}.nii.gz")
                     if p.is_file())
        return data / "images" / f"{name}_0000.nii.gz", label
    return data / "imagesTr" / f"{name}.nii.gz", data / "labelsTr" / f"{name}.nii.gz"


def floor(data: Path, pngs: dict[str, list[tuple[str, np.ndarray]]], out: Path, dataset: str = "msd") -> float:
    """Read every volume pair fully and write the given PNGs; returns seconds."""
    t0 = time.perf_counter()
    for name, slices in pngs.items():
        for path in volume_files(data, dataset, name):
            np.asarray(nib.load(str(path)).dataobj)
        for rel, pixels in slices:
            write_bytes_atomic(out / rel, encode_png(pixels))
    return time.perf_counter() - t0


def run_pipeline(data: Path, out: Path, workers: int, dataset: str = "msd") -> tuple[float, dict]:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    if dataset == "panorama":
        manifest = prepare_panorama(Options(
            dataset="PANORAMA", images=[str(data / "images")], out=str(out), workers=workers,
            labels=[("manual", str(data / "manual_labels")), ("automatic", str(data / "automatic_labels"))],
            clinical=str(data / "clinical_information.xlsx")), log=lambda *_: None)
    else:
        manifest = prepare(Options(dataset="MSD", images=[str(data / "imagesTr")], labels=str(data / "labelsTr"),
                                   out=str(out), workers=workers), log=lambda *_: None)
    return time.perf_counter() - t0, manifest


def generate(data: Path, dataset: str, n: int, slices: int, size: int) -> int:
    """Phantoms for the benchmark in ``data`` (kept between runs); returns the number of volumes."""
    if dataset == "msd":
        if not (data / "imagesTr").is_dir() or len(list((data / "imagesTr").glob("*.nii.gz"))) != n:
            synthetic.generate(data, "msd", n, slices, size, "RAS", seed=0, log=lambda *_: None)
        return n
    if (data / "images").is_dir() and len(list((data / "images").glob("*.nii.gz"))) == n:
        return n
    synthetic_panorama.generate(data, n, slices, size, "LPS", seed=0, studies=1, log=lambda *_: None, overwrite=True)
    for path in sorted(data.glob("*_labels/*.nii.gz")):  # float64 labels, as the release stores most of them
        img = nib.load(str(path))
        synthetic.write_nifti(path, np.asarray(img.dataobj).astype(np.float64), img.affine)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("msd", "panorama"), default="msd")
    p.add_argument("--n", type=int, default=8, help="volumes (panorama: studies)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--data", help="folder for the phantoms (kept between runs); default: a temporary folder")
    p.add_argument("--repeat", type=int, default=3, help="best of N timings")
    p.add_argument("--json", help="also write the figures here (machine-readable, for benchmarks/run_all.py)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    data = Path(args.data) if args.data else tmp / "data"
    t0 = time.perf_counter()
    generate(data, args.dataset, args.n, args.slices, args.size)
    print(f"{args.dataset} phantoms {args.size}x{args.size}x{args.slices} ready in {time.perf_counter() - t0:.1f} s")
    ds = args.dataset
    try:
        # First run: gives the PNG list for the floor (and warms the page cache for both).
        run_pipeline(data, tmp / "out1", 1, ds)
        pngs: dict[str, list] = {}
        for png in sorted((tmp / "out1" / "slices").glob("*.png")):
            name = png.name.rsplit("_slice_", 1)[0]
            pngs.setdefault(name, []).append((f"slices/{png.name}", np.asarray(Image.open(png))))
        n_png = sum(len(v) for v in pngs.values())
        # Interleaved repeats, best of each: the machine may be shared, so also CPU seconds.
        walls = {"floor": [], "one": []}
        cpus = {"floor": [], "one": []}
        manifest = None
        for i in range(args.repeat):
            c0 = time.process_time()
            walls["floor"].append(floor(data, pngs, tmp / f"floor{i}", ds))
            cpus["floor"].append(time.process_time() - c0)
            c0 = time.process_time()
            wall, manifest = run_pipeline(data, tmp / "out1", 1, ds)
            walls["one"].append(wall)
            cpus["one"].append(time.process_time() - c0)
        t_floor, t1 = min(walls["floor"]), min(walls["one"])
        c_floor, c1 = min(cpus["floor"]), min(cpus["one"])
        tw = min(run_pipeline(data, tmp / "outw", args.workers, ds)[0] for _ in range(args.repeat))
        tf = manifest["timings"]
        print(f"{args.n} {ds} volumes {args.size}x{args.size}x{args.slices}, {n_png} PNGs, {os.cpu_count()} cores")
        print(f"floor (read volumes + encode/write the same PNGs): {t_floor:6.2f} s wall, {c_floor:6.2f} s CPU")
        print(f"pipeline, 1 worker:   {t1:6.2f} s wall ({n_png / t1:5.1f} slices/s), {c1:6.2f} s CPU; "
              f"ratio {t1 / t_floor:.2f}x floor (wall), {c1 / c_floor:.2f}x (CPU)"
              f"  [read {tf['read_s']:.2f} s, stats {tf['stats_s']:.2f} s, normalise+write {tf['write_s']:.2f} s]")
        print(f"pipeline, {args.workers} workers: {tw:6.2f} s wall ({n_png / tw:5.1f} slices/s); ratio {tw / t_floor:.2f}x "
              f"floor, speed-up {t1 / tw:.2f}x over 1 worker")
        if args.json:
            from minigpt4.io import write_json_atomic

            write_json_atomic(args.json, {
                "dataset": ds, "volumes": args.n, "size": args.size, "slices": args.slices, "pngs": n_png, "cores": os.cpu_count(),
                "repeat": args.repeat,
                "floor": {"wall_s": t_floor, "cpu_s": c_floor},
                "one_worker": {"wall_s": t1, "cpu_s": c1, "slices_per_s": n_png / t1,
                               "read_s": tf["read_s"], "stats_s": tf["stats_s"], "write_s": tf["write_s"]},
                "many_workers": {"workers": args.workers, "wall_s": tw, "slices_per_s": n_png / tw},
                "ratio_wall": t1 / t_floor, "ratio_cpu": c1 / c_floor, "speedup_workers": t1 / tw})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
