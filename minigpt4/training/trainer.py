"""The training loop of every cascade stage (SPEC §5): one function, :func:`train`.

What it does, in order:

1. checks everything that can be checked before a model is built — weight files named in the
   config, every dataset's ``train`` (and, with ``run.validate``, ``val``) records and image files,
   the checkpoint to resume (:mod:`minigpt4.training.checks`) — so bad input fails in seconds, not
   after loading 7 B parameters;
2. builds the model (``build_model``: EVA, LLaMA, ``init_from``), the datasets and the mixing plan
   (:mod:`minigpt4.training.sampler`), AdamW (weight decay on ≥2-D tensors only) and the per-step
   warm-up + cosine schedule (:mod:`minigpt4.training.schedule`); with ``run.cache_visual_features``
   encodes every training image once with the frozen tower (:mod:`minigpt4.data.feature_cache`;
   validation images at their first validation),
   with ``run.compile`` compiles each decoder layer / EVA block (``model.compile_regions``);
3. restores a run exactly when resuming (``run.resume``: a checkpoint folder or ``auto`` = the
   folder named in ``<output_dir>/checkpoint_latest``): trainable weights, optimizer, schedule,
   GradScaler, every RNG and the step counter (which is the whole data position;
   :mod:`minigpt4.training.state` reads and writes checkpoint folders);
4. trains with gradient accumulation, bf16 autocast on GPU (fp16 + GradScaler on request, fp32
   on CPU) and DDP under torchrun; logs to a progress display (:mod:`minigpt4.progress`: tqdm on
   a terminal, a line every 5 % in a log) and ``log.jsonl``;
5. at the end of every epoch: validation on the ``val`` split through
   ``minigpt4.evaluation.validation_score``, a checkpoint ``checkpoint_epoch_<N>`` (N = 0-based
   epoch index, as the release and the paper's Table 1), ``checkpoint_best`` (best validation
   score, never test), ``checkpoint_latest``. A run stopped by ``run.max_steps`` in the middle
   of an epoch writes ``checkpoint_step_<S>`` so that it can be resumed.

``init_from`` (weights a stage starts from: optimizer and schedule start fresh) and ``resume``
(continue this very run) are different things; a resumed run loads the trainable weights from its
own checkpoint on top of whatever ``init_from`` gave.

Output folder (``run.output_dir``; only rank 0 writes; every file is written atomically)::

    config.yaml                      resolved config
    log.jsonl                        {"kind": "step", ...} every log_interval steps, {"kind": "epoch", ...}
    val_metrics.jsonl                one row per epoch: score, metrics per task, best flag
    checkpoint_epoch_<N>/            model.safetensors + config.yaml (save_checkpoint) + training_state.pt
    checkpoint_step_<S>/             same, for a run stopped mid-epoch by run.max_steps
    checkpoint_best/                 copy of the best epoch checkpoint
    checkpoint_latest                text file: the name of the newest checkpoint folder
    feature_cache/                   run.cache_visual_features without run.feature_cache_dir
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from minigpt4 import distributed as D
from minigpt4.config import Config, check_feature_cache, save_config
from minigpt4.data.datasets import MixedDataset, TaskDataset, collate_samples, load_split_records
from minigpt4.io import read_jsonl, to_json, write_jsonl_atomic
from minigpt4.training.checks import (
    check_prompt_wording,
    check_resume_config,
    check_weight_files,
    precision_mismatch,
)
from minigpt4.training.envelope import training_envelope
from minigpt4.training.sampler import MixPlan
from minigpt4.training.schedule import WarmupCosineSchedule
from minigpt4.training.state import (
    LATEST_POINTER,
    STATE_FORMAT,
    TRAINING_STATE,
    copy_as_best,
    load_training_state,
    resolve_resume,
    write_checkpoint,
)
from minigpt4.utils import resolve_dtype, rng_state, seed_everything, set_rng_state
from minigpt4.data.feature_cache import configured_feature_cache
from minigpt4.evaluation import validation_score
from minigpt4.outputs import OutputFolder
from minigpt4.provenance import training_provenance
from minigpt4.models.minigpt_v2 import build_model
from minigpt4.models.checkpoints import load_weights
from minigpt4.progress import progress

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "build_optimizer"]


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; losses are the mean over ranks)."""

    output_dir: Path
    step: int
    """Global optimizer steps done when the call returned."""
    epoch: int
    """Epochs completed."""
    losses: list = field(default_factory=list)
    """``(step, loss)`` for every step this call ran (1-based step numbers)."""
    best_score: Optional[float] = None
    best_epoch: Optional[int] = None
    resumed_from: Optional[Path] = None


