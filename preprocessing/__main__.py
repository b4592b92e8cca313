"""``python -m preprocessing <subcommand>``: CT volumes → oriented PNG slices + JSON annotations.

Subcommands:
  msd        MSD Task07 (imagesTr/, labelsTr/; 1 pancreas, 2 tumor)
  nih        NIH Pancreas-CT (DICOM series folders or NIfTI images; labels label00XX.nii.gz)
  abd        AbdomenCT-1K (Case_XXXXX_0000.nii.gz + Case_XXXXX.nii.gz; 1 liver, 2 kidney, 3 spleen, 4 pancreas)
  panorama   PANORAMA (<patient>_<study>_0000.nii.gz|.mha; manual_labels/ + automatic_labels/, values 0-6;
             clinical_information.xlsx): split by patient, stratified by PDAC
  tc         tumor-classification crops from prepared MSD and NIH folders
  tc-import  a TC folder from existing crops (the release's PNGs or a CSV)
  synthetic  synthetic abdominal CT phantoms in a dataset's file layout
  report     slices per threshold (paper Appendix Table 1) for prepared folders

Limits: no resampling (slices keep their native size); oblique DICOM series are refused.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

from minigpt4.cli import error_message
from minigpt4.outputs import OutputFolder, remove_created
from preprocessing.volumes import VolumeError
from preprocessing.pipeline import Options, prepare
from preprocessing.panorama import label_folders, prepare_panorama
from preprocessing import synthetic_panorama
from preprocessing.synthetic import generate
from preprocessing.output_folder import PREPARED_KINDS
from preprocessing.tc import build_tc, import_tc
from preprocessing.report import report


def _label_map(items: Optional[Sequence[str]]) -> Optional[dict]:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--label-map expects name=NUMBER items, got {item!r}")
        out[name.strip()] = int(value)
    return out


def _number(convert, ok, expected: str):
    """An argparse type: ``convert(text)`` that must satisfy ``ok``; refused before anything is written."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")  # --workers 0 is a typo, not "all cores"
