"""The MiniGPT-v2 model stack: EVA ViT-g (eva_vit), the composed model (minigpt_v2) and
checked weight loading/saving (checkpoints). Import the submodules directly, e.g.
``from minigpt4.models.minigpt_v2 import build_model``."""
