"""Leakage between datasets: no volume a model trained on may be in the set it is evaluated on.

Each prepared folder splits its own volumes (``annotations/split.json``), but the cascade's datasets
share scans: a TC crop comes from an MSD or NIH volume, and AbdomenCT-1K holds MSD and NIH scans
(found by content, ``python -m preprocessing abd --exclude-overlap-with``, listed in its manifest's
``overlap``). A volume is therefore named by its *source*: ``(dataset, volume_name)`` with the
dataset of the scan's origin (``MSD``, ``NIH``; ``ABD`` only for ABD's own scans).

``train.py`` checks the test splits of its config against the training volumes of its config and
of the weights it starts from (``model.init_from``); the eval scripts check the evaluated split
against the training volumes of their config and of the evaluated checkpoint's own training config
(``config.yaml`` saved in every checkpoint folder), following ``init_from`` back through the
cascade. Any overlap stops the run with the list.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from minigpt4.config import Config, ConfigError, load_config
from minigpt4.io import read_json

Key = tuple  # (source dataset, volume_name)
_SOURCE_BY_NAME = ((re.compile(r"^PANCREAS_\d+$"), "NIH"), (re.compile(r"^pancreas_\d+$"), "MSD"))


class LeakageError(ValueError):
    """A training volume is in the evaluated set."""


def _source_of(name: str, default: str) -> str:
    for pattern, dataset in _SOURCE_BY_NAME:
        if pattern.match(name):
            return dataset
    return default


def split_keys(root: str, split: str) -> set[Key]:
    """Source keys of the volumes of ``split`` in a prepared folder.

    TC folders name their crops' volumes as the source datasets do (``pancreas_001`` = MSD,
    ``PANCREAS_0001`` = NIH); an ABD volume found to be an MSD / NIH scan takes that scan's key.
    """
    folder = Path(root)
    manifest = read_json(folder / "manifest.json")
    dataset = str(manifest.get("dataset", "?"))
    names = read_json(folder / "annotations" / "split.json").get(split, [])
    aliases = {a: (m["dataset"], m["volume"]) for a, m in (manifest.get("overlap") or {}).items()}
    keys = set()
    for name in names:
        if name in aliases:
            keys.add(tuple(aliases[name]))
        else:
            keys.add((_source_of(name, dataset) if dataset == "TC" else dataset, name))
    return keys


def _checkpoint_config(path: Optional[str]) -> Optional[Config]:
    """The training config saved beside a checkpoint's weights, None when there is none."""
    if path is None:
        return None
    folder = Path(path)
    candidate = folder / "config.yaml" if folder.is_dir() else folder.parent / "config.yaml"
    if not candidate.is_file():
        return None
    try:
        return load_config(candidate)
    except (ConfigError, ValueError, OSError) as err:
        print(f"warning: cannot read {candidate} to check leakage ({err})", file=sys.stderr)
        return None


def training_volumes(cfg: Config, weights: Optional[str], label: str = "config") -> dict[Key, list[str]]:
    """``{key: [who trained on it, ...]}``: the train splits of ``cfg``'s datasets and of every
    checkpoint config up the ``weights`` → ``init_from`` chain. Folders that are missing are skipped
    with a warning (the check then covers what is readable)."""
    found: dict[Key, list[str]] = {}
    current: Optional[Config] = cfg
    seen: set[str] = set()
    while current is not None:
        for name, ds in current.datasets.items():
            try:
                keys = split_keys(ds.root, "train")
            except (OSError, ValueError) as err:
                print(f"warning: leakage check skips datasets.{name} of {label} ({err})", file=sys.stderr)
                continue
            for key in keys:
                found.setdefault(key, []).append(f"datasets.{name} of {label} ({ds.root}, train)")
        if weights is None or str(weights) in seen:
            break
        seen.add(str(weights))
        current, label = _checkpoint_config(weights), f"checkpoint {weights}"
        weights = current.model.init_from if current is not None else None
    return found


def check_split(cfg: Config, names: Sequence[str], split: str, weights: Optional[str], label: str) -> None:
    """Stop when a volume of ``split`` of the datasets ``names`` was used for training.

    Raises:
        LeakageError: listing each leaked volume, where it is evaluated and who trained on it.
    """
    if split == "train":
        return
    trained = training_volumes(cfg, weights, label)
    leaks = []
    for name in names:
        ds = cfg.datasets[name]
        try:
            keys = split_keys(ds.root, split)
        except (OSError, ValueError):
            continue  # the records loader reports a missing folder with its own message
        for key in sorted(keys & set(trained)):
            leaks.append(f"{key[0]} {key[1]} is in datasets.{name} {split} but trained on by {', '.join(trained[key])}")
    if leaks:
        raise LeakageError(f"{len(leaks)} {split} volume(s) were used for training:\n  " + "\n  ".join(leaks[:50])
                           + ("\n  ..." if len(leaks) > 50 else "")
                           + "\nInherit one split across datasets (tc-import --split-from, abd --exclude-overlap-with).")


def check_training_config(cfg: Config) -> None:
    """``train.py``: no test volume of any configured dataset is trained on by this config or by
    the weights it starts from."""
    check_split(cfg, list(cfg.datasets), "test", cfg.model.init_from, "this config")


def check_evaluation(cfg: Config, names: Sequence[str], split: str, weights: Optional[str]) -> None:
    """Eval scripts: the evaluated split of ``names`` against this config's and the evaluated
    checkpoint's training volumes."""
    check_split(cfg, names, split, weights, "this config")
