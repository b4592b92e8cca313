"""Torch datasets over prepared folders, shared by training and evaluation.

A :class:`TaskDataset` wraps the *selected records* returned by
``preprocessing.layout.read_prepared`` (absolute ``image`` paths) for one task and turns each
record into an ``(image tensor, instruction, answer)`` sample:

* detection tasks: the instruction names the record's target (``TARGET_NAMES[record["target"]]``)
  and the answer is the box text ``{<x1><y1><x2><y2>}`` of ``record["bbox"]`` (SPEC §3);
* ``tumor_classification``: a yes/no question and ``record["answer"]``.

In training (``train=True``) one of the paper's 8 instructions is drawn per sample. The draw is a
pure function of ``(seed, draw key)`` — no hidden RNG state — so a resumed run, a run with more
DataLoader workers and an uninterrupted run all see the same instructions. Evaluation
(``train=False``) always uses the first instruction/question.

:func:`collate_samples` stacks samples into a batch; the model tokenises the texts itself.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from minigpt4.boxes import NO_BOX_ANSWER, box_answer
from minigpt4.config import DETECTION_TASKS, ORGANS, TASKS, Config, ConfigError
from minigpt4.prompts import TARGET_NAMES, classification_question, detection_instruction
from preprocessing.layout import read_prepared

__all__ = ["TaskDataset", "MixedDataset", "collate_samples", "check_records"]

_MAX_LISTED = 5


def check_records(records: Sequence[dict], task: str, source: str = "records") -> None:
    """Validate records for ``task`` up front, before any training starts.

    Raises:
        ValueError: no records, unknown task, or a record without the keys the task needs.
        FileNotFoundError: image files are missing (the first few are named).
    """
    if task not in TASKS:
        raise ValueError(f"{source}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if len(records) == 0:
        raise ValueError(f"{source}: no records for task {task!r} (empty dataset)")
    needed = ("image", "target", "bbox", "width", "height") if task in DETECTION_TASKS else ("image", "answer")
    missing_files = []
    for number, record in enumerate(records):
        absent = [key for key in needed if key not in record]
        if absent:
            raise ValueError(f"{source}: record {number} ({record.get('image', '?')}) lacks keys {absent} needed for {task}")
        if task in DETECTION_TASKS and record["target"] not in TARGET_NAMES:
            raise ValueError(f"{source}: record {number} has unknown target {record['target']!r}")
        if task == "tumor_classification" and record["answer"] not in ("yes", "no"):
            raise ValueError(f"{source}: record {number} has answer {record['answer']!r}; expected 'yes' or 'no'")
        if not Path(record["image"]).is_file():
            missing_files.append(str(record["image"]))
    if missing_files:
        listed = ", ".join(missing_files[:_MAX_LISTED])
        more = f" and {len(missing_files) - _MAX_LISTED} more" if len(missing_files) > _MAX_LISTED else ""
        raise FileNotFoundError(f"{source}: {len(missing_files)} image file(s) not found: {listed}{more}")


class TaskDataset(Dataset):
    """Samples of one task from selected records.

    Args:
        records: selected records (``read_prepared`` output; ``image`` absolute or relative to
            the working directory).
        task: one of ``minigpt4.config.TASKS``.
        transform: image transform, normally ``model.image_transform`` (SPEC §2).
        train: draw a random instruction per sample (True) or use the fixed first one (False).
        seed: seed of the instruction draws.
        check: validate records and image files at construction (default).
        eval_instruction: detection instruction template when ``train=False`` (``run.eval_instruction``;
            None = the first paper instruction).
        eval_question: the yes/no question when ``train=False`` (None = the first paper question;
            the zero-shot baseline asks the release's, ``model.prompts.wording: release``).
        cache: keep every transformed image in memory after its first use (``run.cache_images``:
            3·S²·4 bytes each, 150 KB at 112 px). Decoding and resizing are most of the data
            time of a tiny CPU model; the transform is deterministic, so results do not change.
            Each DataLoader worker process holds its own cache: use it with ``num_workers=0``.

    ``ds[i]`` returns ``{"image": Tensor(3, S, S), "instruction": str, "answer": str,
    "record": dict}``. With ``train=True`` the instruction for a plain integer index depends on
    ``(seed, epoch, i)`` (see :meth:`set_epoch`); the trainer instead indexes with
    ``(i, draw)`` pairs, ``draw`` being the sample's position in the run's data stream.
    """

    def __init__(
        self,
        records: Sequence[dict],
        task: str,
        transform: Callable[[Image.Image], torch.Tensor],
        train: bool = True,
        seed: int = 0,
        check: bool = True,
        cache: bool = False,
        eval_instruction: Optional[str] = None,
        eval_question: Optional[str] = None,
    ) -> None:
        if check:
            check_records(records, task)
        self.records = list(records)
        self.task = task
        self.transform = transform
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.eval_instruction = eval_instruction
        self.eval_question = eval_question
        self._cache: Optional[dict[int, torch.Tensor]] = {} if cache else None
        # run.cache_visual_features: index → cached (1+N, C) tower tokens (feature_cache.CachedTowerTokens);
        # when set, samples carry "tower_tokens" instead of "image"
        self.tower_features: Optional[Sequence[torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the instruction draws of plain integer indexing (``train=True`` only)."""
        self.epoch = int(epoch)

    def instruction(self, index: int, draw: Optional[Hashable] = None) -> str:
        """The instruction for record ``index``; ``draw`` keys the random choice in training."""
        rng = None
        if self.train:
            key = (self.epoch, index) if draw is None else draw
            # str seeds are hashed with SHA-512 by `random`: stable across processes and runs.
            rng = random.Random(f"{self.seed}:{key}")
        record = self.records[index]
        if self.task == "tumor_classification":
            return classification_question(rng) if rng is not None or self.eval_question is None else self.eval_question
        return detection_instruction(TARGET_NAMES[record["target"]], rng, self.eval_instruction)

    def answer(self, index: int) -> str:
        record = self.records[index]
        if self.task == "tumor_classification":
            return str(record["answer"])
        if record.get("no_target"):  # a slice without the target (datasets.*.empty_share)
            return NO_BOX_ANSWER
        return box_answer(record["bbox"], int(record["width"]), int(record["height"]))

    def load_image(self, index: int) -> torch.Tensor:
        """The transformed image of record ``index`` (3, S, S); a cached tensor must not be modified."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.records[index]["image"]
        try:
            with Image.open(path) as image:
                tensor = self.transform(image)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from None
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    def __getitem__(self, index: Any) -> dict:
        draw = None
        if isinstance(index, (tuple, list)):
            index, draw = index
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        index %= len(self)
        if self.tower_features is not None:
            visual = {"tower_tokens": self.tower_features[index]}
        else:
            visual = {"image": self.load_image(index)}
        return {
            **visual,
            "instruction": self.instruction(index, draw),
            "answer": self.answer(index),
            "record": self.records[index],
        }


class MixedDataset(Dataset):
    """Several datasets behind one index space for a batch sampler.

    Indexed with ``(dataset_index, record_index, draw)`` triples (see
    ``minigpt4.training.sampler.MixedBatchSampler``).
    """

    def __init__(self, datasets: Sequence[TaskDataset]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        which, index, draw = key
        return self.datasets[which][(index, (which, draw))]


def collate_samples(samples: Sequence[dict]) -> dict:
    """Stack samples: ``{"images": Tensor(B, 3, S, S), "instructions": [str] * B,
    "answers": [str] * B, "records": [dict] * B}``; samples from the feature cache give
    ``"tower_tokens": Tensor(B, 1 + N, C)`` instead of ``"images"``."""
    if not samples:
        raise ValueError("collate_samples: empty batch")
    visual = "tower_tokens" if "tower_tokens" in samples[0] else "image"
    return {
        "tower_tokens" if visual == "tower_tokens" else "images": torch.stack([s[visual] for s in samples]),
        "instructions": [s["instruction"] for s in samples],
        "answers": [s["answer"] for s in samples],
        "records": [s["record"] for s in samples],
    }


def load_split_records(cfg: Config, split: str, without_target: bool = False) -> list[tuple[str, str, float, list[dict]]]:
    """``(name, task, sample_ratio, records)`` for every configured dataset, checked.

    ``without_target``: add each dataset's ``empty_share`` of slices without pancreas — the trainer
    does, for training and validation (whose score then credits a correct "no pancreas",
    :func:`minigpt4.evaluation.validation_score`); the evaluation scripts do not: they score the
    pancreas slices, Table 1's measure (``eval_cascade.py`` measures the false boxes on whole volumes).

    Raises:
        ConfigError: no dataset configured.
        FileNotFoundError / ValueError: missing folder or images, empty split (named).
    """
    if not cfg.datasets:
        raise ConfigError("no datasets configured: add at least one entry under 'datasets:'")
    out = []
    for name, ds in cfg.datasets.items():
        source = f"datasets.{name} ({ds.root}, {ds.task}, split {split})"
        # organs only for organ_detection and only when narrowed: any organs= makes the reader reselect
        narrowed = ds.task == "organ_detection" and sorted(ds.organs) != sorted(ORGANS)
        if ds.empty_share and ds.task != "pancreas_detection":
            raise ConfigError(f"datasets.{name}.empty_share: only pancreas_detection trains on slices without its "
                              f"target, not {ds.task}")
        empty = ds.empty_share if without_target else 0.0
        records = read_prepared(ds.root, ds.task, split, threshold=ds.threshold,
                                organs=list(ds.organs) if narrowed else None, empty_share=empty)
        check_records(records, ds.task, source=source)
        out.append((name, ds.task, float(ds.sample_ratio), records))
    return out
