"""``scan.py``: the three-stage cascade on unlabelled CTs, results as files a viewer opens.

    python scan.py --cfg-path eval_configs/scan.yaml --inputs CT/ case7.nii.gz --out scans/
    torchrun --nproc-per-node 4 scan.py --cfg-path eval_configs/scan.yaml --inputs CT/ --out scans/
    python scan.py --cfg-path eval_configs/scan.yaml --grand-challenge   # PANORAMA's algorithm interface

Inputs (:func:`minigpt4.inference.inputs.find_volumes`): NIfTI / ``.mha`` / ``.nrrd`` files, zips of
one DICOM series, DICOM files found by content (one volume per SeriesInstanceUID), or folders of
those; what is found and what is skipped is said. Each volume is read by the inference reader
(:func:`minigpt4.inference.readers.load_volume`), scanned by
:func:`minigpt4.inference.pipeline.scan_slices` and written by
:func:`minigpt4.scan_outputs.write_volume_outputs` under ``<out>/<volume>/``; ``summary.csv`` and
``scan.json`` and ``index.html`` (a page linking each volume's ``report.html``) cover every volume.
One volume is in memory at a time. A volume already done with the same input content, checkpoints
and settings (the whole resolved ``model`` and ``cascade`` config, :func:`settings_fingerprint_config`,
plus the calibration map and training envelopes) is skipped. ``manifest.json`` is written first
(``status: running``), so a scan stopped by kill -9, Ctrl-C or a full disk is resumed by running
it again; a second scan into a folder being written is told so. Under torchrun the volumes are
sharded by name (:func:`minigpt4.distributed.shard`); each rank writes its own, rank 0 the
summary after a barrier. ``--grand-challenge`` (:func:`grand_challenge`): the one CT of
``/input/images/venous-ct/`` (``--inputs``) → ``/output/pdac-likelihood.json`` and
``/output/images/pdac-detection-map/detection_map.mha`` (``--out``), as PANORAMA's baseline algorithm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from minigpt4.cli import USER_ERRORS, error_message
from minigpt4.config import add_config_arguments, load_config
from minigpt4.distributed import all_gather_objects, barrier, broadcast_object, cleanup, init_distributed, rank_device, shard
from minigpt4.inference.calibration import configured_calibration
from minigpt4.inference.fitness import check_fitness, fitness_summary, outside_validated_range, stage_envelopes
from minigpt4.inference.inputs import VolumeInput, find_volumes
from minigpt4.inference.operating_point import check_checkpoints, scan_normalization
from minigpt4.inference.operating_point import scan_settings as resolve_operating_point
from minigpt4.inference.pipeline import scan_slices
from minigpt4.inference.readers import load_volume, scan_limits
from minigpt4.io import write_json_atomic
from minigpt4.models.stages import load_stages, require_all_stages
from minigpt4.outputs import OutputFolder, OutputFolderError, check_no_foreign, check_output_folder
from minigpt4.progress import progress
from minigpt4.scan_outputs import (
    checkpoint_identities,
    collect_summary,
    fingerprint,
    is_done,
    write_scan_json,
    write_summary,
    write_volume_error,
    write_volume_outputs,
)
from minigpt4.scan_outputs.detection_map import volume_detection_map, write_detection_map
from minigpt4.scan_outputs.html import INDEX_HTML, write_index_html
from minigpt4.scan_outputs.run import SCAN_FORMAT, with_path_identities

COMMAND = "scan"
TOP_LEVEL_FILES = ("summary.csv", "scan.json", INDEX_HTML)
GC_INPUT = "/input/images/venous-ct"
GC_OUTPUT = "/output"
GC_LIKELIHOOD = "pdac-likelihood.json"
GC_DETECTION_MAP = "images/pdac-detection-map/detection_map.mha"


def scan_settings(cfg: Any, cfg_path: str):
    """``(settings, operating point or None)``: the
    :class:`~minigpt4.inference.pipeline.CascadeSettings` from the config's ``cascade`` section:
    ``cascade.operating_point`` (the ``operating_point.json`` eval_cascade.py wrote, checked against
    the stages' weights) or the complete explicit set; never chosen here
    (:func:`minigpt4.inference.operating_point.scan_settings`)."""
    settings, point = resolve_operating_point(cfg.cascade, cfg_path, batch_size=cfg.run.eval_batch_size)
    if point is not None:
        check_checkpoints(point, cfg.cascade.stages.configured(), cfg_path)
    return settings, point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scan.py", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--inputs", nargs="+", metavar="PATH",
                        help="NIfTI / .mha / .nrrd files, DICOM series folders or zips, or folders of them "
                             f"(--grand-challenge: default {GC_INPUT})")
    parser.add_argument("--out", help=f"output folder (one subfolder per volume; --grand-challenge: default {GC_OUTPUT})")
    parser.add_argument("--grand-challenge", action="store_true",
                        help="PANORAMA's algorithm interface: the one CT in --inputs → <out>/pdac-likelihood.json "
                             "(one float) and <out>/images/pdac-detection-map/detection_map.mha, nothing else")
    # --normalization is the spelling of `python -m preprocessing`; --normalisation (the spelling
    # scan.py used first) is still accepted, so existing command lines keep working
    parser.add_argument("--normalization", "--normalisation", dest="normalization", choices=("paper", "window"),
                        default=None, help="slice normalization, as the training PNGs were prepared (default: the "
                                           "one cascade.operating_point records, else paper; --normalisation is "
                                           "accepted too)")
    parser.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                        help="a volume that cannot be read: stop (exit 2) or record it (error.json, summary row) "
                             "and go on")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder scan.py did not write (its files are kept)")
    return parser


def _slice_progress(name: str, n_slices: int):
    bar = progress(n_slices, f"{name} slices", unit="slice", leave=False)

    def report(fraction: float, _description: str) -> None:
        bar.update(round(fraction * n_slices) - bar.n)
        if fraction >= 1.0:
            bar.close()

    return report


def volume_fingerprint(entry: Any, checkpoints: list, scan_config: dict) -> str:
    """What decides a volume's outputs: the content the reader reads, the checkpoints, the settings."""
    return fingerprint([], checkpoints, scan_config, input_hashes=[entry.content_sha256()])


def scan_volume_to_folder(entry: VolumeInput, out: Path, stages: Any, settings: Any, normalisation: str,
                          checkpoints: list, scan_config: dict, volume_fingerprint: str, limits: Any = None,
                          envelopes: Optional[dict] = None, calibration: Any = None,
                          slice_calibration: Any = None) -> str:
    """Read, scan and write one volume unless it is already done; returns ``done``/``skipped``.

    The input's fitness checks (against the stages' training ``envelopes``) and the calibrated
    likelihood (``calibration``; None: an uncalibrated score) go into its report.json; a volume
    outside the validated range is still answered, flagged, and named on stderr.

    Raises:
        ValueError, OSError: the volume cannot be read (``InputError``) or written.
    """
    folder = out / entry.name
    if folder.resolve().parent != out.resolve():  # the names are made safe; this is the last guard
        raise ValueError(f"{entry.path}: its output folder {folder} would lie outside --out {out}")
    if is_done(folder, volume_fingerprint):
        return "skipped"
    volume = load_volume(entry.path, normalisation, limits or scan_limits(), files=entry.files or None)
    result = scan_slices(stages, volume.slices, settings, _slice_progress(entry.name, volume.num_slices))
    fitness = check_fitness(volume.acquisition, volume.dicom_headers, result.slices, volume.num_slices, envelopes)
    if outside_validated_range(fitness):
        print(f"warning: {entry.name}: {fitness_summary(fitness)}; the answer is given, flagged in report.json "
              "and summary.csv", file=sys.stderr)
    write_volume_outputs(folder, volume=entry.name, source=str(entry.path), geometry=volume.geometry, result=result,
                         checkpoints=checkpoints, fingerprint=volume_fingerprint, slices=volume.slices,
                         dicom_headers=volume.dicom_headers, extra={"config": scan_config}, fitness=fitness,
                         calibration=calibration, slice_calibration=slice_calibration)
    return "done"


def settings_fingerprint_config(cfg: Any, settings: Any, normalisation: str) -> dict:
    """Everything configured that can change an answer: the whole resolved ``model`` config, the
    ``cascade`` config (its checkpoint paths left out: their sha256s count instead) with the
    resolved operating point, and the normalisation. A value naming an existing file or folder
    (base weights, tokenizer, an operating-point file) also records what it holds
    (:func:`minigpt4.scan_outputs.run.path_identity`)."""
    cascade = {k: v for k, v in dataclasses.asdict(cfg.cascade).items() if k != "stages"}
    resolved = {"threshold": settings.threshold, "slice_threshold": settings.slice_threshold,
                "aggregation": settings.aggregation, "top_k": settings.top_k, "crop_margin": settings.crop_margin,
                "min_boxed_slices": settings.min_boxed_slices, "z_rule": settings.z_rule,
                "operating_point": cfg.cascade.operating_point, "normalisation": normalisation,
                "max_new_tokens": cfg.model.generation.max_new_tokens}
    return {**resolved, **with_path_identities({"model": dataclasses.asdict(cfg.model), "cascade": cascade})}


def _parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line; ``--grand-challenge`` fills ``--inputs`` / ``--out`` with the platform's paths."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.grand_challenge:
        args.inputs, args.out = args.inputs or [GC_INPUT], args.out or GC_OUTPUT
    elif not args.inputs or not args.out:
        parser.error("--inputs and --out are required (or --grand-challenge)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Scan every input volume; returns the ``summary.csv`` rows (rank 0; other ranks: [])."""
    args = _parse_arguments(argv)
    cfg = load_config(args.cfg_path, args.options)
    settings, point = scan_settings(cfg, args.cfg_path)
    args.normalization = scan_normalization(point, args.normalization, args.cfg_path)
    paths = require_all_stages(cfg.cascade.stages.configured(), args.cfg_path)
    found = find_volumes(args.inputs)  # every input checked before any model work
    inputs = found.volumes
    if args.grand_challenge:
        return [grand_challenge(inputs, Path(args.out), cfg, paths, settings, args.normalization)]
    out = Path(args.out)
    checkpoints = checkpoint_identities(paths)
    calibration, slice_calibration = configured_calibration(cfg.cascade)
    judge = {"envelopes": stage_envelopes(paths), "calibration": calibration, "slice_calibration": slice_calibration}
    scan_config = {**settings_fingerprint_config(cfg, settings, args.normalization),
                   # a new map or envelope is another scan: the fingerprint covers them
                   "calibration": None if calibration is None else {
                       **calibration.as_dict(), "slice": None if slice_calibration is None else slice_calibration.as_dict()},
                   "envelopes": {stage: note for stage, (_, note) in judge["envelopes"].items()}}

    # every rank checks --out before any rank writes: a refused folder stops them all, none waits
    # the paths as given count too: an --out inside an input folder would be scanned by the next run
    manifest = check_output_folder(out, COMMAND, lambda m: m.get("command") == COMMAND, args.overwrite,
                                   [*args.inputs, *(e.path for e in inputs)])
    check_no_foreign(out, manifest, [*TOP_LEVEL_FILES, *(e.name for e in inputs)], "scan.py")
    for entry in inputs:  # a volume folder that is a link would take the outputs outside --out
        target = out / entry.name
        if target.is_symlink() or (target.exists() and target.resolve().parent != out.resolve()):
            raise OutputFolderError(f"{target}: is a link to {target.resolve()}; scan.py writes only inside --out "
                                    "(remove the link or choose another --out)")
    info = init_distributed(cfg.run.device)
    if info.is_main:
        print(f"scan.py: {found.summary()}", file=sys.stderr)
    try:
        mine = set(shard([entry.name for entry in inputs], info.rank, info.world_size))
        folder = OutputFolder(out, COMMAND, overwrite=args.overwrite, inputs=[*args.inputs, *(e.path for e in inputs)])
        with contextlib.ExitStack() as stack:
            opened: Optional[str] = None
            if info.is_main:
                try:
                    stack.enter_context(folder)
                except USER_ERRORS as err:  # e.g. another run took the folder since the check: tell every rank
                    opened = error_message(err)
            opened = broadcast_object(opened)  # no rank is left waiting at a barrier rank 0 never reaches
            if opened is not None:
                raise OutputFolderClosed(opened if info.is_main else f"rank 0 could not open --out: {opened}")
            if info.is_main:
                folder.keep()  # finished volumes are marked done: a failure keeps them, a re-run continues
                folder.write_manifest({"format": SCAN_FORMAT, "status": "running"})  # a killed run can resume
            barrier()  # the folder exists and is locked before any rank writes into it
            limits = scan_limits()
            # each rank hashes its own volumes' content; rank 0 needs every fingerprint for the summary
            own = {e.name: volume_fingerprint(e, checkpoints, scan_config) for e in inputs if e.name in mine}
            fingerprints = {name: fp for part in all_gather_objects(own) for name, fp in part.items()}
            try:
                failure = _scan_shard(inputs, mine, out, cfg, paths, settings, args, checkpoints, scan_config, info,
                                      fingerprints, limits, judge)
            finally:
                barrier()  # every rank has written (or recorded) its volumes
            rows: list[dict] = []
            if info.is_main:
                rows = collect_summary(out, [entry.name for entry in inputs], fingerprints)
                write_summary(out / "summary.csv", rows)
                write_index_html(out / INDEX_HTML, out, [e.name for e in inputs], [r["volume"] for r in rows if not r["error"]])
                write_scan_json(out / "scan.json", scan_config, checkpoints, rows,
                                extra={"inputs": {e.name: str(e.path) for e in inputs},
                                       "skipped": [s.as_dict() for s in found.skipped]})
                failed = [row for row in rows if row["error"]]
                folder.write_manifest({"format": SCAN_FORMAT, "status": "failed" if failed else "complete"})
                print(f"scan.py: {len(rows) - len(failed)} volume(s) with complete outputs, {len(failed)} failed; "
                      f"outputs in {out}", file=sys.stderr)
                if failed and args.on_error == "stop" and failure is None:
                    failure = ValueError(f"{failed[0]['volume']}: {failed[0]['error']}")
            if failure is not None:
                raise failure
        return rows
    finally:
        cleanup()


def grand_challenge(inputs: Sequence[VolumeInput], out: Path, cfg: Any, paths: dict, settings: Any,
                    normalisation: str) -> dict:
    """PANORAMA's algorithm interface (the layout of its baseline algorithm): the one CT of the
    job → ``<out>/pdac-likelihood.json`` (one JSON float: the patient score, the aggregated slice
    P(tumor), 0 when no slice was classified) and ``<out>/images/pdac-detection-map/detection_map.mha``
    (the stage-3 boxes as 3-D lesion candidates of one likelihood each, in the CT's geometry:
    :mod:`minigpt4.scan_outputs.detection_map`). Both written atomically; nothing else is
    written (the container's ``/output`` belongs to the platform: no manifest, no report).

    Raises:
        ValueError: not exactly one volume in the input (one job = one CT, one float).
    """
    if len(inputs) != 1:
        raise ValueError(f"--grand-challenge: expected one CT in the input, found {len(inputs)}"
                         f"{' (' + ', '.join(e.path.name for e in inputs[:5]) + ')' if inputs else ''}")
    entry = inputs[0]
    volume = load_volume(entry.path, normalisation, scan_limits(), files=entry.files or None)
    stages = load_stages(cfg.model, paths, device=rank_device(cfg.run.device, 0))
    result = scan_slices(stages, volume.slices, settings, _slice_progress(entry.name, volume.num_slices))
    dmap, candidates = volume_detection_map(volume.geometry, result.slices)
    likelihood = float(result.patient.score)
    write_detection_map(out / GC_DETECTION_MAP, dmap, volume.geometry.affine)
    write_json_atomic(out / GC_LIKELIHOOD, likelihood)
    print(f"scan.py --grand-challenge: {entry.path.name}: PDAC likelihood {likelihood:.4f} ({result.patient.decision}), "
          f"{len(candidates)} lesion candidate(s); wrote {out / GC_LIKELIHOOD} and {out / GC_DETECTION_MAP}",
          file=sys.stderr)
    return {"volume": entry.name, "likelihood": likelihood, "decision": result.patient.decision,
            "candidates": [c.as_dict() for c in candidates]}


class OutputFolderClosed(ValueError):
    """``--out`` could not be opened by rank 0 (every rank stops with this one line)."""


def _scan_shard(inputs, mine, out, cfg, paths, settings, args, checkpoints, scan_config, info, fingerprints,
                limits, judge) -> Optional[BaseException]:
    """This rank's volumes; returns the error that stopped it (``--on-error stop``) or None."""
    stages = load_stages(cfg.model, paths, device=info.device)
    bar = progress(len(mine), "volumes" if info.world_size == 1 else f"volumes (rank {info.rank})", unit="volume")
    try:
        for entry in inputs:
            if entry.name not in mine:
                continue
            try:
                status = scan_volume_to_folder(entry, out, stages, settings, args.normalization, checkpoints, scan_config,
                                               fingerprints[entry.name], limits, **judge)
            except USER_ERRORS as err:
                write_volume_error(out / entry.name, entry.name, error_message(err))
                if args.on_error == "stop":
                    return err
                status = "failed"
            bar.set_postfix(last=f"{entry.name} {status}")
            bar.update(1)
    finally:
        bar.close()
    return None
