"""Synthetic face anti-spoofing data: live faces, print/replay/mask attacks, four capture domains.

Why it looks like this:
- Live faces come from images bundled with scikit-image (no downloads): the first 100 crops of
  ``skimage.data.lfw_subset()`` (25x25 grey faces; the other 100 are non-faces) and the face of
  ``skimage.data.astronaut()``. Subject id = source index (0..99 LFW, 100 astronaut).
- Spoofs carry the LOCAL texture cues real attacks leave (halftone rosettes and paper grain;
  sub-pixel stripes, moire and glare; smoothed plastic skin, seams and sharp eye holes). Global
  statistics are kept from being a shortcut: a spoof's per-channel mean/std is matched back to
  its live scene, every sample's fine-detail energy is topped up to a label-independent random
  level with clutter texture in a few blotches (``equalise_hf``), and every sample, live or
  spoof, gets the same random presentation jitter (saturation, contrast, blur/sharpening).
- Domains model what differs between real datasets (camera colour cast, sensor noise, JPEG
  quality, capture resolution, lighting) and are applied AFTER the attack, as the camera captures
  the print/screen/mask. A classifier on global statistics trained on three domains does not
  transfer to the fourth (tests/test_shards_synth_difficulty.py); a small ViT does.
- Every sample is drawn from its own ``numpy`` Generator seeded by (seed, domain, video, frame),
  so the output does not depend on generation order and the same seed gives byte-identical shards.

Run ``python -m shards.synth`` for the learnability check (a tiny ViT, leave-one-domain-out).
"""
from __future__ import annotations

import argparse
import functools
import io
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from shards.captions import CAPTIONS
from shards.io import setup_logging
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
ATTACK_CYCLE = ("none", "print", "none", "replay", "none", "mask")  # per video: 50% live, spoofs even
NUM_SUBJECTS = 101
HF_TARGET = (8e-4, 5e-3)  # range of fine-detail energy every sample is topped up to (see equalise_hf)
PRINT_SCREEN_ANGLES = (math.radians(15), math.radians(75), 0.0)  # classic C/M/Y halftone screen angles
CLUTTER_COVER = (0.15, 0.35)  # fraction of the frame the topping-up clutter texture covers

# Each domain is a capture setup. Ranges are sampled per frame, so statistics also vary inside
# a domain. cast: per-channel RGB gain; noise: sensor noise std (0..1 scale) at capture
# resolution; resolution: capture scale before upsampling back; gradient: max strength of a
# linear lighting ramp; gamma: tone curve exponent.
DOMAINS: dict[str, dict[str, Any]] = {
    "domain_a": {  # studio camera: clean, warm, full resolution
        "cast": (1.08, 1.0, 0.86), "brightness": (0.95, 1.15), "contrast": (0.9, 1.1), "gamma": (0.9, 1.0),
        "gradient": 0.1, "resolution": (0.9, 1.0), "noise": (0.004, 0.012), "jpeg": (88, 96),
    },
    "domain_b": {  # phone in dim light: cold cast, dark, noisy
        "cast": (0.86, 1.0, 1.16), "brightness": (0.7, 0.9), "contrast": (0.8, 1.0), "gamma": (1.05, 1.2),
        "gradient": 0.35, "resolution": (0.8, 0.95), "noise": (0.02, 0.04), "jpeg": (72, 85),
    },
    "domain_c": {  # low-resolution webcam: green cast, harsh contrast, strong JPEG
        "cast": (0.92, 1.08, 0.9), "brightness": (0.9, 1.1), "contrast": (1.1, 1.35), "gamma": (0.8, 0.95),
        "gradient": 0.2, "resolution": (0.7, 0.8), "noise": (0.01, 0.02), "jpeg": (60, 75),
    },
    "domain_d": {  # bright, flat, magenta-tinted capture with mild blur
        "cast": (1.05, 0.9, 1.05), "brightness": (1.1, 1.3), "contrast": (0.7, 0.9), "gamma": (0.75, 0.9),
        "gradient": 0.15, "resolution": (0.8, 0.9), "noise": (0.008, 0.02), "jpeg": (78, 90),
    },
}
ALL_DOMAINS = tuple(DOMAINS)

# Canonical landmarks in source unit coordinates (row, col), read off the mean LFW face.
_EYES = np.array([[0.35, 0.27], [0.35, 0.61]])
_FACE_CENTER = np.array([0.47, 0.44])
_FACE_AXES = np.array([0.47, 0.34])  # ellipse semi-axes (rows, cols)
_ASTRONAUT_BOX = (55, 185, 168, 298)  # chosen so its eyes sit on _EYES

