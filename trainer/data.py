"""The pieces of the data pipeline around the stream (trainer/stream.py): resolving shard sets,
decoding a sample (bad ones raise BadSample, which the stream counts and skips), the image
transform, padding samples into batches and the DataLoader that carries them from the readers.

Pipeline: shard sets -> stream (split by rank and worker, shuffled, resumable) -> decode -> image
transform -> prompt/labels -> padded batches. Bad samples (unreadable shard, corrupt tar, missing
member, bad json, undecodable image) are skipped and counted once each, never fatal.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from shards.manifest import MANIFEST_NAME, ManifestError, shard_paths
from shards.schema import is_live, validate_meta
from trainer.model.prompt import EncodedSample

if TYPE_CHECKING:
    from trainer.stream import ShardStream

log = logging.getLogger(__name__)

class ShardSetError(ValueError):
    """A shard set is missing or empty; the message names it and the fix."""


# ----- resolving shard sets -----

def resolve_shards(specs: list[str], what: str = "data.train_shards") -> list[str]:
    """Expand shard-set specs (a directory with manifest.json or *.tar, a glob, a brace pattern or
    a file) into a sorted list of tar paths; refuse missing or empty sets with a clear error."""
    if not specs:
        raise ShardSetError(f"{what} is empty: give at least one shard set (a directory of .tar shards, a glob "
                            f"or a brace pattern); the demo makes them with `ifas-shards synth`")
    urls: list[str] = []
    for spec in specs:
        found = _resolve_one(spec, what)
        if not found:
            raise ShardSetError(f"{what}: shard set {spec!r} holds no .tar shards; rebuild it (ifas-shards) or "
                                "fix the path")
        urls.extend(found)
    return urls


def _resolve_one(spec: str, what: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            try:
                files = shard_paths(path)
            except (ManifestError, ValueError, KeyError) as exc:
                raise ShardSetError(f"{what}: {exc}; rebuild the shard set") from exc
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise ShardSetError(f"{what}: {path / MANIFEST_NAME} lists {missing[0]} which does not exist; "
                                    f"rebuild the shard set")
            return files
        return sorted(str(p) for p in path.glob("*.tar"))
    if any(c in spec for c in "{}"):
        files = list(braceexpand.braceexpand(spec))
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ShardSetError(f"{what}: shard {missing[0]} (from {spec!r}) does not exist")
        return files
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    if path.is_file():
        return [str(path)]
    raise ShardSetError(f"{what}: shard set {spec!r} does not exist (no such file or directory)")


# ----- images -----

class ImageTransform:
    """PIL image -> normalised float tensor [3, S, S] for the vision encoder."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


# ----- samples -----

SKIP_REASONS = ("unreadable_shard", "corrupt_tar", "missing_member", "bad_json", "bad_image")


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_sample(raw: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one raw webdataset sample into (image, validated metadata); raise BadSample."""
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    image_bytes = raw.get("jpg", raw.get("jpeg", raw.get("png")))
    if image_bytes is None or "json" not in raw:
        raise BadSample("missing_member", f"sample {key} in {url}: needs an image (.jpg) and a .json member")
    try:
        meta = validate_meta(json.loads(raw["json"]), key)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError and SchemaError are ValueErrors
        raise BadSample("bad_json", f"sample {key} in {url}: {exc}") from exc
    try:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for garbage bytes
        raise BadSample("bad_image", f"sample {key} in {url}: undecodable image ({exc})") from exc
    return image, meta


def sample_tensors(enc: EncodedSample, pixels: torch.Tensor, meta: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
        "score_position": enc.score_position, "pixel_values": pixels,
        "live": int(is_live(meta)), "key": key, "meta": meta,
    }


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad token lists into tensors; keep keys/metadata as lists."""
    from trainer.model.loss import IGNORE_INDEX, UNSUPERVISED

    length = max(len(s["input_ids"]) for s in samples)

    def pad(name: str, value: int) -> torch.Tensor:
        return torch.tensor([s[name] + [value] * (length - len(s[name])) for s in samples], dtype=torch.long)

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"]))
                                        for s in samples], dtype=torch.long),
        "labels": pad("labels", IGNORE_INDEX),
        "label_groups": pad("label_groups", UNSUPERVISED),
        "score_positions": torch.tensor([s["score_position"] for s in samples], dtype=torch.long),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "live": torch.tensor([s["live"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if "stream_pos" in samples[-1]:  # training streams: where the producing reader stands
        batch["stream_pos"] = samples[-1]["stream_pos"]
    return batch


# Worker -> training process: every tensor crosses as its own shared-memory handle, and receiving
# one costs a socket handshake (~0.4 ms, measured). The six integer tensors travel as one.
_TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "label_groups")  # [B, S] each
_SAMPLE_FIELDS = ("score_positions", "live")  # [B] each


def _collate_packed(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    batch = collate(samples, pad_id)
    b, s = batch["input_ids"].shape
    batch["packed_ints"] = torch.cat([torch.stack([batch.pop(k) for k in _TOKEN_FIELDS]).view(-1),
                                      torch.stack([batch.pop(k) for k in _SAMPLE_FIELDS]).view(-1)])
    batch["packed_shape"] = (b, s)
    return batch


def _unpack(batch: dict[str, Any]) -> dict[str, Any]:
    ints = batch.pop("packed_ints")
    b, s = batch.pop("packed_shape")
    batch.update(zip(_TOKEN_FIELDS, ints[:4 * b * s].view(4, b, s)))
    batch.update(zip(_SAMPLE_FIELDS, ints[4 * b * s:].view(2, b)))
    return batch


class BatchLoader:
    """The stream's DataLoader, yielding ``collate``'s batches (unpacked after the transfer)."""

    def __init__(self, stream: ShardStream, pad_id: int) -> None:
        # Pinned host memory lets the copy to the GPU overlap compute (model_inputs uses non_blocking).
        self.loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=stream.num_workers,
                                 collate_fn=functools.partial(_collate_packed, pad_id=pad_id), drop_last=stream.train,
                                 pin_memory=torch.cuda.is_available(),
                                 prefetch_factor=4 if stream.num_workers > 0 else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(_unpack, self.loader)


def make_loader(stream: ShardStream, pad_id: int) -> BatchLoader:
    return BatchLoader(stream, pad_id)
