"""Pixel helpers shared by the attack renderers and the capture pipeline of the synthetic generator."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of a ``size`` x ``size`` image (float32, cached: treat as read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def channel_mean(img: np.ndarray) -> np.ndarray:
    """Channel mean; much faster than ``img.mean(-1)`` for (H, W, 3) arrays."""
    return (img[..., 0] + img[..., 1] + img[..., 2]) * np.float32(1 / 3)