SKIN_TONES = np.array([
    [1.00, 0.84, 0.74], [0.95, 0.76, 0.62], [0.86, 0.65, 0.50],
    [0.72, 0.52, 0.38], [0.56, 0.39, 0.28], [0.42, 0.29, 0.21],
], dtype=np.float32)

# -- captions ---------------------------------------------------------------------------------
REPLAY_EXTRAS = {
    "glare": " and a bright reflection sits on the glass",
    "bezel": " and the dark display bezel is visible",
}
BASE_CUES = {
    "none": ["natural skin texture", "consistent lighting", "real depth"],
    "print": ["halftone dots", "paper texture", "faded colours"],
    "replay": ["pixel grid", "moire", "gamma shift"],
    "mask": ["smooth plastic skin", "seams", "eye holes", "uniform tone"],
}


# -- sources and geometry ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def face_sources() -> tuple[np.ndarray, ...]:
    """The 101 source faces as float32 arrays in [0, 1]: 100 grey 25x25 LFW crops + 1 RGB astronaut."""
    import skimage.data

    lfw = skimage.data.lfw_subset()[:100].astype(np.float32)  # the first 100 of 200 are faces
    y0, y1, x0, x1 = _ASTRONAUT_BOX
    astro = Image.fromarray(skimage.data.astronaut()[y0:y1, x0:x1]).resize((48, 48), Image.LANCZOS)
    return (*lfw, np.asarray(astro, dtype=np.float32) / 255.0)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


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


