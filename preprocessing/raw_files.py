"""The raw files a prepared folder was made from, paired again as its preparation paired them.

``eval_cascade.py`` scores detection maps in the CT's own geometry against the reference lesions
of the label files (PANORAMA's way, issue 27), so it needs each volume's image and label: they
are found again from the manifest's ``parameters`` (``images``, ``labels``, ``label_map``,
``assume_orientation``, PANORAMA's ``clinical``) with the dataset's own discovery
(:func:`preprocessing.pipeline.discover`, :func:`preprocessing.panorama.discover`).
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt4.io import read_json
from preprocessing.pipeline import Job, Options, discover


def prepared_jobs(root: str | os.PathLike) -> dict[str, Job]:
    """``{volume_name: Job}`` (``image``, ``label``, ``kind``, ``label_map``...) of a prepared
    MSD / NIH / ABD / PANORAMA folder.

    Raises:
        FileNotFoundError: no manifest, or the raw folders it names are gone.
        ValueError: a folder without raw inputs (TC) or of an unknown dataset.
    """
    root = Path(root)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root}: no manifest.json (not a prepared folder)")
    params = read_json(manifest).get("parameters", {})
    dataset = params.get("dataset")
    if not params.get("images") or not params.get("labels"):
        raise ValueError(f"{manifest}: no raw images/labels recorded (a {dataset or 'TC'} folder?): the detection maps "
                         "need the CT files a folder was prepared from")
    opts = Options(dataset=dataset, images=params["images"], labels=params["labels"], out=str(root),
                   label_map=params.get("label_map"), assume_orientation=params.get("assume_orientation"),
                   clinical=params.get("clinical"))
    if dataset == "PANORAMA":
        from preprocessing import clinical, panorama

        if not params.get("clinical"):
            raise ValueError(f"{manifest}: a PANORAMA folder without its clinical sheet recorded")
        opts.labels = [tuple(item) for item in params["labels"]]
        jobs, _, _ = panorama.discover(opts, clinical.read_sheet(params["clinical"]), log=lambda *_: None)
    elif dataset in ("MSD", "NIH", "ABD"):
        jobs, _ = discover(opts)
    else:
        raise ValueError(f"{manifest}: dataset {dataset!r} has no raw volumes to pair")
    return {job.volume_name: job for job in jobs}