_ratio = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")  # also refuses nan
_finite = _number(float, math.isfinite, "a finite number")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalization", choices=("paper", "window"), default="paper",
                   help="paper: per-slice 2-98%% percentile clip + histogram equalisation; window: HU window")
    p.add_argument("--window", nargs=2, type=_finite, metavar=("LO", "HI"), default=(-150.0, 250.0))
    p.add_argument("--threshold", type=float, default=0.6, help="select slices with bbox ratio > threshold")
    p.add_argument("--test-ratio", type=_ratio, default=0.2)
    p.add_argument("--val-ratio", type=_ratio, default=0.1, help="fraction of the training volumes used for validation")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--balanced", action="store_true", help="also write *_balanced_* sets with target-free slices")
    p.add_argument("--all-slices", action="store_true",
                   help="write a PNG of every slice, also those without a target (needed by eval_cascade.py)")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1)
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a folder prepared with other parameters, or write into a non-empty folder "
                        "without manifest.json (its own files are kept)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preprocessing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, many in (("msd", False), ("nih", False), ("abd", True)):
        p = sub.add_parser(name, help=f"prepare {name.upper()} volumes")
        p.add_argument("--images", required=True, nargs="+" if many else None)
        p.add_argument("--labels", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--label-map", nargs="+", metavar="NAME=N",
                       help="label numbers of another scheme, e.g. liver=5 kidney=2 spleen=1 pancreas=7")
        p.add_argument("--assume-orientation", metavar="CODES",
                       help="axis codes (RAS, LPS, ...) of NIfTI files whose header has no orientation "
                            "(qform_code = sform_code = 0); such files are refused without it")
        if name == "abd":
            p.add_argument("--exclude-overlap-with", nargs="+", metavar="PREPARED_OR_RAW_DIR",
                           help="MSD / NIH folders: ABD volumes that are the same scans (by content) stay out of "
                                "ABD val/test and are listed in the manifest")
        _common(p)
    p = sub.add_parser("panorama", help="prepare PANORAMA studies (split by patient)")
    p.add_argument("--images", required=True, nargs="+", help="folders of <patient>_<study>_0000.nii.gz / .mha")
    p.add_argument("--labels", required=True, nargs="+", metavar="DIR",
                   help="manual_labels/ and/or automatic_labels/ (or manual=DIR automatic=DIR); a manual label "
                        "is preferred over an automatic one")
    p.add_argument("--clinical", required=True, help="clinical_information.xlsx as published (or a CSV export)")
    p.add_argument("--out", required=True)
    p.add_argument("--exclude-overlap-with", nargs="+", metavar="PREPARED_OR_RAW_DIR",
                   help="MSD / NIH folders: studies that are the same scans (by content) go to train under their "
                        "MSD/NIH name; sheet-flagged MSD/NIH studies without a match are in no split")
    p.add_argument("--assume-orientation", metavar="CODES",
                   help="axis codes of NIfTI files whose header has no orientation (qform_code = sform_code = 0)")
    _common(p)
    p = sub.add_parser("tc", help="tumor-classification crops from prepared MSD and NIH folders")
    p.add_argument("--msd", help="prepared MSD folder (variants paper, msd-only)")
    p.add_argument("--nih", help="prepared NIH folder (variant paper)")
    p.add_argument("--panorama", help="prepared PANORAMA folder (variant panorama: PDAC lesion slices = yes, "
                                      "non-PDAC patients' pancreas slices = no; same scanners)")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", choices=("paper", "msd-only", "panorama"), default=None,
                   help="default: panorama with --panorama, else paper")
    p.add_argument("--margin", type=int, default=0, help="pixels added around the pancreas box")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="crop slices with pancreas bbox ratio > threshold (default 0: every slice with a box)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("tc-import", help="a TC folder from existing crops")
    p.add_argument("--images", required=True)
    p.add_argument("--csv", help="image,dataset,volume,slice_index,answer")
    p.add_argument("--out", required=True)
    p.add_argument("--test-ratio", type=_ratio, default=0.2)
    p.add_argument("--val-ratio", type=_ratio, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--split-from", nargs="+", metavar="PREPARED_DIR",
                   help="prepared MSD / NIH folders: each crop volume keeps the cascade's split (no leakage)")
    p = sub.add_parser("synthetic", help="synthetic CT phantoms in a dataset's file layout")
    p.add_argument("--out", required=True)
    p.add_argument("--scheme", choices=("msd", "nih", "abd", "panorama"), required=True)
    p.add_argument("--n", type=int, default=12, help="volumes (panorama: patients)")
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--orient", default="RAS", help="storage orientation (nibabel axis codes), e.g. RAS, LPS, LAS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nih-format", choices=("dicom", "nifti"), default="dicom")
    p.add_argument("--image-format", choices=("nifti", "mha"), default="nifti", help="panorama: image files")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder without manifest.json (its own files are kept)")
    p = sub.add_parser("report", help="slices per threshold (Appendix Table 1)")
    p.add_argument("folders", nargs="+")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command in ("msd", "nih", "abd"):
        images = args.images if isinstance(args.images, list) else [args.images]
        opts = Options(dataset=args.command.upper(), images=images, labels=args.labels, out=args.out,
                       normalization=args.normalization, window=tuple(args.window), threshold=args.threshold,
                       test_ratio=args.test_ratio, val_ratio=args.val_ratio, seed=args.seed,
                       balanced=args.balanced, all_slices=args.all_slices, label_map=_label_map(args.label_map),
                       on_error=args.on_error,
                       workers=args.workers, overwrite=args.overwrite,
                       assume_orientation=args.assume_orientation,
                       exclude_overlap_with=getattr(args, "exclude_overlap_with", None))
        prepare(opts)
    elif args.command == "panorama":
        opts = Options(dataset="PANORAMA", images=args.images, labels=label_folders(args.labels), out=args.out,
                       normalization=args.normalization, window=tuple(args.window), threshold=args.threshold,
                       test_ratio=args.test_ratio, val_ratio=args.val_ratio, seed=args.seed,
                       balanced=args.balanced, all_slices=args.all_slices, on_error=args.on_error,
                       workers=args.workers, overwrite=args.overwrite, assume_orientation=args.assume_orientation,
                       exclude_overlap_with=args.exclude_overlap_with, clinical=args.clinical)
        prepare_panorama(opts)
    elif args.command == "synthetic":
        with OutputFolder(args.out, "preprocessing synthetic", overwrite=True, owner="python -m preprocessing synthetic",
                          owns=lambda m: m.get("dataset") == "synthetic"):  # checked by generate; locked here
            if args.scheme == "panorama":
                res = synthetic_panorama.generate(args.out, args.n, args.slices, args.size, args.orient, args.seed,
                                                  args.image_format, overwrite=args.overwrite)
                print(f"next: python -m preprocessing panorama --images {res['images']} --labels "
                      f"{' '.join(res['labels'])} --clinical {res['clinical']} --out OUT")
                return 0
            res = generate(args.out, args.scheme, args.n, args.slices, args.size, args.orient, args.seed,
                           args.nih_format, overwrite=args.overwrite)
        print(f"next: python -m preprocessing {args.scheme} --images {res['images']} --labels {res['labels']} --out OUT")
    elif args.command in ("tc", "tc-import"):
        # the tc functions check the folder (output_folder.check_prepared_folder); this adds the lock and
        # the removal of what a failed run created
        with OutputFolder(args.out, "preprocessing", overwrite=True, owner="python -m preprocessing",
                          owns=lambda m: m.get("dataset") in PREPARED_KINDS):
            if args.command == "tc":
                variant = args.variant or ("panorama" if args.panorama else "paper")
                build_tc(args.msd, args.nih, args.out, variant=variant, margin=args.margin,
                         threshold=args.threshold, seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                         panorama=args.panorama)
            else:
                import_tc(args.images, args.out, csv_path=args.csv, test_ratio=args.test_ratio,
                          val_ratio=args.val_ratio, seed=args.seed, overwrite=args.overwrite,
                          split_from=args.split_from)
    elif args.command == "report":
        print(report(args.folders))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run; bad input → message on stderr naming the file, exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (VolumeError, OSError, ValueError, argparse.ArgumentTypeError) as err:
        remove_created()  # what the failed run created (OutputFolder already did, this catches the rest)
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
