"""Small file helpers the whole project shares: the one image reader (``open_image``), atomic text writes,
sha256 of a file, byte sizes written by people ("256MB", "5GB", "512MiB") and the logging setup of every
command.

Sizes follow the Hugging Face convention (``max_shard_size="5GB"`` is 5 * 10**9 bytes): KB/MB/GB
are powers of ten, KiB/MiB/GiB powers of two, a bare number is bytes.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``123`` -> 123; ValueError otherwise."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


ImageSource = Union[str, os.PathLike, bytes, IO[bytes]]


def open_image(source: ImageSource) -> Image.Image:
    """Decode an image file or encoded bytes to RGB as a person sees it (docs/architecture.md, "Images").

    Every path that reads images (shard building, training, evaluation, prediction, verify) goes
    through here, so they agree:
    - EXIF orientation is applied (a phone photo stored sideways with orientation 6 stands upright);
    - 16-bit and 32-bit grey levels are scaled to 8 bits, not clipped (``convert("RGB")`` clips
      a 16-bit PNG to nearly white);
    - palette and alpha images are composited on white (a transparent background is not black).
    Raises what PIL raises for undecodable data (callers count or report it with the file name).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with Image.open(source) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit PNGs decode as I;16 or I (Pillow version dependent); their range is 0..65535
            grey = np.asarray(im, dtype=np.float64) / 257.0
            im = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")
        elif im.mode == "F":  # float TIFFs: 0..1 when they look normalised, else grey levels
            grey = np.asarray(im, dtype=np.float64)
            grey = grey * 255.0 if grey.max(initial=0.0) <= 1.0 else grey
            im = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")
        if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so a reader sees the old or the new file whole, never part of one (even after a crash)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def umask_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 less the process umask). For files a library writes
    with a private mode: safetensors writes 0600, so on a shared cluster nobody else could read a model."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def setup_logging(level: int | str = logging.INFO, rank: int | None = None, force: bool = False) -> None:
    """The one logging format of every command. With ``rank`` (distributed jobs) lines carry
    ``[rank<r>]`` and ranks other than 0 log warnings and errors only. ``force`` replaces an earlier
    setup (e.g. once the rank is known)."""
    prefix = ""
    if rank is not None:
        prefix = f"[rank{rank}] "
        level = level if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", force=force)
