"""Train one stage of the MiniGPT-Pancreas cascade (SPEC §5).

    python train.py --cfg-path train_configs/stage1_pancreas_detection.yaml [--options key=value ...]
    torchrun --nproc-per-node N train.py --cfg-path ...        # DDP (NCCL on GPU, gloo on CPU)

The config has ``model`` / ``datasets`` / ``run`` sections (minigpt4/config.py); ``--options``
overrides any key and unknown keys are errors. Outputs (checkpoints, logs, resolved config) go
to ``run.output_dir``; see minigpt4/training/trainer.py for the layout. ``run.resume=auto``
continues an interrupted run exactly; ``model.init_from`` starts a stage from other weights.
Limits: one task per dataset entry; validation runs on rank 0 only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from minigpt4.cli import add_provenance_argument
from minigpt4.config import add_config_arguments, load_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_provenance_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty run.output_dir that no training run wrote (its files are kept)")
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg_path, args.options)

    from minigpt4.evaluation.leakage import check_training_config
    from minigpt4.training import train  # after config parsing, so --help and config errors are fast

    # no test volume of any dataset is trained on (here, or by init_from as its checkpoint records)
    check_training_config(cfg, allow_unknown=args.allow_unknown_provenance)
    result = train(cfg, overwrite=args.overwrite, allow_unknown_provenance=args.allow_unknown_provenance)
    if result.best_score is not None:
        print(f"done: {result.step} steps, {result.epoch} epochs, best val score {result.best_score:.4f} "
              f"(epoch {result.best_epoch}); outputs in {result.output_dir}")
    else:
        print(f"done: {result.step} steps, {result.epoch} epochs; outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":
    from minigpt4.cli import run_main

    sys.exit(run_main(main, prog="train.py"))