# -- attacks ------------------------------------------------------------------------------------
def _rotated(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    ca, sa = math.cos(angle), math.sin(angle)
    return xx * ca + yy * sa, -xx * sa + yy * ca


Rendered = tuple[np.ndarray, list[str]]  # (image, cue words)


def render_print(img: np.ndarray, rng: np.random.Generator, p: dict[str, Any], lm: Landmarks) -> Rendered:
    """Paper print: reduced gamut, per-channel halftone screens (rosette), paper grain, ink blur."""
    size = img.shape[0]
    grey = _grey(img)[..., None]
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
    yy, xx = _grid(size)
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
    yy, xx = _grid(size)
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


# -- presentation jitter and capture ----------------------------------------------------------
def match_stats(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Give ``img`` the per-channel mean and std of ``ref`` (spoofs keep the live scene's global look)."""
    def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        planes = np.ascontiguousarray(x.transpose(2, 0, 1)).reshape(3, -1)  # fast reductions
        return planes.mean(1), planes.std(1)

    (m, s), (rm, rs) = channel_stats(img), channel_stats(ref)
    return (img - m) / (s + 1e-6) * rs + rm


def _grey(img: np.ndarray) -> np.ndarray:
    """Channel mean; much faster than ``img.mean(-1)`` for (H, W, 3) arrays."""
    return (img[..., 0] + img[..., 1] + img[..., 2]) * np.float32(1 / 3)


def hf_energy(img: np.ndarray) -> float:
    """Mean squared fine detail of the grey image (what Laplacian variance / HF ratio measure)."""
    grey = _grey(img)
    return float(np.mean((grey - ndimage.gaussian_filter(grey, 1.0)) ** 2))


@functools.lru_cache(maxsize=4)
def _periphery(size: int) -> np.ndarray:
    yy, xx = _grid(size)
    return 1.5 * (np.hypot(yy - size / 2, xx - size / 2) / (size / 2)) ** 2


def equalise_hf(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Top fine detail up to a label-independent random level with clutter texture.

    Spoof patterns add high-frequency energy; without this, the amount of fine detail alone
    separates live from spoof. The clutter (hair, stubble, fabric, background) has the same
    frequency band as halftone dots and pixel grids but sits in a few blotches, mostly away
    from the face centre, while a spoof pattern covers the whole print or screen: global
    statistics see the same energy, a patch-based model sees where it is and how it looks.
    """
    size = img.shape[0]
    target = math.exp(rng.uniform(*np.log(HF_TARGET)))
    have = hf_energy(img)
    if have >= target:
        return img
    # Smooth random blotches: bicubic upsampling of coarse noise, biased towards the border.
    coarse = rng.standard_normal((10, 10)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    field = field / (field.std() + 1e-8) + _periphery(size)
    cover = rng.uniform(*CLUTTER_COVER)
    region = np.clip((field - np.quantile(field, 1 - cover)) * 4, 0, 1)
    white = rng.standard_normal(img.shape).astype(np.float32)
    white = 0.75 * _grey(white)[..., None] * math.sqrt(3) + 0.25 * white  # mostly luminance
    grain = white - ndimage.gaussian_filter(white, (1.2, 1.2, 0), truncate=3.0)  # band-pass with the 2x2..3px
    grain = ndimage.gaussian_filter(grain, (0.5, 0.5, 0), truncate=3.0)        # band of the spoof patterns
    grain *= region[..., None]
    return img + math.sqrt((target - have) / max(hf_energy(grain), 1e-12)) * grain


def presentation_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global changes drawn identically for live and spoof so they carry no label information."""
    grey = _grey(img)[..., None]
    img = grey + rng.uniform(0.4, 1.4) * (img - grey)
    img = (img - 0.5) * rng.uniform(0.75, 1.25) + 0.5 + rng.uniform(-0.1, 0.1)
    img = img * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    sigma = rng.uniform(0.0, 1.0)
    blurred = ndimage.gaussian_filter(img, (sigma, sigma, 0)) if sigma > 0.05 else img
    amount = rng.uniform(-1.0, 1.5)  # <0 blur, >0 unsharp-mask sharpening
    img = img + amount * (img - blurred) if amount > 0 else blurred
    return img


def capture(img: np.ndarray, domain: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """The domain's camera: lighting, colour cast, tone curve, capture resolution, sensor noise; uint8 RGB."""
    size = img.shape[0]
    yy, xx = _grid(size)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * math.cos(ang) + yy * math.sin(ang)) / size - 0.5) * 2 * rng.uniform(0, domain["gradient"])
    img = img * (1 + ramp)[..., None]
    img = (img - 0.5) * rng.uniform(*domain["contrast"]) + 0.5
    cast = (np.asarray(domain["cast"]) * rng.uniform(0.96, 1.04, 3)).astype(np.float32)
    img = img * rng.uniform(*domain["brightness"]) * cast
    img = np.clip(img, 0, 1) ** rng.uniform(*domain["gamma"])
    small = max(8, int(round(size * rng.uniform(*domain["resolution"]))))
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if small < size:
        pil = pil.resize((small, small), Image.BILINEAR, reducing_gap=None)
    low = np.asarray(pil, dtype=np.float32) / 255.0
    low = low + rng.uniform(*domain["noise"]) * rng.standard_normal(low.shape).astype(np.float32)
    pil = Image.fromarray((np.clip(low, 0, 1) * 255 + 0.5).astype(np.uint8))
    if small < size:
        pil = pil.resize((size, size), Image.BICUBIC)
    return np.asarray(pil)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


# -- samples --------------------------------------------------------------------------------------
def _video_params(seed: int, domain_idx: int, video: int) -> dict[str, Any]:
    """Everything shared by the frames of one video: subject, attack, attack and presentation params."""
    rng = np.random.default_rng([seed, domain_idx, video, 0])
    attack = ATTACK_CYCLE[video % len(ATTACK_CYCLE)]
    return {
        "attack": attack,
        "subject": int(rng.integers(NUM_SUBJECTS)),
        "params": attack_params(attack, rng) if attack != "none" else {},
        "pose": {"angle": rng.uniform(-0.15, 0.15), "scale": rng.uniform(0.95, 1.2),
                 "dy": rng.uniform(-0.05, 0.05), "dx": rng.uniform(-0.05, 0.05), "flip": bool(rng.random() < 0.5)},
    }


def make_sample(seed: int, domain: str, index: int, image_size: int = 128,
                frames_per_video: int = 2) -> tuple[str, bytes, dict[str, Any]]:
    """Render sample ``index`` of ``domain``: returns (key, jpeg bytes, metadata)."""
    domain_idx = ALL_DOMAINS.index(domain)
    video, frame = divmod(index, frames_per_video)
    vp = _video_params(seed, domain_idx, video)
    rng = np.random.default_rng([seed, domain_idx, video, 1 + frame])
    pose = dict(vp["pose"])  # small frame-to-frame head motion
    pose.update(angle=pose["angle"] + rng.uniform(-0.03, 0.03), dy=pose["dy"] + rng.uniform(-0.01, 0.01),
                dx=pose["dx"] + rng.uniform(-0.01, 0.01))
    scene, lm = render_live(face_sources()[vp["subject"]], image_size, rng, pose)
    attack = vp["attack"]
    if attack == "none":
        img, cues = scene, list(BASE_CUES["none"])
    else:
        img, cues = RENDERERS[attack](scene, rng, vp["params"], lm)
        img = match_stats(img, scene)
    img = presentation_jitter(equalise_hf(img, rng), rng)
    dom = DOMAINS[domain]
    rgb = capture(img, dom, rng)
    jpg = encode_jpeg(rgb, int(rng.integers(dom["jpeg"][0], dom["jpeg"][1] + 1)))

    template = CAPTIONS[attack][int(rng.integers(len(CAPTIONS[attack])))]
    extras = [REPLAY_EXTRAS[c] for c in ("glare", "bezel") if c in cues]
    caption = template.format(extra=extras[0] if extras else "")  # templates without {extra} stay as they are
    subject = f"s{vp['subject']:03d}"
    meta = {
        "label": "live" if attack == "none" else "spoof",
        "attack": attack,
        "dataset": domain,
        "domain": domain,
        "subject": subject,
        "video": f"{subject}_{attack}_{video}",
        "frame": frame,
        "caption": caption,
        "caption_source": "template",
        "cues": cues,
        # Subject-disjoint validation split inside each domain (for threshold selection).
        "split": "val" if vp["subject"] % 5 == 4 else "train",
    }
    return f"{domain}-{index:06d}", jpg, meta


def generate_domain(out_dir: str | os.PathLike, domain: str, num_samples: int, *, seed: int = 0, image_size: int = 128,
                    samples_per_shard: int = 500, frames_per_video: int = 2, overwrite: bool = False,
                    workers: int = 1) -> Path:
    """Write one domain's shard set into ``out_dir`` (with its manifest); return the directory.

    ``workers`` > 1 renders in that many processes; the output is byte-identical either way.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {ALL_DOMAINS}")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    extra = {"generator": {"name": "shards.synth", "version": GENERATOR_VERSION, "seed": seed, "domain": domain,
                           "domain_params": DOMAINS[domain], "image_size": image_size,
                           "frames_per_video": frames_per_video, "attack_cycle": ATTACK_CYCLE,
                           "hf_target": HF_TARGET, "clutter_cover": CLUTTER_COVER}}
    render = functools.partial(make_sample, seed, domain, image_size=image_size, frames_per_video=frames_per_video)
    t0 = time.perf_counter()
    with ShardWriter(out_dir, name=domain, max_samples=samples_per_shard, extra=extra, overwrite=overwrite) as w:
        if workers > 1:
            # spawn, not fork: the caller may hold torch/OpenMP threads that a forked child inherits badly.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for sample in pool.map(render, range(num_samples), chunksize=32):
                    w.write(*sample)
        else:
            for i in range(num_samples):
                w.write(*render(i))
    log.info("%s: %d samples in %.1fs", domain, num_samples, time.perf_counter() - t0)
    return Path(out_dir)


def generate_demo(out_dir: str | os.PathLike, samples_per_domain: int = 1000, seed: int = 0, image_size: int = 128,
                  domains: Sequence[str] = ALL_DOMAINS, samples_per_shard: int = 500, frames_per_video: int = 2,
                  overwrite: bool = False, workers: int = 1) -> list[Path]:
    """Write ``out_dir/<domain>/`` shard sets, one per domain; return their directories in order.

    The demo protocol trains on all but the last domain and tests on the last one.
    """
    return [
        generate_domain(Path(out_dir) / d, d, samples_per_domain, seed=seed, image_size=image_size,
                        samples_per_shard=samples_per_shard, frames_per_video=frames_per_video,
                        overwrite=overwrite, workers=workers)
        for d in domains
    ]


# -- self-checks: global-statistics baseline and learnability ----------------------------------
def global_stats(rgb: np.ndarray) -> np.ndarray:
    """Per-channel mean/std, mean saturation, Laplacian variance, high-frequency energy ratio."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    grey = x.mean(-1)
    lap = ndimage.laplace(grey)
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    f = np.fft.fftfreq(grey.shape[0])
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    hf = power[radius > 0.25].sum() / max(power.sum(), 1e-12)
    return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [sat.mean(), lap.var(), hf]]).astype(np.float64)


def hter_at_eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """HTER = (APCER + BPCER) / 2 at the EER threshold of this set. labels: 1 = live; scores: higher = live."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # keep every threshold
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fpr - fnr)))
    return float((fpr[i] + fnr[i]) / 2)


def load_arrays(shard_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, H, W, 3 uint8) and live labels (N,) of a shard set, read with webdataset."""
    import webdataset as wds

    from shards.manifest import shard_paths

    ds = wds.WebDataset(shard_paths(shard_dir), shardshuffle=False, empty_check=False)
    ds = ds.decode("rgb8").to_tuple("jpg", "json")
    images, labels = [], []
    for img, meta in ds:
        images.append(img)
        labels.append(1 if meta["label"] == "live" else 0)
    return np.stack(images), np.asarray(labels)


def local_texture_stats(rgb: np.ndarray, patch: int = 16) -> np.ndarray:
    """Positive control: log of the median (over patches) normalised power spectrum of grey patches.

    The spectrum's shape, not its energy, per ViT-sized patch; the median ignores the clutter
    blotches. A linear model on this transfers across domains, showing the labels live in local
    texture rather than in global statistics.
    """
    grey = rgb.astype(np.float32).mean(-1) / 255.0
    n = grey.shape[0] // patch
    p = grey[: n * patch, : n * patch].reshape(n, patch, n, patch).transpose(0, 2, 1, 3).reshape(-1, patch, patch)
    power = np.abs(np.fft.rfft2(p - p.mean((1, 2), keepdims=True))) ** 2
    power /= power.sum((1, 2), keepdims=True) + 1e-9
    return np.log(np.median(power, 0).ravel() + 1e-6).astype(np.float64)


def leave_one_domain_out_hter(data: dict[str, tuple[np.ndarray, np.ndarray]],
                              featurize: Callable[[np.ndarray], np.ndarray] = global_stats,
                              c: float = 1.0) -> dict[str, float]:
    """HTER on each held-out domain of a standardised logistic regression fit on the others."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = {d: np.stack([featurize(im) for im in imgs]) for d, (imgs, _) in data.items()}
    result = {}
    for held in data:
        train = [d for d in data if d != held]
        x = np.concatenate([feats[d] for d in train])
        y = np.concatenate([data[d][1] for d in train])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, y)
        result[held] = hter_at_eer(data[held][1], clf.predict_proba(feats[held])[:, 1])
    return result


def global_stats_hter(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Leave-one-domain-out HTER of a logistic regression on :func:`global_stats`."""
    return leave_one_domain_out_hter(data, global_stats)


def _tiny_vit(image_size: int, patch: int = 16, dim: int = 96, depth: int = 4, heads: int = 4):
    import torch
    from torch import nn

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            n = (image_size // patch) ** 2
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.blocks(t))[:, 0]).squeeze(-1)

    return TinyViT()


