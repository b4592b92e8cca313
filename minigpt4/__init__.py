"""MiniGPT-Pancreas: MiniGPT-v2 (EVA ViT-g + LLaMA-2 with LoRA) for pancreas CT slices."""

__version__ = "0.1.0"
