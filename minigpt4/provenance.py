"""Leakage between datasets: no volume a model trained on may be in the set it is evaluated on.

Each prepared folder splits its own volumes (``annotations/split.json``), but the cascade's datasets
share scans: a TC crop comes from an MSD or NIH volume, and AbdomenCT-1K and PANORAMA hold MSD and
NIH scans (found by content, ``python -m preprocessing abd|panorama --exclude-overlap-with``, listed in
the manifest's ``overlap``). A volume is therefore named by its *source*: ``(dataset, volume_name)``
with the dataset of the scan's origin (``MSD``, ``NIH``; ``ABD`` / ``PANORAMA`` only for their own
scans: ``("PANORAMA", "<patient>_<study>")``).

**Provenance.** Every checkpoint the trainer saves records, in its safetensors header
(:data:`minigpt4.models.checkpoints.PROVENANCE_KEY`), the keys it was trained and validated on and
those of its ancestors (``model.init_from`` / ``model.ckpt``, read from *their* recorded
provenance at training time): :func:`training_provenance`. The guard compares the evaluated
volumes with these recorded keys, never with what a folder holds today (a folder re-split with
another seed would otherwise hide a leak). A foreign checkpoint (MiniGPT-v2 stage 3, the release's
``.pth``) is logged as "provenance unknown"; an own checkpoint without provenance (older format)
is refused unless ``allow_unknown`` (``--allow-unknown-provenance``), and is then checked against
its ``config.yaml`` chain and today's folders.

``train.py`` checks the test splits of its config against the training volumes of its config and
the recorded volumes of the weights it starts from; the eval scripts check the evaluated split
against the training volumes of their config and the recorded volumes of the evaluated checkpoint
(:func:`check_checkpoint_against`, the check of one checkpoint, for each stage of a cascade). Any overlap
stops the run with the list. A test volume the weights were *validated* on (checkpoint selection)
is a leak too; evaluating the val split only excludes training volumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from minigpt4.config import Config, ConfigError, load_config
from minigpt4.io import file_sha256, read_json
from minigpt4.models.checkpoints import PROVENANCE_KEY, PROVENANCE_NAME, read_metadata
from preprocessing.sources import canonical_dataset, dataset_of_volume
from preprocessing.splits import volume_stem

log = logging.getLogger(__name__)

Key = tuple  # (source dataset, volume_name)
PROVENANCE_SCHEMA = "minigpt-pancreas-provenance/1"


class LeakageError(ValueError):
    """A training volume is in the evaluated set."""


def _source_of(name: str, default: str) -> str:
    return dataset_of_volume(name) or default


class ProvenanceError(ValueError):
    """An own checkpoint records no provenance (or an unreadable one) and unknown provenance was not allowed."""


def split_keys(root: str, split: str) -> set[Key]:
    """Source keys of the volumes of ``split`` in a prepared folder.

    A TC folder names each volume's source dataset in ``split.json`` ``volume_datasets`` (or, in
    folders written before that, in its records' ``dataset`` column; else by the name's pattern:
    ``pancreas_001`` = MSD, ``PANCREAS_0001`` = NIH); names lose a ``.nii.gz`` / ``.nii`` suffix. An
    ABD volume found to be an MSD / NIH scan takes that scan's key.
    """
    folder = Path(root)
    manifest = read_json(folder / "manifest.json")
    dataset = str(manifest.get("dataset", "?"))
    split_doc = read_json(folder / "annotations" / "split.json")
    names = split_doc.get(split, [])
    aliases = {a: (m["dataset"], m["volume"]) for a, m in (manifest.get("overlap") or {}).items()}
    sources = _tc_sources(folder, split_doc) if dataset == "TC" else {}
    keys = set()
    for name in names:
        if name in aliases:
            keys.add(tuple(aliases[name]))
        elif dataset == "TC":
            stem = volume_stem(name)
            keys.add((sources.get(name) or sources.get(stem) or _source_of(stem, "TC"), stem))
        else:
            keys.add((dataset, name))
    return keys


def _tc_sources(folder: Path, split_doc: dict) -> dict[str, str]:
    """``{volume_name: source dataset}`` of a TC folder (``split.json`` or the records)."""
    # a folder imported before CSV names were checked may say Task07_Pancreas / Pancreas-CT: read as MSD / NIH
    if isinstance(split_doc.get("volume_datasets"), dict):
        return {str(k): canonical_dataset(str(v)) or str(v) for k, v in split_doc["volume_datasets"].items()}
    sources = {}
    for path in sorted((folder / "annotations").glob("TC_*.json")):
        for record in read_json(path):
            if isinstance(record, dict) and record.get("dataset") and record.get("volume_name"):
                sources.setdefault(volume_stem(record["volume_name"]), canonical_dataset(str(record["dataset"]))
                                  or str(record["dataset"]).strip().upper())
    return sources


# ----------------------------------------------------------------------------- binding
# A project checkpoint keeps its record in the tensor file's own header, so it cannot describe
# other tensors. A PEFT export keeps it in provenance.json beside the tensor files: that record
# names the sha256 of every tensor file the export wrote (BOUND_KEY) and check_binding refuses a
# record whose files changed since (an earlier export's record left beside other weights). An own
# checkpoint that lost its record still says it is ours through the files around it
# (own_checkpoint_marks).
BOUND_KEY = "weights_sha256"
"""Key of ``provenance.json`` (an export's record): ``{tensor file relative to the folder: sha256}``."""

OWN_MARKS = ("config.yaml", "adapter_stack.json", "training_state.pt")
"""Files this project writes beside its weights (a checkpoint folder: ``config.yaml`` and, for the
latest, ``training_state.pt``; an export: ``adapter_stack.json``)."""


def tensor_files(folder: Path) -> list[str]:
    """Every ``.safetensors`` file of an export folder (its sub-folders' adapters too), relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if p.is_file())


def bind(record_text: str, folder: Path, files: list[str]) -> str:
    """The provenance record (JSON text) with the sha256 of ``files`` (relative to ``folder``) added."""
    record = json.loads(record_text)
    record[BOUND_KEY] = {rel: file_sha256(folder / rel) for rel in sorted(files)}
    return json.dumps(record, sort_keys=True)


def check_binding(record_path: Path) -> Optional[str]:
    """Why the record at ``record_path`` does not describe the tensor files beside it; None when
    every file it names has the recorded sha256 and no tensor file is left out."""
    folder = record_path.parent
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    bound = record.get(BOUND_KEY) if isinstance(record, dict) else None
    if not isinstance(bound, dict) or not bound:
        return "it names no weights (written before records were bound to their weights' sha256)"
    for rel in sorted(set(tensor_files(folder)) - set(bound)):
        return f"{rel} is not among the weights it describes"
    for rel, digest in sorted(bound.items()):
        path = folder / rel
        if not path.is_file():
            return f"{rel}, which it describes, is missing"
        actual = file_sha256(path)
        if actual != digest:
            return f"it describes {rel} with sha256 {str(digest)[:12]}…, the file there has {actual[:12]}…"
    return None


def own_checkpoint_marks(weights_file: Path) -> list[str]:
    """The files beside ``weights_file`` that say this project wrote it (:data:`OWN_MARKS`, or an
    export's ``manifest.json``); empty for a foreign file."""
    folder = weights_file.parent
    marks = [name for name in OWN_MARKS if (folder / name).is_file()]
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("command") == "export":
                marks.append("manifest.json")
        except (OSError, ValueError, AttributeError):
            pass
    return marks


# ----------------------------------------------------------------------------- provenance records
def dataset_record(cfg: Config, validated: bool, label: str = "config") -> dict:
    """``{name: {root, task, train: [[ds, vol], ...], val: [...]}}`` of ``cfg``'s datasets, read from
    their folders now (``val`` empty unless ``validated``). Unreadable folders are skipped with a
    warning (the trainer has read them already; a legacy check covers what is readable)."""
    record = {}
    for name, ds in cfg.datasets.items():
        try:
            train = sorted(split_keys(ds.root, "train"))
            val = sorted(split_keys(ds.root, "val")) if validated else []
        except (OSError, ValueError) as err:
            print(f"warning: leakage check skips datasets.{name} of {label} ({err})", file=sys.stderr)
            continue
        record[name] = {"root": os.path.abspath(ds.root), "task": ds.task, "train": [list(k) for k in train],
                        "val": [list(k) for k in val]}
    return record


def training_provenance(cfg: Config, allow_unknown: bool = False) -> dict:
    """What a training run with ``cfg`` records in every checkpoint it saves.

    ``{"schema", "runs": [this run, then each ancestor's runs]}``; a run is ``{"run": output_dir,
    "datasets": dataset_record(...)}`` (``"checkpoint"``: the path it was loaded from, for
    ancestors), ``{"checkpoint", "unknown": reason}`` for weights of unknown provenance, and
    ``"recorded": false`` for an older own checkpoint read from today's folders.

    Raises:
        ProvenanceError: an ancestor is an own checkpoint without provenance and not ``allow_unknown``.
    """
    runs = [{"run": os.path.abspath(cfg.run.output_dir), "datasets": dataset_record(cfg, cfg.run.validate, "this config")}]
    for weights in _weights_of(cfg):
        runs += checkpoint_runs(weights, allow_unknown)
    _log_unknown(runs, "the weights this run starts from")
    return {"schema": PROVENANCE_SCHEMA, "runs": runs}


def _weights_of(cfg: Config) -> list[str]:
    """The weight files a config loads on top of the base (``init_from``, then ``ckpt``)."""
    return [str(p) for p in dict.fromkeys((cfg.model.init_from, cfg.model.ckpt)) if p]


def _checkpoint_config(path: str) -> Optional[Config]:
    """The training config saved beside a checkpoint's weights, None when there is none."""
    folder = Path(path)
    candidate = folder / "config.yaml" if folder.is_dir() else folder.parent / "config.yaml"
    if not candidate.is_file():
        return None
    try:
        return load_config(candidate)
    except (ConfigError, ValueError, OSError) as err:
        print(f"warning: cannot read {candidate} to check leakage ({err})", file=sys.stderr)
        return None


def checkpoint_runs(path: Union[str, Path], allow_unknown: bool = False, _seen: Optional[set] = None) -> list[dict]:
    """The runs behind the weights at ``path`` (see :func:`training_provenance`), first the one
    that wrote them, then its ancestors.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ProvenanceError: an own checkpoint without provenance and not ``allow_unknown``, or an
            unreadable provenance record.
    """
    path = os.path.abspath(path)
    seen = set() if _seen is None else _seen
    seen.add(path)
    kind, weights_file, metadata = read_metadata(path)
    if kind == "peft" and PROVENANCE_KEY in metadata:  # an export's record must describe these very weights
        stale = check_binding(weights_file.parent / PROVENANCE_NAME)
        if stale is not None:
            if not allow_unknown:
                raise ProvenanceError(
                    f"{weights_file.parent / PROVENANCE_NAME}: this provenance record does not belong to the weights "
                    f"beside it: {stale}. Export the checkpoint again (python -m minigpt4.export), or pass "
                    "--allow-unknown-provenance to evaluate them as of unknown provenance")
            return [{"checkpoint": path, "unknown": f"provenance.json does not describe these weights: {stale}"}]
    marks = own_checkpoint_marks(weights_file) if weights_file.suffix == ".safetensors" else []
    if kind != "project" and PROVENANCE_KEY not in metadata and not marks:
        what = "a PEFT adapter folder without provenance.json" if kind == "peft" else \
            f"a foreign checkpoint ({weights_file.name})"
        return [{"checkpoint": path, "unknown": what}]
    if PROVENANCE_KEY in metadata:  # our checkpoint, or our PEFT export of one
        try:
            record = json.loads(metadata[PROVENANCE_KEY])
            if kind == "peft" and isinstance(record, dict) and record.get("unknown"):  # an export of a foreign file
                return [{"checkpoint": path, "unknown": str(record["unknown"])}]
            runs = record["runs"]
            if record.get("schema") != PROVENANCE_SCHEMA or not runs or not all(isinstance(r, dict) for r in runs):
                raise ValueError(f"schema {record.get('schema')!r}, {len(runs)} runs")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ProvenanceError(f"{weights_file}: unreadable provenance record ({err})") from None
        return [{**runs[0], "checkpoint": path}] + runs[1:]
    if not allow_unknown:
        why = "saved before provenance was recorded" if kind == "project" else \
            f"{', '.join(marks)} beside it say{'s' if len(marks) == 1 else ''} this project wrote it, but " + (
                "its provenance.json is missing" if kind == "peft" else "its header records no provenance (re-saved?)")
        raise ProvenanceError(
            f"{weights_file}: checkpoint without recorded provenance ({why}): which "
            "volumes it was trained on is unknown, so leakage cannot be checked. Retrain it, or pass "
            "--allow-unknown-provenance to check it against its config.yaml and today's folders instead")
    cfg = _checkpoint_config(path)
    if cfg is None:
        return [{"checkpoint": path, "unknown": "own checkpoint without recorded provenance or config.yaml"}]
    runs = [{"checkpoint": path, "run": str(cfg.run.output_dir), "recorded": False,
             "datasets": dataset_record(cfg, cfg.run.validate, f"checkpoint {path}")}]
    for weights in _weights_of(cfg):
        if os.path.abspath(weights) in seen:
            continue
        if Path(weights).exists():
            runs += checkpoint_runs(weights, allow_unknown, seen)
        else:  # an ancestor moved or deleted since: what it trained on cannot be read
            runs.append({"checkpoint": os.path.abspath(weights), "unknown": f"named in {path}'s config.yaml, not found"})
    return runs


def _log_unknown(runs: Sequence[dict], context: str) -> list[str]:
    """Log each run of unknown or unrecorded provenance; returns the lines."""
    lines = []
    for run in runs:
        if "unknown" in run:
            lines.append(f"provenance unknown: {run['checkpoint']} ({run['unknown']}); the leakage check cannot "
                         "tell which volumes it was trained on")
        elif run.get("recorded") is False:
            lines.append(f"provenance not recorded: {run['checkpoint']} is checked against its config.yaml and "
                         "today's folders (--allow-unknown-provenance)")
    for line in lines:
        log.warning("%s: %s", context, line)
    return lines


# ----------------------------------------------------------------------------- checks
@dataclass
class ProvenanceReport:
    """What :func:`check_checkpoint_against` found for one checkpoint."""

    checkpoint: str
    runs: list[dict] = field(default_factory=list)
    """This checkpoint's run, then its ancestors' (:func:`training_provenance`)."""
    unknown: list[str] = field(default_factory=list)
    """One line per ancestor (or the checkpoint itself) of unknown or unrecorded provenance."""
    leaks: list[str] = field(default_factory=list)
    """One line per evaluated volume the chain trained (or, for test, validated) on."""
    label: Optional[str] = None
    """Who was checked (e.g. ``"stage tumor_detection"``)."""


def provenance_status(report: ProvenanceReport) -> dict:
    """What ``metrics.json`` records of one checkpoint's provenance: ``{"status": "recorded" |
    "not recorded" (an older own checkpoint, checked against its config.yaml and today's folders) |
    "unknown" (the leakage check could not tell what it trained on), "lines": [...]}``."""
    runs = report.runs
    status = "unknown" if any("unknown" in r for r in runs) else \
        "not recorded" if any(r.get("recorded") is False for r in runs) else "recorded"
    return {"status": status, "lines": list(report.unknown)}


def provenance_table_lines(weights: Mapping[str, dict]) -> list[str]:
    """``tables.md`` lines for each stage (or ``model.ckpt`` / ``model.init_from``) whose provenance
    is not recorded (:func:`provenance_status`); none when all are."""
    lines = [f"- **{name}: provenance {entry['status']}**: " + "; ".join(entry.get("lines") or [])
             for name, entry in weights.items() if entry.get("status") != "recorded"]
    if not lines:
        return []
    return ["## Provenance", "", "The leakage check could not verify these weights against the volumes they were "
            "trained on: an evaluated volume may be one of them.", "", *lines, ""]


def _run_label(run: dict, index: int, checkpoint: Optional[str]) -> str:
    if run.get("label"):
        return run["label"]
    name = f"checkpoint {run.get('checkpoint') or run.get('run')}"
    if index and checkpoint:
        name += f" (an ancestor of checkpoint {checkpoint})"
    if run.get("recorded") is False:
        name += " [no recorded provenance: today's folder]"
    return name


def _leaks(runs: Sequence[dict], evaluated: Mapping[Key, str], split: str, checkpoint: Optional[str]) -> list[str]:
    """Lines ``"<ds> <vol> is in <where> but trained on by datasets.<n> of <who> (<root>, train)"``."""
    used = ("train", "val") if split == "test" else ("train",)
    lines = []
    for index, run in enumerate(runs):
        for name, entry in (run.get("datasets") or {}).items():
            for part in used:
                for key in sorted(set(evaluated) & {tuple(k) for k in entry.get(part, [])}):
                    verb = "trained on" if part == "train" else "validated on"
                    lines.append(f"{key[0]} {key[1]} is in {evaluated[key]} but {verb} by datasets.{name} of "
                                 f"{_run_label(run, index, checkpoint)} ({entry.get('root')}, {part})")
    return lines


def _as_mapping(keys: Union[Mapping[Key, str], Iterable[Key]], split: str) -> dict[Key, str]:
    if isinstance(keys, Mapping):
        return {tuple(k): str(v) for k, v in keys.items()}
    return {tuple(k): f"the evaluated {split} set" for k in keys}


def _raise_leaks(leaks: list[str], split: str, context: str = "") -> None:
    if leaks:
        raise LeakageError(f"{context}{len(leaks)} {split} volume(s) were used for training:\n  " + "\n  ".join(leaks[:50])
                           + ("\n  ..." if len(leaks) > 50 else "")
                           + "\nInherit one split across datasets (tc-import --split-from, abd --exclude-overlap-with).")


def check_checkpoint_against(checkpoint_path: Union[str, Path], evaluated_keys: Union[Mapping[Key, str], Iterable[Key]],
                             allow_unknown: bool = False, split: str = "test", label: Optional[str] = None,
                             raise_on_leak: bool = True) -> ProvenanceReport:
    """Check evaluated volumes against the *recorded* provenance of a checkpoint and its ancestors.

    Args:
        checkpoint_path: project checkpoint folder / ``.safetensors``, or a foreign ``.pth`` /
            PEFT folder (logged as "provenance unknown").
        evaluated_keys: ``(dataset, volume)`` keys evaluated (:func:`split_keys`), or ``{key: where}``
            (e.g. ``"datasets.tc test"``) to name where each is evaluated.
        allow_unknown: accept an own checkpoint without provenance (``--allow-unknown-provenance``);
            it is then checked against its ``config.yaml`` chain and today's folders.
        split: the evaluated split: ``test`` may hold no volume of the chain's train or val,
            ``val`` none of its train; ``train`` is not checked.
        label: who is checked, first in the error (e.g. ``"stage tumor_detection"``).
        raise_on_leak: raise on a leak (else only ``report.leaks``).
    Returns:
        The report (runs read, unknown-provenance lines, leak lines).
    Raises:
        LeakageError: ``"<label>: checkpoint <path>: N test volume(s) were used for training:"``
            and one line per volume, naming the dataset / run that trained on it.
        ProvenanceError: own checkpoint without provenance, not ``allow_unknown``.
        FileNotFoundError: no checkpoint at ``checkpoint_path``.
    """
    checkpoint = os.path.abspath(checkpoint_path)
    runs = checkpoint_runs(checkpoint, allow_unknown)
    report = ProvenanceReport(checkpoint, runs, _log_unknown(runs, label or f"checkpoint {checkpoint}"), label=label)
    if split != "train":
        report.leaks = _leaks(runs, _as_mapping(evaluated_keys, split), split, checkpoint)
    if raise_on_leak:
        _raise_leaks(report.leaks, split, f"{label + ': ' if label else ''}checkpoint {checkpoint}: ")
    return report


def check_split(cfg: Config, names: Sequence[str], split: str, weights: Sequence[str], label: str,
                allow_unknown: bool = False) -> list[ProvenanceReport]:
    """Stop when a volume of ``split`` of the datasets ``names`` was used for training, by this
    config (its datasets' train splits now) or by the recorded chain of each of ``weights``.

    Returns:
        One report per checked weight file (its provenance: :func:`provenance_status`).
    Raises:
        LeakageError: listing each leaked volume, where it is evaluated and who trained on it.
        ProvenanceError: see :func:`check_checkpoint_against`.
    """
    if split == "train":
        return []
    evaluated: dict[Key, str] = {}
    for name in names:
        try:
            keys = split_keys(cfg.datasets[name].root, split)
        except (OSError, ValueError):
            continue  # the records loader reports a missing folder with its own message
        evaluated.update({key: f"datasets.{name} {split}" for key in keys})
    this_config = {"label": label, "datasets": dataset_record(cfg, validated=False, label=label)}
    leaks = _leaks([this_config], {k: v for k, v in evaluated.items()}, "train", None)
    # a missing file is reported by the weight check with its config key (model.ckpt=...), which
    # stops the run before anything is trained or evaluated
    reports = [check_checkpoint_against(path, evaluated, allow_unknown, split, label=path, raise_on_leak=False)
               for path in dict.fromkeys(str(w) for w in weights if w and Path(w).exists())]
    _raise_leaks(leaks + [line for report in reports for line in report.leaks], split)
    return reports


def check_training_config(cfg: Config, allow_unknown: bool = False) -> None:
    """``train.py``: no test volume of any configured dataset is trained on by this config, or
    was trained or validated on by the weights it starts from (their recorded provenance)."""
    check_split(cfg, list(cfg.datasets), "test", _weights_of(cfg), "this config", allow_unknown)


def check_evaluation(cfg: Config, names: Sequence[str], split: str, weights: Union[None, str, Sequence[str]],
                     allow_unknown: bool = False) -> list[ProvenanceReport]:
    """Eval scripts: the evaluated split of ``names`` against this config's training volumes and
    the recorded provenance of the evaluated weights (a path or several, e.g. init_from and ckpt);
    returns one report per weight file (``label``: its path)."""
    paths = [weights] if isinstance(weights, (str, Path)) else list(weights or [])
    return check_split(cfg, names, split, paths, "this config", allow_unknown)


def check_cascade_leakage(cfg: Config, allow_unknown: bool = False) -> list:
    """No stage, nor any ancestor its recorded provenance names (``init_from`` chains), trained on
    a val or test volume of the cascade's folders (or validated on a test volume).

    Reads checkpoint headers and split files only. Returns the per-stage reports.

    Raises:
        LeakageError: every stage, checkpoint and volume that leaks, one block per stage and split.
        ProvenanceError: an own checkpoint without provenance, unless ``allow_unknown``.
    """
    errors, reports = [], []
    for split in ("val", "test"):
        evaluated: dict[tuple, str] = {}
        for name, ds in cfg.datasets.items():
            for key in sorted(split_keys(ds.root, split)):
                evaluated.setdefault(key, f"the cascade's {split} split (datasets.{name})")
        for stage, path in cfg.cascade.stages.configured().items():
            try:
                reports.append(check_checkpoint_against(path, evaluated, allow_unknown, split, label=f"stage {stage}"))
            except LeakageError as err:
                errors.append(str(err))
    if errors:
        raise LeakageError("\n".join(errors))
    return reports


def stage_provenance(reports: Sequence[ProvenanceReport]) -> dict:
    """``{stage: {"status", "lines"}}`` from :func:`check_cascade_leakage`'s reports (the worst of
    a stage's val and test checks): ``metrics.json`` ``run.provenance``, and a section of
    ``tables.md`` when not all are recorded (:func:`provenance_table_lines`)."""
    order = ("recorded", "not recorded", "unknown")
    stages: dict[str, dict] = {}
    for report in reports:
        stage = str(report.label).removeprefix("stage ")
        entry = provenance_status(report)
        if stage not in stages or order.index(entry["status"]) > order.index(stages[stage]["status"]):
            stages[stage] = entry
    return stages
