"""The image transform every path shares (training, evaluation, prediction, and the processors the exports
write): PIL image -> resized, normalised tensor for the vision encoder."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.sample.pixels import normalise_pixels


class ImageTransform:
    """PIL image -> normalised float tensor [3, S, S] for the vision encoder: resized to the square input size with
    the checkpoint's resampling filter (a PIL number: 3 is bicubic), then its mean and std. The loader stops
    after the resize (``pixels``: uint8); the model normalises on the device (trainer/sample/pixels.py)."""

    def __init__(self, size: int, mean: list[float], std: list[float], resample: int = Image.BICUBIC) -> None:
        self.size, self.resample = size, resample
        self.mean, self.std = list(mean), list(std)

    @classmethod
    def for_model(cls, arch: Any) -> "ImageTransform":
        """The transform of a model (its ArchConfig: image_size, image_mean, image_std, image_resample)."""
        return cls(arch.image_size, arch.image_mean, arch.image_std, arch.image_resample)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized image, uint8 [3, S, S]: what the loader carries."""
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), self.resample)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalise_pixels(self.pixels(image), self.mean, self.std)
