"""PANORAMA scoring time per study (issue 27.8): ``picai_eval`` lesion matching on CT-sized
detection maps, beside the floor of the same run: reading the study's map and label files.

Per study: a 512 × 512 × ``--slices`` detection map (``--candidates`` box candidates, one of them
on the lesion) and its label (one ellipsoid lesion plus pancreas voxels, as PANORAMA's labels),
both written as ``.nii.gz``. Timed, best of ``--repeats``, per study:

* **floor**: read both files with nibabel (decompress + decode), as any scorer must;
* **matching**: :func:`minigpt4.evaluation.panorama.score_cases` on the arrays in memory
  (picai_eval's connected components, IoU of every candidate with every lesion, assignment,
  inside the box holding every non-zero voxel), bootstrap off; the ratio matching / floor is reported;
* **whole volume**: ``picai_eval.eval.evaluate_case`` on the whole arrays, as ``picai_eval.evaluate``
  runs it (same lesion list, checked);
* **bootstrap**: the 1,000-resample CIs over all studies (once, not per study).

    python benchmarks/bench_panorama_eval.py                     # 6 studies of 512x512x120
    python benchmarks/bench_panorama_eval.py --studies 2 --slices 40 --json out.json

Limits: synthetic maps (the time depends on the volume's size and the number of candidates, not on
the image); real PANORAMA CTs have 512 × 512 × ~40-1,000 voxels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt4.evaluation.panorama import PanoramaCase, evaluate_case, score_cases  # noqa: E402
from minigpt4.io import to_json, write_json_atomic  # noqa: E402
from minigpt4.scan_outputs.detection_map import write_detection_map  # noqa: E402
from preprocessing.synthetic import write_nifti  # noqa: E402


def make_study(folder: Path, index: int, size: int, slices: int, candidates: int, seed: int) -> tuple[Path, Path]:
    """``(map, label)`` files of one synthetic study."""
    rng = np.random.default_rng(seed + index)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    label = np.zeros((size, size, slices), dtype=np.uint8)
    cx, cy, cz = size // 2, size // 2, slices // 2
    x, y, z = np.ogrid[:size, :size, :slices]
    label[((x - cx) / 60) ** 2 + ((y - cy) / 30) ** 2 + ((z - cz) / max(2, slices // 6)) ** 2 <= 1] = 4  # pancreas
    lesion = ((x - cx) / 12) ** 2 + ((y - cy) / 12) ** 2 + ((z - cz) / max(1, slices // 20)) ** 2 <= 1
    label[lesion] = 1
    dmap = np.zeros(label.shape, dtype=np.float32)
    dmap[cx - 12:cx + 13, cy - 12:cy + 13, max(0, cz - 2):cz + 3] = 0.9  # the hit
    for k in range(1, candidates):  # false positives, apart from each other
        x0, y0 = 20 + 40 * k % (size - 60), 20 + 70 * k % (size - 60)
        dmap[x0:x0 + 15, y0:y0 + 15, 2:4] = float(rng.uniform(0.1, 0.8))
    map_path, label_path = folder / f"s{index}_map.nii.gz", folder / f"s{index}_label.nii.gz"
    write_detection_map(map_path, dmap, affine)
    write_nifti(label_path, label, affine)
    return map_path, label_path


def read_pair(map_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(nib.load(map_path).dataobj), np.asarray(nib.load(label_path).dataobj)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--candidates", type=int, default=3, help="lesion candidates per map (one hits)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_panorama_") as tmp:
        folder = Path(tmp)
        files = [make_study(folder, i, args.size, args.slices, args.candidates, args.seed) for i in range(args.studies)]
        warm = np.zeros((8, 8, 8), np.float32)
        score_cases([PanoramaCase("warm-up", warm, warm > 0, 0.5, True)], n_bootstrap=0)  # imports, first calls
        floor, matching, whole = [], [], []
        cases, same = [], True
        for i, (map_path, label_path) in enumerate(files):
            best_read, best_match, best_whole = float("inf"), float("inf"), float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                dmap, label = read_pair(map_path, label_path)
                best_read = min(best_read, time.perf_counter() - start)
                case = PanoramaCase(f"s{i}", dmap, label == 1, likelihood=0.5 + 0.05 * i, pdac=i % 2 == 0)
                start = time.perf_counter()
                _, metrics = score_cases([case], n_bootstrap=0)
                best_match = min(best_match, time.perf_counter() - start)
                start = time.perf_counter()
                reference, *_ = evaluate_case(dmap, (label == 1).astype(np.int32))
                best_whole = min(best_whole, time.perf_counter() - start)
                same = same and sorted(reference) == sorted(metrics.lesion_results[f"s{i}"])
            floor.append(best_read)
            matching.append(best_match)
            whole.append(best_whole)
            cases.append(case)
        start = time.perf_counter()
        section, _ = score_cases(cases, n_bootstrap=args.bootstrap, seed=args.seed)
        all_s = time.perf_counter() - start
    result = {
        "studies": args.studies, "shape": [args.size, args.size, args.slices], "candidates": args.candidates,
        "repeats": args.repeats,
        "floor_read_s_per_study": float(np.mean(floor)),
        "matching_s_per_study": float(np.mean(matching)),
        "ratio_matching_to_floor": float(np.mean(matching) / np.mean(floor)),
        "whole_volume_s_per_study": float(np.mean(whole)),
        "ratio_whole_volume_to_floor": float(np.mean(whole) / np.mean(floor)),
        "same_lesion_list_as_whole_volume": same,
        "all_studies_with_bootstrap_s": all_s, "bootstrap": args.bootstrap,
        "check": {"auroc": section["auroc"], "ap": section["ap"], "n_true_positive": section["n_true_positive"]},
    }
    print(to_json(result, indent=1))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
