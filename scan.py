"""The three-stage cascade on your own CTs: per volume report.json, boxes.nii.gz, seg.dcm (DICOM
input) and montage.png; summary.csv and scan.json across volumes (see README "Scanning your own CTs").

    python scan.py --cfg-path eval_configs/scan.yaml --inputs CT/ --out scans/
    torchrun --nproc-per-node 4 scan.py --cfg-path eval_configs/scan.yaml --inputs CT/ --out scans/
    python scan.py --cfg-path eval_configs/scan_cpu.yaml --inputs quickstart_output/scan_input --out quickstart_output/scan
"""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.scan import main

if __name__ == "__main__":
    sys.exit(run_main(main, prog="scan.py"))
