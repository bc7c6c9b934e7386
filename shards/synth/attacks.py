"""Spoof renderers of the synthetic generator: print, screen replay and 3D mask, and their per-video parameters.

Each spoof carries the LOCAL texture cues real attacks leave: halftone rosettes and paper grain
(print); sub-pixel stripes, moire and glare (replay); smoothed plastic skin, seams and sharp eye
holes (mask). Global statistics are matched back to the live scene afterwards (``domains.match_stats``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from shards.synth.faces import Landmarks
from shards.synth.pixels import channel_mean, pixel_grid

PRINT_SCREEN_ANGLES = (math.radians(15), math.radians(75), 0.0)  # classic C/M/Y halftone screen angles

# The cue words each sample's metadata lists (``cues``), live samples included.
BASE_CUES = {
    "none": ["natural skin texture", "consistent lighting", "real depth"],
    "print": ["halftone dots", "paper texture", "faded colours"],
    "replay": ["pixel grid", "moire", "gamma shift"],
    "mask": ["smooth plastic skin", "seams", "eye holes", "uniform tone"],
}


def _rotated(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = pixel_grid(size)
    ca, sa = math.cos(angle), math.sin(angle)
    return xx * ca + yy * sa, -xx * sa + yy * ca


Rendered = tuple[np.ndarray, list[str]]  # (image, cue words)


def render_print(img: np.ndarray, rng: np.random.Generator, p: dict[str, Any], lm: Landmarks) -> Rendered:
    """Paper print: reduced gamut, per-channel halftone screens (rosette), paper grain, ink blur."""
    size = img.shape[0]
    grey = channel_mean(img)[..., None]
    out = grey + p["saturation"] * (img - grey)
    out = p["paper_black"] + (p["paper_white"] - p["paper_black"]) * out
    phase = [float(x) for x in rng.uniform(0, p["period"], 2)]
    channels = []
    for ch, angle in enumerate(p["angles"]):
        u, v = _rotated(size, angle)
        k = 2 * np.pi / p["period"]
        screen = 0.5 + 0.25 * (np.cos(k * (u + phase[0])) + np.cos(k * (v + phase[1])))
        dots = 1.0 / (1.0 + np.exp(-p["sharpness"] * (out[..., ch] - screen)))
        channels.append((1 - p["strength"]) * out[..., ch] + p["strength"] * dots)
    out = np.stack(channels, -1)
    fibre = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), (0.6, 2.5))
    out = out * (1 + p["grain"] * fibre)[..., None]
    out = ndimage.gaussian_filter(out, (p["blur"], p["blur"], 0))
    return out, list(BASE_CUES["print"]) + (["blur"] if p["blur"] > 0.6 else [])


def render_replay(img: np.ndarray, rng: np.random.Generator, p: dict[str, Any], lm: Landmarks) -> Rendered:
    """Screen replay: gamma shift, RGB sub-pixel stripes, moire beat bands, glare, bezel."""
    size = img.shape[0]
    out = np.clip(img, 0, 1) ** p["gamma"]
    u, v = _rotated(size, p["angle"])
    pitch = p["pitch"]
    stripes = [1 + p["stripe"] * np.cos(2 * np.pi * (u / pitch - ch / 3.0)) for ch in range(3)]
    rows = 1 - p["row_gap"] * (0.5 + 0.5 * np.cos(2 * np.pi * v / pitch)) ** 4
    out = out * np.stack(stripes, -1) * rows[..., None]
    # Moire: the difference-frequency term of two slightly mismatched gratings (screen pixels vs
    # camera sensor), with a little lens curvature so the bands bend.
    yy, xx = pixel_grid(size)
    k = (p["moire_freq"] * math.cos(p["moire_angle"]), p["moire_freq"] * math.sin(p["moire_angle"]))
    r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / size**2
    moire = np.cos(2 * np.pi * (k[0] * xx + k[1] * yy) + p["moire_curve"] * r2 + rng.uniform(0, 2 * np.pi))
    out = out * (1 + p["moire_amp"] * moire)[..., None]
    cues = list(BASE_CUES["replay"])
    if p["glare"]:
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        sy, sx = rng.uniform(0.06, 0.2, 2) * size
        blob = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        out = out + p["glare_amp"] * blob[..., None]
        cues.append("glare")
    if p["bezel"]:
        width = int(rng.integers(5, 14))
        edge = int(rng.integers(4))
        out = np.rot90(out, edge).copy()
        out[:, :width] = rng.uniform(0.02, 0.08) + 0.02 * rng.standard_normal((size, width, 1))
        out = np.rot90(out, -edge)
        cues.append("bezel")
    return out, cues


def render_mask(img: np.ndarray, rng: np.random.Generator, p: dict[str, Any], lm: Landmarks) -> Rendered:
    """3D mask: smoothed uniform plastic skin inside the face outline, seams, sharp dark eye holes."""
    size = img.shape[0]
    yy, xx = pixel_grid(size)
    ca, sa = math.cos(lm.angle), math.sin(lm.angle)

    def ellipse_radius(center: np.ndarray, axes: np.ndarray) -> np.ndarray:
        dy, dx = yy - center[0], xx - center[1]
        ry, rx = dy * ca - dx * sa, dy * sa + dx * ca
        return np.sqrt((ry / axes[0]) ** 2 + (rx / axes[1]) ** 2)

    d = ellipse_radius(lm.center, lm.axes * p["face_scale"])
    inside = (d < 1.0).astype(np.float32)[..., None]
    smooth = ndimage.gaussian_filter(img, (p["blur"], p["blur"], 0))
    tone = (smooth * inside).sum((0, 1)) / max(inside.sum(), 1.0)
    plastic = (1 - p["uniform"]) * smooth + p["uniform"] * tone
    plastic = plastic + p["sheen"] * np.exp(-0.5 * ((d - 0.45) / 0.12) ** 2)[..., None]  # waxy highlight band
    out = inside * plastic + (1 - inside) * img
    seam = (np.abs(d - 1.0) * lm.axes.min() * p["face_scale"] < p["seam_width"]).astype(np.float32)
    out = out * (1 - p["seam_dark"] * seam)[..., None]
    for eye in lm.eyes:
        e = ellipse_radius(eye, np.array([0.035, 0.07]) * size * lm.scale * p["hole_scale"])
        hole = e < 1.0
        rim = (e >= 1.0) & (e < 1.25)
        out[hole] = p["hole_level"] * (1 + 0.3 * rng.standard_normal((int(hole.sum()), 1)))
        out[rim] = out[rim] * 1.35  # cut edge of the mask catches light
    return out, list(BASE_CUES["mask"])


RENDERERS: dict[str, Callable[..., Rendered]] = {
    "print": render_print, "replay": render_replay, "mask": render_mask,
}


def attack_params(attack: str, rng: np.random.Generator) -> dict[str, Any]:
    """Per-video attack parameters (the same print/screen/mask across a video's frames)."""
    if attack == "print":
        tilt = rng.uniform(-0.1, 0.1)  # print held slightly rotated
        return {
            "period": rng.uniform(4.0, 6.5), "angles": [tilt + a for a in PRINT_SCREEN_ANGLES],
            "sharpness": rng.uniform(8, 20), "strength": rng.uniform(0.45, 0.7),
            "saturation": rng.uniform(0.55, 0.9), "paper_white": rng.uniform(0.88, 0.97),
            "paper_black": rng.uniform(0.05, 0.15), "grain": rng.uniform(0.03, 0.07), "blur": rng.uniform(0.3, 0.7),
        }
    if attack == "replay":
        return {
            "gamma": rng.uniform(0.7, 1.4), "pitch": rng.uniform(4.0, 6.0), "angle": rng.uniform(-0.08, 0.08),
            "stripe": rng.uniform(0.35, 0.55), "row_gap": rng.uniform(0.25, 0.45),
            "moire_freq": rng.uniform(1 / 24, 1 / 7), "moire_angle": rng.uniform(0, np.pi),
            "moire_curve": rng.uniform(-3, 3), "moire_amp": rng.uniform(0.08, 0.18),
            "glare": bool(rng.random() < 0.6), "glare_amp": rng.uniform(0.15, 0.4), "bezel": bool(rng.random() < 0.35),
        }
    if attack == "mask":
        return {
            "face_scale": rng.uniform(0.85, 1.0), "blur": rng.uniform(1.5, 3.0), "uniform": rng.uniform(0.4, 0.7),
            "sheen": rng.uniform(0.03, 0.1), "seam_width": rng.uniform(1.0, 2.0), "seam_dark": rng.uniform(0.35, 0.55),
            "hole_scale": rng.uniform(0.9, 1.2), "hole_level": rng.uniform(0.02, 0.1),
        }
    raise ValueError(f"unknown attack {attack!r}")
