"""``python -m preprocessing report DIR [DIR ...]``: slices per threshold (paper Appendix Table 1).

For each prepared MSD / NIH folder, the number of selected pancreas slices (``pancreas_bbox_ratio
> t``) for t = 0 %, 10 %, …, 90 % in train, val and test, counted with the same selection
function as the pipeline. (The paper has no validation split: its "train" is train + val here.)
ABD folders count (slice, organ) records after organ balancing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from minigpt4.io import read_json
from preprocessing import layout
from preprocessing.slices import select_records

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))


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
    return "\n".join(rows)