def learnability_hter(train: Sequence[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray],
                      budget_s: float = 180.0, batch_size: int = 32, lr: float = 3e-4,
                      seed: int = 0) -> tuple[float, int]:
    """Train a tiny ViT (patch 16) from scratch for ``budget_s`` seconds; return (test HTER, steps)."""
    import torch

    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([t[0] for t in train])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.concatenate([t[1] for t in train])).float()
    xt = torch.from_numpy(test[0]).permute(0, 3, 1, 2).contiguous()
    model = _tiny_vit(x.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)  # 1e-3 stalls at chance
    gen = torch.Generator().manual_seed(seed)

    def prep(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255.0 - 0.5) / 0.25

    t0, step = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - t0 < budget_s:
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        xb = prep(x[idx])
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log.info("step %d loss %.3f (%.0fs)", step, loss.item(), time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(prep(xt[i:i + 256])) for i in range(0, len(xt), 256)]).numpy()
    return hter_at_eer(test[1], scores), step


def main(argv: Sequence[str] | None = None) -> None:
    """Self-check: generate data, report leave-one-out global-stats HTER and tiny-ViT HTER."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/ifas_synth_check")
    ap.add_argument("--samples-per-domain", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--held-out", default=ALL_DOMAINS[-1])
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    setup_logging()
    dirs = generate_demo(args.out, args.samples_per_domain, seed=args.seed, overwrite=True, workers=args.workers)
    data = {d.name: load_arrays(d) for d in dirs}
    lr = global_stats_hter(data)
    log.info("global-stats LR leave-one-out HTER: %s (mean %.3f)", {k: round(v, 3) for k, v in lr.items()},
             float(np.mean(list(lr.values()))))
    local = leave_one_domain_out_hter(data, local_texture_stats, c=0.1)
    log.info("local-texture LR leave-one-out HTER: %s", {k: round(v, 3) for k, v in local.items()})
    if not args.skip_vit:
        hter, steps = learnability_hter([v for k, v in data.items() if k != args.held_out], data[args.held_out],
                                        budget_s=args.budget_s, seed=args.seed)
        log.info("tiny ViT held-out %s HTER: %.3f after %d steps", args.held_out, hter, steps)


if __name__ == "__main__":
    main()
