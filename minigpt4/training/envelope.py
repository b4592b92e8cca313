"""The training envelope: the acquisition range of a run's training volumes (issue 28.2).

Every checkpoint the trainer writes carries it beside its provenance (safetensors metadata key
``envelope``, :func:`minigpt4.models.checkpoints.checkpoint_envelope` reads it back), so a scan
can say whether its input lies inside what the weights were trained on
(:mod:`minigpt4.inference.fitness`). The records come from the prepared folders
(``annotations/<DS>_acquisition.json``, :func:`preprocessing.layout.read_acquisition`); a folder
prepared before they existed leaves its volumes counted as "not recorded".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from minigpt4.io import read_json
from preprocessing.acquisition import envelope_from_records
from preprocessing.layout import dataset_name, read_acquisition
from preprocessing.splits import volume_stem


def training_envelope(cfg: Any) -> dict:
    """The envelope of the ``train`` volumes of every configured dataset (``cfg.datasets``).

    A volume named by two datasets of the run (MSD for pancreas and tumor detection) counts once.
    """
    keys: dict[str, Optional[dict]] = {}
    sources = []
    for ds in cfg.datasets.values():
        root = Path(ds.root)
        dataset = dataset_name(root)
        sources.append(dataset)
        records = read_acquisition(root)
        split = read_json(root / "annotations" / "split.json")
        for name in split.get("train", []):
            record = records.get(name, records.get(volume_stem(name)))
            key = f"{dataset}/{volume_stem(name)}"
            if keys.get(key) is None:
                keys[key] = record
    recorded = {k: r for k, r in keys.items() if r is not None and "unmeasured" not in r}
    return envelope_from_records(recorded, len(keys), sources)
