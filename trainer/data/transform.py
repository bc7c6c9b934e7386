"""The image transform every path shares (training, evaluation, prediction, and the processors the exports
write): PIL image -> resized, normalised tensor for the vision encoder."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """PIL image -> normalised float tensor [3, S, S] for the vision encoder: resized to the square input size with
    the checkpoint's resampling filter (a PIL number: 3 is bicubic), then its mean and std."""

    def __init__(self, size: int, mean: list[float], std: list[float], resample: int = Image.BICUBIC) -> None:
        self.size, self.resample = size, resample
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    @classmethod
    def for_model(cls, arch: Any) -> "ImageTransform":
        """The transform of a model (its ArchConfig: image_size, image_mean, image_std, image_resample)."""
        return cls(arch.image_size, arch.image_mean, arch.image_std, arch.image_resample)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std
