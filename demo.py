"""The clinician's chat demo (paper §3.9): a Gradio app serving one checkpoint.

    python demo.py --cfg-path eval_configs/demo.yaml              # full size, a GPU
    python demo.py --cfg-path eval_configs/demo_cpu.yaml          # tiny model on the CPU
    python demo.py --cfg-path eval_configs/demo_cpu.yaml --port 7861 --options model.ckpt=...

Upload a CT slice (PNG/JPEG) or a volume (.nii/.nii.gz or a zipped DICOM series), ask with the
task buttons or type ``[refer]``/``[vqa]`` instructions; boxes are drawn in red; "Scan volume"
runs detection and classification on every slice. Scripted endpoints for ``gradio_client``:
``/ask``, ``/classify``, ``/scan_volume`` (docs/DEMO.md).

Limits: a research prototype, not a medical device. Binds to 127.0.0.1 unless ``--host`` says
otherwise; a public Gradio link is opened only with ``--share``. There is no authentication.
"""

import sys

from minigpt4.cli import run_main
from minigpt4.commands.demo import main, parse_args  # noqa: F401  (parse_args: tests call demo.parse_args)

if __name__ == "__main__":
    sys.exit(run_main(main, prog="demo.py"))
