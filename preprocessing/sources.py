"""The source datasets of a TC crop, by the names people give them (``tc-import --csv``).

The leakage guard keys every volume by ``(source dataset, volume name)`` with the dataset ``MSD``
or ``NIH`` (:mod:`minigpt4.provenance`). A CSV that names the dataset otherwise
(``Task07_Pancreas``, ``Pancreas-CT``) would build keys that never meet the source folders' and
blind the guard, so the known names are mapped here and anything else is refused.
"""

from __future__ import annotations

import re
from typing import Optional

DATASET_NAMES = {
    "MSD": ("MSD", "Task07_Pancreas", "Task07", "MSD_Pancreas", "MSD Task07", "Decathlon",
            "Medical Segmentation Decathlon"),
    "NIH": ("NIH", "Pancreas-CT", "NIH Pancreas-CT", "NIH_Pancreas", "NIH-Pancreas", "TCIA Pancreas-CT"),
    "PANORAMA": ("PANORAMA",),
}
"""Each source dataset's canonical name → the names accepted for it (any case; ``-``, ``_`` and
spaces alike)."""

VOLUME_PATTERNS = ((re.compile(r"^PANCREAS_\d+$"), "NIH"), (re.compile(r"^pancreas_\d+$"), "MSD"),
                   (re.compile(r"^\d+_\d{5}$"), "PANORAMA"))
"""Volume names that tell their dataset: NIH ``PANCREAS_0001``, MSD ``pancreas_001``, PANORAMA's
``<patient>_<study>`` (``100417_00001``; crops of ``tc --panorama``)."""


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip()).upper()


_ALIASES = {_normal(alias): dataset for dataset, aliases in DATASET_NAMES.items() for alias in aliases}


def canonical_dataset(value: str) -> Optional[str]:
    """``MSD`` / ``NIH`` / ``PANORAMA`` for a known name of that dataset (:data:`DATASET_NAMES`), else None."""
    return _ALIASES.get(_normal(value))


def dataset_of_volume(name: str) -> Optional[str]:
    """``MSD`` / ``NIH`` / ``PANORAMA`` when the volume name follows that dataset's pattern, else None."""
    return next((dataset for pattern, dataset in VOLUME_PATTERNS if pattern.match(name)), None)


def source_dataset(value: str, volume: str = "") -> str:
    """The canonical source dataset of a CSV row: its ``dataset`` cell by a known name, or, when
    the cell is empty, the dataset the volume name's pattern tells.

    Raises:
        ValueError: an unknown name, an empty cell with a volume name of no known pattern, or a
            volume name of the other dataset's pattern (the message names column and value; the
            caller adds the file and line).
    """
    by_volume = dataset_of_volume(volume)
    if not value.strip():
        if by_volume is None:
            raise ValueError(f"column 'dataset' is empty and column 'volume' {volume!r} follows no known name "
                             "pattern (pancreas_001: MSD, PANCREAS_0001: NIH); name the source dataset")
        return by_volume
    dataset = canonical_dataset(value)
    if dataset is None:
        known = "; ".join(f"{d}: {', '.join(names)}" for d, names in DATASET_NAMES.items())
        raise ValueError(f"column 'dataset': {value!r} is not a known source dataset ({known}); the leakage check "
                         "could not match its volumes with the source folders'")
    if by_volume is not None and by_volume != dataset:
        raise ValueError(f"column 'volume': {volume!r} is an {by_volume} volume name but column 'dataset' says "
                         f"{value!r} ({dataset})")
    return dataset
