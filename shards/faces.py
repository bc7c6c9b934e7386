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

FACE_MODES = ("auto", "release", "detect", "bbox", "center", "full")
FACE_SOURCES = ("release", "detector", "center", "full")  # where a crop's box came from (``face_source``)


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

    mode: ``auto`` and ``release`` (the release's face location for the frame when it ships one, else
    the detector; ``release`` is refused up front for a dataset that ships none), ``detect`` (always the
    detector), ``bbox`` (the release's locations only: frames without one are ``no_face``), ``center``
    (central square), ``full`` (whole frame, no crop). With ``center_fallback`` a frame without a face
    gets the centre crop instead of being skipped.
    """

    mode: str = "auto"
    margin: float = 0.25
    size: int = 224
    center_fallback: bool = False

    def __post_init__(self) -> None:
        if self.mode not in FACE_MODES:
            raise ValueError(f"face mode {self.mode!r}: choose one of {FACE_MODES}")

    def box(self, rgb: np.ndarray, release: Sequence[float] | None) -> tuple[tuple[float, ...] | None, str]:
        """(normalised face box or None when no face is found, its source: release or detector)."""
        if release is not None and self.mode in ("auto", "release", "bbox"):
            return tuple(release), "release"
        if self.mode in ("auto", "release", "detect"):
            return detect_face(rgb), "detector"
        return None, "release"

    def crop_with_source(self, rgb: np.ndarray, release: Sequence[float] | None = None
                         ) -> tuple[np.ndarray | None, str]:
        """(the face crop, size x size RGB, or None: no face, which the build counts ``no_face``; the
        source of its box, one of FACE_SOURCES)."""
        h, w = rgb.shape[:2]
        if self.mode == "full":
            return np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.BICUBIC)), "full"
        box, source = (None, "center") if self.mode == "center" else self.box(rgb, release)
        if box is not None and (box[2] * w <= 1 or box[3] * h <= 1):
            box = None
        if box is None:
            if self.mode != "center" and not self.center_fallback:
                return None, source
            side = min(h, w)
            cx, cy, half, source = w / 2, h / 2, side / 2, "center"
        else:
            x, y, bw, bh = box[0] * w, box[1] * h, box[2] * w, box[3] * h
            cx, cy = x + bw / 2, y + bh / 2
            half = max(bw, bh) * (1 + 2 * self.margin) / 2
        # Square crop; regions outside the frame are filled by edge padding (PIL crop pads black).
        left, top, right, bottom = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        crop = Image.fromarray(rgb).crop((left, top, right, bottom))
        return np.asarray(crop.resize((self.size, self.size), Image.BICUBIC)), source

    def crop(self, rgb: np.ndarray, bbox: Sequence[float] | None = None) -> np.ndarray | None:
        """The face crop (size x size RGB), or None: no face."""
        return self.crop_with_source(rgb, bbox)[0]
