"""Face locations the releases ship beside their videos, read as per-frame pixel boxes (x, y, w, h).

Formats (docs/datasets.md, "Face locations"); frame numbers are the decoded frame index (0-based):
- ``oulu_eyes``: OULU-NPU ``<video>.txt``, lines ``frame, x1, y1, x2, y2``, the two eye centres. The
  face box is a square of ``EYE_BOX_SIDE`` times the eye distance, centred ``EYE_BOX_DROP`` eye distances
  below the eyes' midpoint (about the box the bundled detector draws around a frontal face).
- ``frame_xywh``: Replay-Attack ``<video>.face`` lines ``frame x y w h``.
- ``line_xyxy``: SiW ``<video>.face``, one line ``x1 y1 x2 y2`` per frame (line i is frame i).
A row whose box is empty (zeros, a face the annotator did not find) is left out: that frame falls back
to the detector.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

Box = tuple[float, float, float, float]  # pixels: x, y, w, h
FORMATS = ("oulu_eyes", "frame_xywh", "line_xyxy")
EYE_BOX_SIDE = 2.5
EYE_BOX_DROP = 0.25


class FaceFileError(ValueError):
    """A face-location file that cannot be read as its format (the message names the file and line)."""


def _numbers(path: Path, line_no: int, line: str, count: int) -> list[float]:
    values = [v for v in re.split(r"[,\s]+", line.strip()) if v]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) < count:
        raise FaceFileError(f"{path}:{line_no}: expected {count} numbers, got {line.strip()!r}")
    return numbers[:count]


def eyes_to_box(x1: float, y1: float, x2: float, y2: float) -> Box | None:
    """The square face box around two eye centres (None when they coincide)."""
    d = math.hypot(x2 - x1, y2 - y1)
    if d < 1:
        return None
    side = EYE_BOX_SIDE * d
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + EYE_BOX_DROP * d
    return cx - side / 2, cy - side / 2, side, side


def read_face_file(path: Path, fmt: str) -> dict[int, Box]:
    """{frame index: pixel box} of one release face-location file; FaceFileError on a malformed line."""
    boxes: dict[int, Box] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        box: Box | None
        if fmt == "oulu_eyes":
            frame, x1, y1, x2, y2 = _numbers(path, line_no, line, 5)
            box = eyes_to_box(x1, y1, x2, y2)
        elif fmt == "frame_xywh":
            frame, x, y, w, h = _numbers(path, line_no, line, 5)
            box = (x, y, w, h) if w > 1 and h > 1 else None
        elif fmt == "line_xyxy":
            x1, y1, x2, y2 = _numbers(path, line_no, line, 4)
            frame = line_no - 1
            box = (x1, y1, x2 - x1, y2 - y1) if x2 - x1 > 1 and y2 - y1 > 1 else None
        else:
            raise ValueError(f"face-location format {fmt!r}: choose one of {FORMATS}")
        if box is not None:
            boxes[int(frame)] = box
    return boxes


def normalised(box: Box, width: int, height: int) -> Box:
    """A pixel box as fractions of the frame (the crop rule's input, shards.faces.FaceCropper)."""
    x, y, w, h = box
    return x / width, y / height, w / width, h / height
