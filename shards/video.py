"""Read images and sample frames from videos (OpenCV), as RGB uint8 arrays.

Why evenly spaced frames: consecutive frames of a FAS video are near duplicates; N frames spread
over the whole clip cover head motion and lighting changes at a fixed cost per video.
"""
from __future__ import annotations

import os
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
    """Decode an image file to RGB uint8 as a person sees it (``shards.io.open_image``: EXIF orientation,
    16-bit grey, alpha on white)."""
    from shards.io import open_image

    try:
        return np.asarray(open_image(path))
    except Exception as e:  # PIL raises many types on corrupt files
        raise MediaError("unreadable_image", f"{path}: image does not decode ({type(e).__name__}: {e})") from e


# Containers whose frame count comes from an index of every frame (nearly exact); others (mkv, wmv)
# estimate it from the duration, so a clip decoding fewer frames gets more slack there.
INDEXED_VIDEO_EXTS = (".avi", ".mov", ".mp4", ".m4v", ".3gp")


def container_shortfall(path: str | Path) -> str | None:
    """Why the file is shorter than its own container says (None if it is not, or the format is
    not one that records sizes). AVI: each RIFF chunk states its size; MP4/MOV: each top-level
    box does. A cut inside the last frame still decodes (half grey) and passes every frame-count
    check, so the sizes are the only reliable sign."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] == b"RIFF":  # AVI; OpenDML files > 1 GB continue with RIFF AVIX chunks
            pos = 0
            while pos + 8 <= size:
                f.seek(pos)
                tag, length = f.read(4), int.from_bytes(f.read(4), "little")
                if tag != b"RIFF":
                    break
                pos += 8 + length + (length & 1)
            return f"RIFF chunks need {pos} bytes, the file has {size}" if pos > size else None
        if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):  # ISO media / QuickTime
            pos = 0
            while pos + 8 <= size:
                f.seek(pos)
                length = int.from_bytes(f.read(4), "big")
                f.read(4)
                if length == 1:  # a 64-bit size follows the type
                    length = int.from_bytes(f.read(8), "big")
                elif length == 0:  # the box runs to the end of the file
                    return None
                if length < 8:
                    return f"box at byte {pos} has an impossible size {length}"
                pos += length
            return f"boxes need {pos} bytes, the file has {size}" if pos > size else None
    return None


def read_video_frames(path: str | Path, n: int, first: int = 0) -> list[tuple[int, np.ndarray]]:
    """Return ``[(frame_index, rgb), ...]`` for ``n`` evenly spaced frames of a video, or with ``first``
    of its first ``first`` frames (protocols that train on the start of each clip: SiW protocol 1).
    The whole clip is still checked for truncation.

    Seeks by index when the container reports a frame count (and checks that its last frame
    decodes); otherwise, or when seeking or that check fails, decodes the whole clip once and picks
    from it. A clip that decodes fewer frames than its container reports is truncated: its last
    decoded frame is typically half garbage, so the whole video is refused (``truncated_video``).
    """
    import cv2

    def read_at(idx: int) -> np.ndarray | None:
        if not cap.set(cv2.CAP_PROP_POS_FRAMES, idx):
            return None
        ok, frame = cap.read()
        return frame if ok and frame is not None else None

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError("unreadable_video", f"{path}: OpenCV cannot open the video")
        short = container_shortfall(path)
        if short:
            raise MediaError("truncated_video", f"{path}: cut off ({short}); re-copy or re-download it")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        out: list[tuple[int, np.ndarray]] = []
        if total > 0:
            wanted = frame_indices(min(total, first) if first > 0 else total, n)
            for idx in wanted:
                frame = read_at(idx)
                if frame is None:
                    out = []
                    break
                out.append((idx, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
            if out and wanted[-1] != total - 1 and read_at(total - 1) is None:
                out = []  # the end does not decode: count what does, below
        if not out:  # unknown length, broken seeking or a damaged end: decode sequentially
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            frames = []
            while True:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                frames.append(frame)
            # Indexed containers can still overstate a little (edit lists, dropped frames); a cut file
            # is caught by its sizes above, so the count only has to catch a clip that stops early.
            slack = 2 if Path(path).suffix.lower() in INDEXED_VIDEO_EXTS else max(2, total // 50)
            if total > 0 and frames and len(frames) < total - slack:
                raise MediaError("truncated_video", f"{path}: the container reports {total} frames but only "
                                 f"{len(frames)} decode (a cut-off or damaged file); re-copy or re-download it")
            span = min(len(frames), first) if first > 0 else len(frames)
            out = [(i, cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)) for i in frame_indices(span, n)]
        if not out:
            raise MediaError("unreadable_video", f"{path}: no decodable frames")
        return out
    finally:
        cap.release()
