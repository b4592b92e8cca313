"""The clinician's chat demo (paper §3.9): Gradio UI in :mod:`minigpt4.demo.app`, model-facing
logic in :mod:`minigpt4.demo.service`; files are read and volumes scanned by :mod:`minigpt4.inference`.
Entry point: ``python demo.py --cfg-path eval_configs/demo.yaml``."""
