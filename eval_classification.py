"""Evaluate pancreatic tumor classification (yes/no) and write the paper's Table 2 (SPEC §6).

    python eval_classification.py --cfg-path eval_configs/stage2_tumor_classification.yaml [--split val]
    python eval_classification.py --cfg-path eval_configs/tc_cpu.yaml \
        --predictions output/eval/tc_cpu/predictions.jsonl       # re-score, no model

Greedy answers to the first training question plus P(yes) / (P(yes) + P(no)) at the first answer
token. ``yes`` is the positive class; answers that are neither yes nor no are *invalid* and
counted wrong. Writes ``predictions.jsonl``, ``metrics.json`` (accuracy, precision, recall, F1,
AUC, invalid count, confusion matrix, 95 % bootstrap intervals by volume, the same per source
dataset), ``tables.md``, ``roc_curve.png``, ``confusion_matrix.png`` and ``config.yaml`` to
``run.output_dir``. Records and images are checked before the model loads.
Limits: the TC set's classes come from different datasets (NIH = no, MSD = yes); the
per-dataset numbers show how much of the accuracy that confound can explain.
"""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.evaluate import classification_main as main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval_classification.py"))
