"""Train one stage of the MiniGPT-Pancreas cascade (SPEC §5).

    python train.py --cfg-path train_configs/stage1_pancreas_detection.yaml [--options key=value ...]
    torchrun --nproc-per-node N train.py --cfg-path ...        # DDP (NCCL on GPU, gloo on CPU)

The config has ``model`` / ``datasets`` / ``run`` sections (minigpt4/config.py); ``--options``
overrides any key and unknown keys are errors. Outputs (checkpoints, logs, resolved config) go
to ``run.output_dir``; see minigpt4/training/trainer.py for the layout. ``run.resume=auto``
continues an interrupted run exactly; ``model.init_from`` starts a stage from other weights.
Limits: one task per dataset entry; validation runs on rank 0 only.
"""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.train import main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="train.py"))
