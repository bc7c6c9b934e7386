"""Train-time image augmentation for cross-domain face anti-spoofing (``data.augment``).

Cross-domain FAS fails on what differs between capture setups rather than between live faces
and attacks: framing, colour cast and white balance, exposure, resolution, focus and JPEG
compression. Each training image therefore gets, in this order (the order a capture pipeline
applies them): a random resized crop, a horizontal flip, brightness/contrast/saturation jitter
with a per-channel colour cast, down-up resampling, a Gaussian blur and a JPEG re-encode at a
random quality. Strengths and probabilities come from AugmentConfig (trainer/config.py).

Determinism: every draw comes from the numpy Generator the stream passes in, seeded by (run seed,
reader slot, the reader's sample position), so a resumed run augments each sample exactly as the
unbroken run did. Evaluation streams never augment.

Why PIL and not torchvision.transforms.v2: PIL already decodes the shards and has every op needed
(ImageEnhance, GaussianBlur, the JPEG codec); torchvision would be one more pinned wheel tied to the
exact torch build (also on GPU machines), and its transforms draw from torch's global RNG, which a
per-sample deterministic stream would have to reseed around every call.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from trainer.config import AugmentConfig


class Augment:
    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        c = self.cfg
        image = image.convert("RGB")
        if c.crop_scale < 1.0:
            image = self._resized_crop(image, rng)
        if rng.random() < c.flip:
            image = ImageOps.mirror(image)
        if c.color > 0:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(float(rng.uniform(1 - c.color, 1 + c.color)))
            gains = rng.uniform(1 - c.color / 2, 1 + c.color / 2, size=3)  # colour cast: per-channel gain
            pixels = np.asarray(image, dtype=np.float32) * gains
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if rng.random() < c.resample:
            w, h = image.size
            factor = float(rng.uniform(2.0, 4.0))
            small = image.resize((max(8, round(w / factor)), max(8, round(h / factor))), Image.BILINEAR)
            image = small.resize((w, h), Image.BILINEAR)
        if rng.random() < c.blur:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
        if rng.random() < c.jpeg:
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=int(rng.integers(c.jpeg_quality_min, 96)))
            image = Image.open(io.BytesIO(buf.getvalue()))
            image.load()
        return image

    def _resized_crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A crop of ``crop_scale``..1 of the area with aspect ratio 3/4..4/3 (the resize to the
        model's input size follows in ImageTransform)."""
        w, h = image.size
        area = w * h * float(rng.uniform(self.cfg.crop_scale, 1.0))
        ratio = math.exp(float(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        x = int(rng.integers(0, w - cw + 1))
        y = int(rng.integers(0, h - ch + 1))
        return image.crop((x, y, x + cw, y + ch))