# --------------------------------------------------------------------------- optimisation pieces


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on tensors with ≥ 2 dimensions
    (matrices: LoRA A/B, llama_proj.weight), none on biases and norms (SPEC §5)."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    run = cfg.run
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update on CUDA; CPU keeps the default (foreach) implementation
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=run.init_lr, betas=(run.beta1, run.beta2), weight_decay=run.weight_decay,
        fused=True if on_cuda else None,
    )


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``run.amp`` → autocast dtype or None (fp32)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _append_jsonl(path: Path, row: dict) -> None:
    # Append is enough for logs: a crash loses at most the line being written, and a resumed
    # run first rewrites the file (atomically) without the rows after its checkpoint.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(to_json(row, default=_jsonable, where=str(path)) + "\n")


def _truncate_jsonl(path: Path, keep) -> None:
    if path.is_file():
        write_jsonl_atomic(path, [row for row in read_jsonl(path) if keep(row)])


# --------------------------------------------------------------------------- feature cache and validation


def attach_feature_cache(model, datasets: list, cfg: Config, amp_dtype: Optional[torch.dtype], rank: int = 0,
                         world_size: int = 1) -> Path:
    """``run.cache_visual_features``: encode every training image once, make the datasets deliver its tower tokens.

    Images already in the cache folder (``run.feature_cache_dir``, default
    ``<output_dir>/feature_cache``) are not encoded again: a resumed run or a later stage with the
    same frozen EVA reuses them. Returns the folder of this tower's entries.
    """
    check_feature_cache(cfg)
    cache = configured_feature_cache(cfg, model, autocast_dtype=amp_dtype)
    for dataset in datasets:
        paths = [record["image"] for record in dataset.records]
        dataset.tower_features = cache.fill(
            paths, cfg.run.eval_batch_size, rank=rank, world_size=world_size, num_workers=cfg.run.num_workers
        )
    D.barrier()  # every rank's entries are written before any rank reads them
    return cache.folder


def _validate(model: torch.nn.Module, val_sets: list, cfg: Config, feature_cache=None) -> tuple[float, dict]:
    """Score on every dataset's ``val`` records; tasks are averaged weighted by record count.

    ``feature_cache`` (``run.cache_visual_features``, no autocast: validation runs without it)
    keeps the validation images' tower tokens from the first epoch's validation to the next.
    """
    by_task: dict[str, list[dict]] = {}
    for _, task, _, records in val_sets:
        by_task.setdefault(task, []).extend(records)
    results, total, weighted = {}, 0, 0.0
    for task, records in by_task.items():
        with model.eager_layers():  # run.compile: no recompiles for decoding shapes
            score, metrics = validation_score(model, records, task, cfg.run.eval_batch_size,
                                              max_samples=cfg.run.val_max_samples, feature_cache=feature_cache)
        n = len(records) if cfg.run.val_max_samples is None else min(len(records), cfg.run.val_max_samples)
        results[task] = {"score": float(score), "n": n, "metrics": metrics}
        total += n
        weighted += float(score) * n
    return weighted / total, results


# --------------------------------------------------------------------------- the loop


TRAIN_OUTPUTS = re.compile(r"(config\.yaml|log\.jsonl|val_metrics\.jsonl|checkpoint_latest|checkpoint_.+|"
                           r"\.checkpoint_.+\.(tmp|old)|feature_cache|manifest\.json)")
"""Top-level names a training run writes in ``run.output_dir``."""


def _claim_output_dir(output_dir: Path, overwrite: bool):
    """The :class:`minigpt4.outputs.OutputFolder` of a training run (see :func:`train`)."""
    def legacy(folder: Path) -> bool:  # a run of a version before manifests: resumable, so ours
        return (folder / LATEST_POINTER).is_file() and (folder / "config.yaml").is_file()

    return OutputFolder(output_dir, "train", option="run.output_dir", owner="train.py", overwrite=overwrite,
                        legacy=legacy)


