"""The three-stage cascade on your own CTs: per volume report.json, boxes.nii.gz, seg.dcm (DICOM
input) and montage.png; summary.csv and scan.json across volumes (see README "Scanning your own CTs").

    python scan.py --cfg-path eval_configs/scan.yaml --inputs CT/ --out scans/
    torchrun --nproc-per-node 4 scan.py --cfg-path eval_configs/scan.yaml --inputs CT/ --out scans/
    python scan.py --cfg-path eval_configs/scan_cpu.yaml --inputs quickstart_output/scan_input --out quickstart_output/scan
"""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> list:
    """Scan the inputs; returns the summary rows (rank 0)."""
    from minigpt4.scan import main as run

    return run(argv)


if __name__ == "__main__":
    import sys

    from minigpt4.cli import run_main

    sys.exit(run_main(main, prog="scan.py"))
