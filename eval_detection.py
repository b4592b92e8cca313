"""Evaluate detection (pancreas, tumor, organs) and write the paper's tables and figures (SPEC §6).

    python eval_detection.py --cfg-path eval_configs/stage1_pancreas_detection.yaml [--split val]
    python eval_detection.py --cfg-path eval_configs/stage1_pancreas_detection.yaml \
        --checkpoints output/stage1_pancreas_detection          # Table 1 by epoch, best on val
    python eval_detection.py --cfg-path eval_configs/quickstart_cpu.yaml \
        --predictions output/eval/quickstart_cpu/predictions.jsonl   # re-score, no model

Greedy batched generation with the first instruction (``[refer] Give me the location of the
{}``); the answer's 0–100 grid box is rescaled to pixels by width/100 and height/100 and scored by
continuous IoU; unparseable answers score 0 and lower the parse rate. Writes
``predictions.jsonl``, ``metrics.json``, ``tables.md``, ``examples.png``, ``box_heatmaps.png``,
``iou_histogram.png`` and ``config.yaml`` to ``run.output_dir`` (one sub-folder per task when the
config lists several detection tasks). Records and images are checked before the model loads.
Limits: one process, one device; ``--checkpoints`` evaluates one task.
"""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.evaluate import detection_main as main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval_detection.py"))
