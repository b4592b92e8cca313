"""The clinical cascade end to end on every slice of the test volumes (issue 13).

    python eval_cascade.py --cfg-path eval_configs/cascade.yaml
    python eval_cascade.py --cfg-path eval_configs/cascade_cpu.yaml     # the quickstart's tiny stages

Stage 1 (pancreas box) → crop from the predicted box, cut as ``python -m preprocessing tc`` cuts →
stage 2 P(tumor) → stage 3 (tumor box) where P(tumor) >= threshold; the three stages share one
base (EVA + LLaMA loaded once). Per volume, P(tumor) is aggregated (max, mean of the top k) into
a patient answer; threshold and aggregation are chosen on the val volumes. Writes
``predictions.jsonl`` (one row per slice), ``metrics.json``, ``tables.md``, ``p_tumor_along_z.png``
and ``config.yaml`` to ``run.output_dir``. Needs MSD/NIH folders prepared with ``--all-slices``.
Before the model is loaded: each stage's checkpoint must record its stage's task, the test split must
hold a volume, and no stage (nor an ancestor its recorded provenance names) may have trained on a
val/test volume (``--allow-unknown-provenance`` for own checkpoints saved without provenance);
``run.output_dir`` follows the output-folder rule (``--overwrite``). Inconclusive volumes (stage 1
boxed fewer than ``cascade.min_boxed_slices`` slices) are reported, never scored as "no tumor".
Several GPUs: ``torchrun --nproc-per-node N eval_cascade.py ...`` shards the volumes across ranks
(by name, as ``scan.py``); rank 0 gathers the rows, scores and writes.
"""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.eval_cascade import main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval_cascade.py"))
