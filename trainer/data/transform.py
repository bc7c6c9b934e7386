"""The image transform every path shares (training, evaluation, prediction, and the processors the exports
write): PIL image -> resized, normalised tensor for the vision encoder."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """PIL image -> normalised float tensor [3, S, S] for the vision encoder."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std
