"""``train.py``: the command line of one training stage (:func:`minigpt4.training.train`); see the
top-level ``train.py`` for usage."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from minigpt4.cli import add_provenance_argument
from minigpt4.config import add_config_arguments, load_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train one stage of the MiniGPT-Pancreas cascade (SPEC §5).")
    add_config_arguments(parser)
    add_provenance_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty run.output_dir that no training run wrote (its files are kept)")
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)

    # lazy: both import torch and the model code (seconds); --help and config errors stay fast
    from minigpt4.provenance import check_training_config
    from minigpt4.training import train

    # no test volume of any dataset is trained on (here, or by init_from as its checkpoint records)
    check_training_config(cfg, allow_unknown=args.allow_unknown_provenance)
    result = train(cfg, overwrite=args.overwrite, allow_unknown_provenance=args.allow_unknown_provenance)
    if result.best_score is not None:
        print(f"done: {result.step} steps, {result.epoch} epochs, best val score {result.best_score:.4f} "
              f"(epoch {result.best_epoch}); outputs in {result.output_dir}")
    else:
        print(f"done: {result.step} steps, {result.epoch} epochs; outputs in {result.output_dir}")
    return 0
