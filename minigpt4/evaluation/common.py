"""Helpers shared by detection and classification evaluation: record checks, batching, identity.

Records are the *selected records* of ``preprocessing.layout.read_prepared`` (docs/ARCHITECTURE.md);
images and instructions come from the training engineer's ``TaskDataset(train=False)`` so that
evaluation sees exactly the transform and the fixed instruction that training used.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch

from minigpt4.config import DETECTION_TASKS
from minigpt4.data.datasets import check_records as check_dataset_records
from minigpt4.data.datasets import TaskDataset, collate_samples

# Keys evaluation needs on top of what TaskDataset checks (identity of every prediction row).
_EVAL_KEYS = ("q_id", "dataset", "volume_name", "slice_index")


def check_records(records: Sequence[dict], task: str, source: str = "records") -> None:
    """Fail early, before any model is loaded, on records that evaluation cannot use.

    Runs the dataset checks (:func:`minigpt4.data.datasets.check_records`: task, required keys,
    known targets / answers, every image file exists), then the evaluation ones: identity keys and
    unique ``(dataset, q_id)``.

    Raises:
        ValueError: unknown task, empty or malformed records, duplicated id (names ``source``).
        FileNotFoundError: image files are missing (the first few are listed).
    """
    check_dataset_records(records, task, source)
    seen: set[tuple[Any, Any]] = set()
    for number, record in enumerate(records):
        absent = [k for k in _EVAL_KEYS if k not in record]
        if absent:
            raise ValueError(f"{source}: record {number} ({record.get('image', '?')}) lacks {absent} needed for evaluation")
        ident = (record["dataset"], record["q_id"])
        if ident in seen:
            raise ValueError(f"{source}: duplicate q_id {record['q_id']!r} in dataset {record['dataset']!r}")
        seen.add(ident)
        if task in DETECTION_TASKS and len(record["bbox"]) != 4:
            raise ValueError(f"{source}: record q_id={record['q_id']!r} bbox is not 4 numbers: {record['bbox']!r}")


def record_identity(record: dict) -> dict:
    """The columns every prediction row starts with: which slice of which volume it is."""
    return {
        "q_id": record.get("q_id"),
        "dataset": record["dataset"],
        "volume_name": record.get("volume_name"),
        "slice_index": record.get("slice_index"),
        "image": str(record["image"]) if record.get("image") is not None else None,
    }


def select_ids(records: Sequence[dict], q_ids: Optional[Sequence[int]], source: str = "records") -> list[dict]:
    """Keep the records whose ``q_id`` is listed (in the records' order); unknown ids are an error."""
    if q_ids is None:
        return list(records)
    wanted = set(q_ids)
    known = {r["q_id"] for r in records}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"{source}: unknown q_id(s) {unknown[:10]} ({len(unknown)} in all)")
    return [r for r in records if r["q_id"] in wanted]


def subsample(records: Sequence[dict], max_samples: Optional[int]) -> list[dict]:
    """A deterministic, evenly spaced subset (keeps every dataset/volume region represented,
    unlike the first N which would come from one volume)."""
    if max_samples is None or max_samples >= len(records):
        return list(records)
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    step = len(records) / max_samples
    return [records[int(i * step)] for i in range(max_samples)]


def model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def iter_batches(
    model: Any, records: Sequence[dict], task: str, batch_size: int, num_workers: int = 0,
    instruction: Optional[str] = None, feature_cache: Any = None, question: Optional[str] = None,
) -> Iterator[tuple[list[dict], torch.Tensor, list[str]]]:
    """Yield ``(records, tower_tokens (B, 1 + N, C) on the model's device, instructions)`` in record order.

    The images go through the tower (``model.encode_tower``) once per batch, so the answer and
    P(yes) of a slice share one ViT pass; pass the tokens as ``tower_tokens=`` to
    ``generate`` / ``yes_probability``. With ``feature_cache`` (a
    :class:`~minigpt4.data.feature_cache.VisualFeatureCache` without autocast) images encoded by
    an earlier call (last epoch's validation, another checkpoint with the same frozen EVA) are
    read from disk instead; the answers are the same.

    ``instruction``: detection instruction template (``run.eval_instruction``), None = the default;
    ``question``: the yes/no question of classification, None = the default.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # records were checked by the caller (check_records) or come from the trainer's datasets
    dataset = TaskDataset(list(records), task, model.image_transform, train=False, check=False, eval_instruction=instruction,
                          eval_question=question)
    if feature_cache is not None:
        dataset.tower_features = feature_cache.fill([r["image"] for r in records], batch_size, num_workers=num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_samples
    )
    device = model_device(model)
    for batch in loader:
        if "tower_tokens" in batch:
            tower_tokens = batch["tower_tokens"].to(device)
        else:
            tower_tokens = model.encode_tower(batch["images"].to(device))
        yield list(batch["records"]), tower_tokens, list(batch["instructions"])


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model.eval()`` + no grad for the block; the previous train/eval mode is restored."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


