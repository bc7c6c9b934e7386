"""Live faces for the synthetic generator: the bundled source faces, their landmarks, the live render.

Live faces come from images bundled with scikit-image (no downloads): the first 100 crops of
``skimage.data.lfw_subset()`` (25x25 grey faces; the other 100 are non-faces) and the face of
``skimage.data.astronaut()``. Subject id = source index (0..99 LFW, 100 astronaut).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

NUM_SUBJECTS = 101  # len(face_sources()): subject ids 0..100

# Canonical landmarks in source unit coordinates (row, col), read off the mean LFW face.
_EYES = np.array([[0.35, 0.27], [0.35, 0.61]])
_FACE_CENTER = np.array([0.47, 0.44])
_FACE_AXES = np.array([0.47, 0.34])  # ellipse semi-axes (rows, cols)
_ASTRONAUT_BOX = (55, 185, 168, 298)  # chosen so its eyes sit on _EYES

SKIN_TONES = np.array([
    [1.00, 0.84, 0.74], [0.95, 0.76, 0.62], [0.86, 0.65, 0.50],
    [0.72, 0.52, 0.38], [0.56, 0.39, 0.28], [0.42, 0.29, 0.21],
], dtype=np.float32)


@functools.lru_cache(maxsize=1)
def face_sources() -> tuple[np.ndarray, ...]:
    """The 101 source faces as float32 arrays in [0, 1]: 100 grey 25x25 LFW crops + 1 RGB astronaut."""
    import skimage.data

    lfw = skimage.data.lfw_subset()[:100].astype(np.float32)  # the first 100 of 200 are faces
    y0, y1, x0, x1 = _ASTRONAUT_BOX
    astro = Image.fromarray(skimage.data.astronaut()[y0:y1, x0:x1]).resize((48, 48), Image.LANCZOS)
    return (*lfw, np.asarray(astro, dtype=np.float32) / 255.0)


@dataclass
class Landmarks:
    """Face geometry in output pixels: eye centres (row, col), face ellipse, in-plane angle."""

    eyes: np.ndarray
    center: np.ndarray
    axes: np.ndarray
    angle: float
    scale: float


def render_live(src: np.ndarray, size: int, rng: np.random.Generator,
                pose: dict[str, float]) -> tuple[np.ndarray, Landmarks]:
    """Warp a source face to ``size`` px with the given pose, colourise grey faces, add skin texture."""
    n = src.shape[0]
    theta, scale = pose["angle"], pose["scale"]
    shift = np.array([pose["dy"], pose["dx"]], dtype=np.float64)
    c = _FACE_CENTER
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    # output unit coords w -> source unit coords u = c + rot @ (w - c - shift) / scale
    a_unit = rot / scale
    b_unit = c - a_unit @ (c + shift)
    # to pixel coords: w = (p_out + .5)/size, p_src = u * n - .5
    matrix = a_unit * n / size
    offset = n * (a_unit @ np.full(2, 0.5 / size) + b_unit) - 0.5
    if src.ndim == 2:
        grey = ndimage.affine_transform(src, matrix, offset, output_shape=(size, size), order=3, mode="reflect")
        tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.08, 3).astype(np.float32)
        img = np.clip(grey, 0, 1)[..., None] * tone * 1.15
    else:
        img = np.stack([
            ndimage.affine_transform(src[..., ch], matrix, offset, output_shape=(size, size), order=3, mode="reflect")
            for ch in range(3)
        ], axis=-1) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    # Fine skin texture (pores): band-passed noise, multiplicative. Masks smooth it away.
    noise = rng.standard_normal((size, size)).astype(np.float32)
    pores = ndimage.gaussian_filter(noise, 0.7) - ndimage.gaussian_filter(noise, 2.0)
    img = img * (1.0 + rng.uniform(0.08, 0.16) * pores)[..., None]
    inv = np.linalg.inv(a_unit)  # source unit -> output unit: w = c + shift + inv @ (u - c)

    def to_out(u: np.ndarray) -> np.ndarray:
        return ((c + shift) + (u - c) @ inv.T) * size - 0.5

    lm = Landmarks(eyes=to_out(_EYES), center=to_out(_FACE_CENTER), axes=_FACE_AXES * size * scale,
                   angle=theta, scale=scale)
    if pose["flip"]:
        img = img[:, ::-1]
        lm.eyes[:, 1] = size - 1 - lm.eyes[:, 1]
        lm.center[1] = size - 1 - lm.center[1]
        lm.angle = -theta
    return np.clip(img, 0, 1).astype(np.float32), lm
