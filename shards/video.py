"""Read images and sample frames from videos (OpenCV), as RGB uint8 arrays.

Why evenly spaced frames: consecutive frames of a FAS video are near duplicates; N frames spread
over the whole clip cover head motion and lighting changes at a fixed cost per video.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_EXTS = (".avi", ".mov", ".mp4", ".mkv", ".m4v", ".wmv", ".3gp")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class MediaError(ValueError):
    """An image or video could not be decoded (the build skips it and counts the reason)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def frame_indices(num_frames: int, n: int) -> list[int]:
    """``n`` evenly spaced frame indices (segment centres) of a ``num_frames`` clip; all if shorter."""
    if num_frames <= 0 or n <= 0:
        return []
    if n >= num_frames:
        return list(range(num_frames))
    return [min(num_frames - 1, int((i + 0.5) * num_frames / n)) for i in range(n)]


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (PIL first: it reads more formats than cv2's imread)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types on corrupt files
        raise MediaError("unreadable_image", f"{path}: image does not decode ({type(e).__name__}: {e})") from e


def read_video_frames(path: str | Path, n: int) -> list[tuple[int, np.ndarray]]:
    """Return ``[(frame_index, rgb), ...]`` for ``n`` evenly spaced frames of a video.

    Seeks by index when the container reports a frame count; otherwise (or when seeking fails)
    decodes the whole clip once and picks from it.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError("unreadable_video", f"{path}: OpenCV cannot open the video")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        out: list[tuple[int, np.ndarray]] = []
        if total > 0:
            for idx in frame_indices(total, n):
                if not cap.set(cv2.CAP_PROP_POS_FRAMES, idx):
                    out = []
                    break
                ok, frame = cap.read()
                if not ok or frame is None:
                    out = []
                    break
                out.append((idx, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        if not out:  # unknown length or broken seeking: decode sequentially
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            frames = []
            while True:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                frames.append(frame)
            out = [(i, cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)) for i in frame_indices(len(frames), n)]
        if not out:
            raise MediaError("unreadable_video", f"{path}: no decodable frames")
        return out
    finally:
        cap.release()
