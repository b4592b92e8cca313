"""``python -m preprocessing report DIR [DIR ...]``: slices per threshold (paper Appendix Table 1).

For each prepared MSD / NIH folder, the number of selected pancreas slices (``pancreas_bbox_ratio
> t``) for t = 0 %, 10 %, …, 90 % in train, val and test, counted with the same selection
function as the pipeline. (The paper has no validation split: its "train" is train + val here.)
ABD folders count (slice, organ) records after organ balancing. Below, for NIH and MSD folders,
our train + val and test counts beside the paper's appendix Table 1 (:data:`PAPER_SLICE_COUNTS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from minigpt4.io import read_json
from preprocessing import layout
from preprocessing.slices import select_records

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))
# Paper appendix Table 1 — selected slices per threshold: {threshold: {dataset: (train, test)}}.
PAPER_SLICE_COUNTS = {
    0.0: {"NIH": (5520, 1352), "MSD": (6936, 1803)}, 0.1: {"NIH": (4066, 1064), "MSD": (5856, 1526)},
    0.2: {"NIH": (2705, 720), "MSD": (4391, 1149)}, 0.3: {"NIH": (2180, 614), "MSD": (3327, 893)},
    0.4: {"NIH": (1891, 544), "MSD": (2710, 716)}, 0.5: {"NIH": (1657, 455), "MSD": (2312, 621)},
    0.6: {"NIH": (1402, 378), "MSD": (1985, 526)}, 0.7: {"NIH": (1180, 306), "MSD": (1681, 444)},
    0.8: {"NIH": (897, 226), "MSD": (1389, 343)}, 0.9: {"NIH": (504, 135), "MSD": (968, 224)},
}


def threshold_counts(root) -> dict[float, dict[str, int]]:
    """``{threshold: {"train": n, "val": n, "test": n}}`` for one prepared folder."""
    root = Path(root)
    ds = layout.dataset_name(root)
    if ds == "TC":
        raise ValueError(f"{root}: a TC folder has no threshold selection; report needs MSD, NIH or ABD folders")
    infos = read_json(root / "annotations" / f"{ds}_slices_info.json")
    split = read_json(root / "annotations" / "split.json")
    seed = int(read_json(root / "manifest.json")["parameters"].get("seed", 42))
    target = "organs" if ds == "ABD" else "pancreas"
    return {t: {s: len(select_records(infos, split[s], target, t, seed=seed)) for s in ("train", "val", "test")}
            for t in THRESHOLDS}


def report(folders: Sequence) -> str:
    """Markdown table: one row per threshold, train/val/test columns per folder."""
    names, tables = [], []
    for f in folders:
        names.append(f"{layout.dataset_name(f)} ({Path(f).name})")
        tables.append(threshold_counts(f))
    head = "| threshold | " + " | ".join(f"{n} train | {n} val | {n} test" for n in names) + " |"
    sep = "|---" * (1 + 3 * len(names)) + "|"
    rows = [head, sep]
    for t in THRESHOLDS:
        cells = []
        for tab in tables:
            cells += [f"{tab[t]['train']:,}", f"{tab[t]['val']:,}", f"{tab[t]['test']:,}"]
        rows.append(f"| {int(round(t * 100))} % | " + " | ".join(cells) + " |")
    return "\n".join(rows + paper_comparison(names, tables, [layout.dataset_name(f) for f in folders]))


def paper_comparison(names: Sequence[str], tables: Sequence[dict], datasets: Sequence[str]) -> list[str]:
    """Lines of a table with our train + val and test counts beside the paper's appendix Table 1,
    for the NIH and MSD folders among ``names``; no lines when there is none."""
    picked = [(n, tab, ds) for n, tab, ds in zip(names, tables, datasets) if ds in ("NIH", "MSD")]
    if not picked:
        return []
    head = "| threshold | " + " | ".join(f"{n} train+val | paper {ds} train | {n} test | paper {ds} test"
                                          for n, _, ds in picked) + " |"
    rows = ["", "Beside the paper's appendix Table 1 (the paper has no validation split: its train is our train + val):",
            "", head, "|---" * (1 + 4 * len(picked)) + "|"]
    for t in THRESHOLDS:
        cells = []
        for _, tab, ds in picked:
            paper_train, paper_test = PAPER_SLICE_COUNTS[t][ds]
            cells += [f"{tab[t]['train'] + tab[t]['val']:,}", f"{paper_train:,}", f"{tab[t]['test']:,}", f"{paper_test:,}"]
        rows.append(f"| {int(round(t * 100))} % | " + " | ".join(cells) + " |")
    return rows
