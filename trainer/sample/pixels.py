"""How an image travels from the loader to the vision encoder: uint8 ``[..., 3, S, S]`` (a quarter of fp32's
bytes through the loader's shared memory and the pinned copy), normalised on the device inside the model's
step by the one function here, which the loader-side transform (trainer/data/transform.py) also uses, so both
give the same floats (docs/architecture.md, "No host syncs in the step")."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def normalise_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels -> fp32 ``(x / 255 - mean) / std`` per channel (dim -3). The constants are Python floats, so
    nothing is copied from the host on the device."""
    x = pixels.float() / 255.0
    return torch.stack([(x.select(-3, c) - m) / s for c, (m, s) in enumerate(zip(mean, std))], dim=-3)