def train(cfg: Config, overwrite: bool = False, allow_unknown_provenance: bool = False) -> TrainResult:
    """Run (or resume) one training run as configured; see the module docstring.

    ``run.output_dir`` follows :mod:`minigpt4.outputs`: rank 0 locks it for the whole run (a
    second run into it stops at once), it must be new, empty or a training run's own folder
    (``overwrite``: write next to foreign files, never replacing them), and a run that fails
    before its first checkpoint removes what it created.

    Every checkpoint records the run's provenance (the volumes of its train/val splits and its
    ancestors', :func:`minigpt4.provenance.training_provenance`);
    ``allow_unknown_provenance`` accepts starting weights of an older own format that record none.
    """
    dist_info = D.init_distributed(cfg.run.device)
    try:
        # rank 0 checks, creates and locks the folder before anything else (a second run stops
        # here); leaving with an error removes what this run created unless a checkpoint exists
        claim = _claim_output_dir(Path(cfg.run.output_dir), overwrite) if dist_info.is_main else contextlib.nullcontext()
        with claim as out_folder:
            run = _TrainingRun(cfg, dist_info, out_folder)
            run.check(allow_unknown_provenance)
            run.build()
            run.restore()
            return run.loop()
    finally:
        D.cleanup()


class _TrainingRun:
    """The state of one :func:`train` call, built in order: checks → model and data → restored
    state → loop (steps, then validation and checkpoints at each epoch's end)."""

    def __init__(self, cfg: Config, dist_info, out_folder: Optional[OutputFolder]):
        self.cfg, self.run, self.dist = cfg, cfg.run, dist_info
        self.device, self.main = dist_info.device, dist_info.is_main
        self.output_dir = Path(cfg.run.output_dir)
        self.out_folder = out_folder  # None on every rank but 0
        self.step, self.best_score, self.best_epoch = 0, None, None

    # ---- 1. checks first: nothing heavy happens before these pass
    def check(self, allow_unknown_provenance: bool) -> None:
        cfg, run = self.cfg, self.run
        check_prompt_wording(cfg)
        self.amp_dtype = _amp_dtype(run.amp, self.device)
        mismatch = precision_mismatch(resolve_dtype(cfg.model.dtype, self.device), self.amp_dtype)
        if mismatch and self.main:
            log.warning(mismatch)
        check_weight_files(cfg)
        # with slices without pancreas (datasets.*.empty_share): so checkpoint_best is not a model that boxes every slice
        self.train_sets = load_split_records(cfg, "train", without_target=True)
        self.val_sets = load_split_records(cfg, "val", without_target=True) if run.validate else []
        self.provenance = training_provenance(cfg, allow_unknown_provenance)  # recorded in every checkpoint
        self.envelope = training_envelope(cfg)  # ... with the acquisition range of the train volumes
        self.resume_from = resolve_resume(run.resume, self.output_dir)
        if self.resume_from is not None:
            check_resume_config(cfg, self.resume_from)
        if self.main:
            self.out_folder.check_no_foreign([n for n in os.listdir(self.output_dir) if TRAIN_OUTPUTS.fullmatch(n)])
            if not self.out_folder.manifest:
                self.out_folder.write_manifest({"written_by": "train.py"})
            save_config(cfg, self.output_dir / "config.yaml")

    # ---- 2. model, data, optimisation
    def build(self) -> None:
        cfg, run, dist_info = self.cfg, self.run, self.dist
        seed_everything(run.seed)
        self.model = model = build_model(cfg.model, self.device)
        if self.resume_from is not None:
            load_weights(model, self.resume_from)
        self.datasets = [
            TaskDataset(records, task, model.image_transform, train=True, seed=run.seed, check=False,
                        cache=run.cache_images)
            for _, task, _, records in self.train_sets
        ]
        self.feature_folder, self.val_feature_cache = None, None
        if run.cache_visual_features:
            self.feature_folder = attach_feature_cache(model, self.datasets, cfg, self.amp_dtype, dist_info.rank,
                                                       dist_info.world_size)
            if run.validate and self.main:  # validation runs on rank 0, without autocast
                self.val_feature_cache = configured_feature_cache(cfg, model, autocast_dtype=None)
        if run.compile:
            model.compile_regions(pad_to_multiple_of=run.compile_pad_to_multiple_of)
        self.plan = MixPlan(
            [len(d) for d in self.datasets],
            [ratio for _, _, ratio, _ in self.train_sets],
            micro_batch=run.batch_size,
            accum=run.grad_accum_steps,
            world=dist_info.world_size,
            seed=run.seed,
            iters_per_epoch=run.iters_per_epoch,
        )
        self.spe = self.plan.steps_per_epoch
        self.optimizer = build_optimizer(model, cfg)
        self.schedule = WarmupCosineSchedule(
            self.optimizer, run.max_epoch * self.spe, run.init_lr, run.min_lr, run.warmup_lr, run.warmup_steps
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    # ---- 3. resuming: optimizer, schedule, GradScaler, RNGs and step as they were saved
    def restore(self) -> None:
        run, dist_info, resume_from = self.run, self.dist, self.resume_from
        seed_everything(run.seed + dist_info.rank)  # dropout differs per rank, as in LAVIS
        if resume_from is None:
            return
        state = load_training_state(resume_from / TRAINING_STATE)
        if state.get("steps_per_epoch") != self.spe:
            raise ValueError(
                f"cannot resume from {resume_from}: it has {state.get('steps_per_epoch')} steps per epoch, "
                f"this config gives {self.spe} (batch size, world size, iters_per_epoch or data changed)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = step = int(state["step"])
        self.best_score, self.best_epoch = state["best"]["score"], state["best"]["epoch"]
        rngs = state["rng"]
        if len(rngs) == dist_info.world_size:
            set_rng_state(rngs[dist_info.rank])
        else:  # another world size: per-rank streams cannot be continued, reseed by step
            seed_everything(run.seed + dist_info.rank + step)
        if self.main:
            _truncate_jsonl(self.output_dir / "log.jsonl", lambda row: row.get("step", 0) <= step)
            _truncate_jsonl(self.output_dir / "val_metrics.jsonl", lambda row: row.get("step", 0) <= step)

    # ---- 4. the loop: epochs of steps, each epoch ended by validation and checkpoints
    def loop(self) -> TrainResult:
        run, dist_info, spe = self.run, self.dist, self.spe
        self.train_model: torch.nn.Module = self.model
        if dist_info.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        mixed = MixedDataset(self.datasets)
        result = TrainResult(output_dir=self.output_dir, step=self.step, epoch=self.step // spe,
                             resumed_from=self.resume_from, best_score=self.best_score, best_epoch=self.best_epoch)
        if self.main:
            _append_jsonl(self.output_dir / "log.jsonl", {
                "kind": "start", "step": self.step, "epoch": self.step // spe, "steps_per_epoch": spe,
                "global_batch": self.plan.global_batch, "world_size": dist_info.world_size,
                "train_records": [len(d) for d in self.datasets], "resumed_from": self.resume_from,
                "device": str(self.device), "feature_cache": self.feature_folder, "compile": run.compile,
            })
        total_steps = run.max_epoch * spe
        stop_at = total_steps if run.max_steps is None else min(total_steps, run.max_steps)
        self.train_model.train()
        while self.step < stop_at:
            epoch = self.step // spe
            epoch_end = (epoch + 1) * spe
            last = min(epoch_end, stop_at)
            batches = iter(self._loader(mixed, last))
            epoch_start = time.perf_counter()
            epoch_losses = self._train_steps(batches, epoch, last, result.losses)
            del batches
            if self.step < epoch_end:  # stopped by run.max_steps inside the epoch: resumable checkpoint
                self._save(f"checkpoint_step_{self.step}", epoch)
                break
            self._end_epoch(epoch, epoch_losses, epoch_start)
        result.step, result.epoch = self.step, self.step // spe
        result.best_score, result.best_epoch = self.best_score, self.best_epoch
        return result

    def _loader(self, mixed: MixedDataset, last: int) -> DataLoader:
        """The batches of steps ``self.step`` … ``last`` (exclusive) for this rank."""
        return DataLoader(
            mixed,
            batch_sampler=self.plan.batches(self.step, last, self.dist.rank),
            collate_fn=collate_samples,
            num_workers=self.run.num_workers,
            pin_memory=self.device.type == "cuda",
            # own generator: creating an iterator would otherwise draw from the global torch
            # RNG and make a resumed run (new loader mid-epoch) diverge from a straight one
            generator=torch.Generator().manual_seed(self.run.seed + self.step),
        )

    def _train_steps(self, batches, epoch: int, last: int, losses: list) -> list[float]:
        """Optimizer steps until ``last``; appends ``(step, loss)`` to ``losses``, returns this call's losses."""
        run, output_dir = self.run, self.output_dir
        epoch_losses: list[float] = []
        bar = _progress(last - self.step, epoch, self.main)
        while self.step < last:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(run.grad_accum_steps)]
            t_data = time.perf_counter() - t0
            lr = self.schedule.apply()
            loss_value = self._forward_backward(micro)
            _check_loss(loss_value, self.step + 1, epoch, output_dir)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.advance()
            self.step += 1
            elapsed = time.perf_counter() - t0
            samples_per_s = self.plan.global_batch / elapsed
            epoch_losses.append(loss_value)
            losses.append((self.step, loss_value))
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}", refresh=False)
                bar.update(1)  # after the postfix: a log line shows this step's loss
            if self.main and (self.step % run.log_interval == 0 or self.step == last):
                _append_jsonl(output_dir / "log.jsonl", {
                    "kind": "step", "epoch": epoch, "step": self.step, "loss": loss_value, "lr": lr,
                    "samples_per_s": samples_per_s, "data_fraction": t_data / elapsed, "time": time.time(),
                })
        if bar is not None:
            bar.close()
        return epoch_losses

    def _forward_backward(self, micro: list) -> float:
        """Accumulate the gradients of one optimizer step's micro-batches; the mean loss over ranks."""
        device, amp_dtype, dist_info = self.device, self.amp_dtype, self.dist
        step_loss = torch.zeros((), device=device)
        for index, batch in enumerate(micro):
            # DDP: all-reduce gradients only on the last micro-batch
            sync = index == len(micro) - 1 or not dist_info.enabled
            context = contextlib.nullcontext() if sync else self.train_model.no_sync()
            with context:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    images, tower_tokens = _visual_inputs(batch, device)
                    # only the loss is kept: the answer logits are not held through backward
                    loss = self.train_model(images, batch["instructions"], batch["answers"],
                                            tower_tokens=tower_tokens).loss
                loss = loss / self.run.grad_accum_steps
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            step_loss += loss.detach()
        # every rank sees the same mean, so all stop together, before the update
        return float(D.all_reduce_mean(step_loss))

    # ---- 5. end of epoch: validate (rank 0), checkpoint, best
    def _end_epoch(self, epoch: int, epoch_losses: list[float], epoch_start: float) -> None:
        run, output_dir = self.run, self.output_dir
        score, per_task, is_best = None, None, False
        if run.validate and self.main:
            score, per_task = _validate(self.model, self.val_sets, self.cfg, self.val_feature_cache)
            is_best = self.best_score is None or score > self.best_score
            if is_best:
                self.best_score, self.best_epoch = score, epoch
        D.barrier()
        self.best_score, self.best_epoch = D.broadcast_object((self.best_score, self.best_epoch))
        folder = self._save(f"checkpoint_epoch_{epoch}", epoch + 1)
        if self.main:
            if is_best or (not run.validate):
                copy_as_best(folder, output_dir)  # without validation: the latest epoch
            if run.validate:
                _append_jsonl(output_dir / "val_metrics.jsonl", {
                    "epoch": epoch, "step": self.step, "score": score, "best": is_best, "tasks": per_task,
                })
            _append_jsonl(output_dir / "log.jsonl", {
                "kind": "epoch", "epoch": epoch, "step": self.step,
                "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                "val_score": score, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "epoch_time_s": time.perf_counter() - epoch_start,
            })
        D.barrier()

    def _save(self, name: str, epoch: int) -> Optional[Path]:
        """Gather every rank's RNG, then rank 0 writes the checkpoint."""
        dist_info, run = self.dist, self.run
        rngs = [rng_state()]
        if dist_info.enabled:
            gathered: list = [None] * dist_info.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        folder = None
        if self.main:
            state = {
                "format": STATE_FORMAT,
                "epoch": epoch,
                "step": self.step,
                "steps_per_epoch": self.spe,
                "data": {"consumed": self.plan.consumed_before(self.step), "global_batch": self.plan.global_batch,
                         "world_size": dist_info.world_size, "seed": run.seed},
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rngs,
                "best": {"score": self.best_score, "epoch": self.best_epoch},
            }
            folder = write_checkpoint(self.model, self.cfg, self.output_dir, name, state, self.provenance,
                                      self.envelope)
            self.out_folder.keep()  # resumable from here: a later failure keeps the folder
        D.barrier()
        return folder


def _check_loss(loss: float, step: int, epoch: int, output_dir: Path) -> None:
    """Stop at the first non-finite training loss, naming the step, before it updates the weights.

    Raises:
        FloatingPointError: the loss of optimizer step ``step`` (1-based, as in ``log.jsonl``) is NaN or infinite.
    """
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{output_dir}: training loss is {loss} at step {step} (epoch {epoch}); stopped before that update, "
            "the checkpoints already written are unchanged (lower run.init_lr, try run.amp=bf16 or none, "
            "or check the data)")


def _visual_inputs(batch: dict, device: torch.device) -> tuple:
    """``(images, tower_tokens)`` on the device: images, or None and the cached tower tokens
    (``run.cache_visual_features``)."""
    if "tower_tokens" in batch:
        return None, batch["tower_tokens"].to(device, non_blocking=True)
    return batch["images"].to(device, non_blocking=True), None


def _progress(total: int, epoch: int, main: bool):
    if not main:
        return None

    return progress(total, f"epoch {epoch}", unit="step", leave=False)
