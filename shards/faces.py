"""Face crops: from a dataset's bounding box, else an offline detector, else (if asked) the centre.

The detector is scikit-image's LBP frontal-face cascade (``skimage.data.lbp_frontal_face_cascade_filename``):
its model file ships inside the scikit-image wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

FACE_MODES = ("auto", "detect", "bbox", "center", "full")


@functools.lru_cache(maxsize=1)
def _cascade():
    import skimage.data
    import skimage.feature

    return skimage.feature.Cascade(skimage.data.lbp_frontal_face_cascade_filename())


def detect_face(rgb: np.ndarray, max_side: int = 320) -> tuple[float, float, float, float] | None:
    """Largest frontal face as a normalised (x, y, w, h) box, or None.

    The image is downscaled to ``max_side`` first: the cascade's cost grows with the pixel count
    and FAS faces fill a good part of the frame.
    """
    from skimage.color import rgb2gray

    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = (
        rgb
        if scale == 1.0
        else np.asarray(
            Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        )
    )
    sh, sw = small.shape[:2]
    if min(sh, sw) < 24:
        return None
    dets = _cascade().detect_multi_scale(
        img=rgb2gray(small), scale_factor=1.2, step_ratio=1, min_size=(24, 24), max_size=(sh, sw)
    )
    if not dets:
        return None
    d = max(dets, key=lambda d: d["width"] * d["height"])
    return d["c"] / sw, d["r"] / sh, d["width"] / sw, d["height"] / sh


@dataclass
class FaceCropper:
    """Crop a square face region with a margin and resize it to ``size``.

    mode: ``auto`` (the dataset's box when it has one, else the detector), ``detect`` (always the
    detector), ``bbox`` (dataset box only), ``center`` (central square), ``full`` (whole frame,
    no crop). With ``center_fallback`` a frame without a face gets the centre crop instead of
    being skipped.
    """

    mode: str = "auto"
    margin: float = 0.25
    size: int = 224
    center_fallback: bool = False

    def __post_init__(self) -> None:
        if self.mode not in FACE_MODES:
            raise ValueError(f"face mode {self.mode!r}: choose one of {FACE_MODES}")

    def box(self, rgb: np.ndarray, bbox: Sequence[float] | None) -> tuple[float, float, float, float] | None:
        """Normalised face box for this frame, or None when no face is found."""
        if self.mode == "center":
            return None
        if bbox is not None and self.mode in ("auto", "bbox"):
            return tuple(bbox)  # type: ignore[return-value]
        if self.mode in ("auto", "detect"):
            return detect_face(rgb)
        return None

    def crop(self, rgb: np.ndarray, bbox: Sequence[float] | None = None) -> np.ndarray | None:
        """The face crop (size x size RGB), or None: no face (the build counts ``no_face``)."""
        h, w = rgb.shape[:2]
        if self.mode == "full":
            return np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.BICUBIC))
        box = self.box(rgb, bbox)
        if box is None:
            if self.mode != "center" and not self.center_fallback:
                return None
            side = min(h, w)
            cx, cy, half = w / 2, h / 2, side / 2
        else:
            x, y, bw, bh = box[0] * w, box[1] * h, box[2] * w, box[3] * h
            if bw <= 1 or bh <= 1:
                return None
            cx, cy = x + bw / 2, y + bh / 2
            half = max(bw, bh) * (1 + 2 * self.margin) / 2
        # Square crop; regions outside the frame are filled by edge padding (PIL crop pads black).
        left, top, right, bottom = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        crop = Image.fromarray(rgb).crop((left, top, right, bottom))
        return np.asarray(crop.resize((self.size, self.size), Image.BICUBIC))
