"""The clinician's chat demo (paper §3.9): Gradio UI in :mod:`minigpt4.demo.app`, model-facing
logic in :mod:`minigpt4.serving`, volume reading through :mod:`preprocessing` in
:mod:`minigpt4.demo.volumes`. Entry point: ``python demo.py --cfg-path eval_configs/demo.yaml``."""
