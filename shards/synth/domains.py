"""The four capture domains of the synthetic generator, the capture pipeline, and the samples and shard sets.

- Global statistics are kept from being a shortcut: a spoof's per-channel mean/std is matched back to
  its live scene, every sample's fine-detail energy is topped up to a label-independent random
  level with clutter texture in a few blotches (``equalise_hf``), and every sample, live or
  spoof, gets the same random presentation jitter (saturation, contrast, blur/sharpening).
- Domains model what differs between real datasets (camera colour cast, sensor noise, JPEG
  quality, capture resolution, lighting) and are applied AFTER the attack, as the camera captures
  the print/screen/mask.
- Every sample is drawn from its own ``numpy`` Generator seeded by (seed, domain, video, frame),
  so the output does not depend on generation order and the same seed gives byte-identical shards.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from shards.captions import CAPTIONS
from shards.synth.attacks import BASE_CUES, RENDERERS, attack_params
from shards.synth.faces import NUM_SUBJECTS, face_sources, render_live
from shards.synth.pixels import channel_mean, pixel_grid
from shards.writer import ShardWriter

log = logging.getLogger("shards.synth")  # the package's logger, as before the split into modules

GENERATOR_VERSION = 1
ATTACK_CYCLE = ("none", "print", "none", "replay", "none", "mask")  # per video: 50% live, spoofs even
HF_TARGET = (8e-4, 5e-3)  # range of fine-detail energy every sample is topped up to (see equalise_hf)
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

# -- captions ---------------------------------------------------------------------------------
REPLAY_EXTRAS = {
    "glare": " and a bright reflection sits on the glass",
    "bezel": " and the dark display bezel is visible",
}


# -- presentation jitter and capture ----------------------------------------------------------
def match_stats(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Give ``img`` the per-channel mean and std of ``ref`` (spoofs keep the live scene's global look)."""
    def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        planes = np.ascontiguousarray(x.transpose(2, 0, 1)).reshape(3, -1)  # fast reductions
        return planes.mean(1), planes.std(1)

    (m, s), (rm, rs) = channel_stats(img), channel_stats(ref)
    return (img - m) / (s + 1e-6) * rs + rm


def hf_energy(img: np.ndarray) -> float:
    """Mean squared fine detail of the grey image (what Laplacian variance / HF ratio measure)."""
    grey = channel_mean(img)
    return float(np.mean((grey - ndimage.gaussian_filter(grey, 1.0)) ** 2))


@functools.lru_cache(maxsize=4)
def _periphery(size: int) -> np.ndarray:
    yy, xx = pixel_grid(size)
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
    white = 0.75 * channel_mean(white)[..., None] * math.sqrt(3) + 0.25 * white  # mostly luminance
    grain = white - ndimage.gaussian_filter(white, (1.2, 1.2, 0), truncate=3.0)  # band-pass with the 2x2..3px
    grain = ndimage.gaussian_filter(grain, (0.5, 0.5, 0), truncate=3.0)        # band of the spoof patterns
    grain *= region[..., None]
    return img + math.sqrt((target - have) / max(hf_energy(grain), 1e-12)) * grain


def presentation_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global changes drawn identically for live and spoof so they carry no label information."""
    grey = channel_mean(img)[..., None]
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
    yy, xx = pixel_grid(size)
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
