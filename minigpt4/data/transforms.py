"""The image transform of SPEC §2, shared by training, evaluation and the demo.

Grayscale or RGB(A) slice → RGB → bicubic resize to ``image_size``² (aspect ratio not kept, as
in the release) → tensor in [0, 1] → CLIP normalisation. No augmentation.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """Callable: PIL image or HxW / HxWxC uint8 array → float tensor (3, image_size, image_size)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: Union[Image.Image, np.ndarray]) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        image = TF.resize(
            image, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        tensor = TF.to_tensor(image)
        return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, bicubic, CLIP normalisation)"
