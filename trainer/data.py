"""Streaming data pipeline: shard sets -> (split by rank and worker) -> shuffle -> decode ->
image transform -> prompt/labels -> padded batches.

The training stream is infinite and deterministic for a seed: every (rank, worker) slot reads
its own shards (or, with fewer shards than slots, every n-th sample), shuffles raw samples in
a seeded buffer, and only then decodes. Training is counted in steps, so every rank takes the
same number of steps whatever the shard counts (no collective ever waits on a rank that ran
out of data). A stream's state is the number of batches consumed; restoring it replays the
raw, undecoded stream up to that point, so a resumed run sees exactly the batches the
unbroken run would have seen.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.schema import SchemaError, is_live, validate_meta
from trainer.prompt import EncodedSample, PromptBuilder

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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
            raise ShardSetError(f"{what}: shard set {spec!r} holds no .tar shards; rebuild it (ifas-shards) or fix the path")
        urls.extend(found)
    return urls


def _resolve_one(spec: str, what: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                entries = json.loads(manifest.read_text())["shards"]
            except (ValueError, KeyError) as exc:
                raise ShardSetError(f"{what}: {manifest} is not a valid manifest ({exc}); rebuild the shard set") from exc
            files = [str(path / e["file"]) for e in entries]
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise ShardSetError(f"{what}: {manifest} lists {missing[0]} which does not exist; rebuild the shard set")
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


def manifest_sample_count(specs: list[str]) -> int | None:
    """Total samples according to the manifests, or None when a set has no manifest."""
    total = 0
    for spec in specs:
        manifest = Path(spec) / MANIFEST
        if not manifest.is_file():
            return None
        total += int(json.loads(manifest.read_text())["num_samples"])
    return total


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

@dataclass
class SkipCounter:
    """Samples skipped per reason (corrupt member, bad image, bad json, unreadable shard)."""

    counts: Counter

    def add(self, reason: str) -> None:
        self.counts[reason] += 1


def decode_sample(raw: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one raw webdataset sample into (image, validated metadata); raise on bad input."""
    key = raw.get("__key__", "?")
    image_bytes = raw.get("jpg", raw.get("jpeg", raw.get("png")))
    if image_bytes is None or "json" not in raw:
        raise SchemaError(f"sample {key} in {raw.get('__url__', '?')}: needs an image (.jpg) and a .json member")
    meta = validate_meta(json.loads(raw["json"]), key)
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    return image, meta


def _sample_tensors(enc: EncodedSample, pixels: torch.Tensor, meta: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
        "score_position": enc.score_position, "pixel_values": pixels,
        "live": int(is_live(meta)), "key": key, "meta": meta,
    }


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad token lists into tensors; keep keys/metadata as lists."""
    length = max(len(s["input_ids"]) for s in samples)

    def pad(name: str, value: int) -> torch.Tensor:
        return torch.tensor([s[name] + [value] * (length - len(s[name])) for s in samples], dtype=torch.long)

    from trainer.loss import IGNORE_INDEX, UNSUPERVISED

    return {
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


def _raw_samples(urls: list[str], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of ``urls`` in order; corrupt members/shards are counted, not fatal."""

    def handler(exc: Exception) -> bool:
        skips.add("corrupt_tar")
        log.warning("skipping unreadable tar data: %s", exc)
        return True  # keep going

    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                        handler=handler)
    yield from ds


class ShardStream(IterableDataset):
    """Samples of a shard set for one rank, split further across DataLoader workers.

    train=True: infinite, reshuffled every pass, with ``skip_batches`` already-consumed batches
    replayed without decoding. train=False: one ordered pass over this rank's share (sample i
    goes to rank i % world_size) for evaluation.
    """

    def __init__(self, urls: list[str], builder: PromptBuilder, transform: ImageTransform, *, rank: int,
                 world_size: int, batch_size: int, seed: int = 0, shuffle_buffer: int = 512, train: bool = True,
                 with_answers: bool = True, skip_batches: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.urls, self.builder, self.transform = urls, builder, transform
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle_buffer, self.train = seed, shuffle_buffer, train
        self.with_answers, self.skip_batches = with_answers, skip_batches
        self.num_workers = num_workers  # DataLoader workers; 0 = read in the training process
        self.skips = SkipCounter(Counter())

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * max(self.num_workers, 1) + worker, worker

    def _slot_raw(self, slot: int, slots: int, epoch: int) -> Iterator[dict[str, Any]]:
        order = list(self.urls)
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        if len(order) >= slots and self.train:
            yield from _raw_samples(order[slot::slots], self.skips)
        else:  # fewer shards than slots (or evaluation): every slots-th sample
            for i, raw in enumerate(_raw_samples(order, self.skips)):
                if i % slots == slot:
                    yield raw

    def _shuffled(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, slot, 1])
            buffer: list[dict[str, Any]] = []
            got_any = False
            for raw in self._slot_raw(slot, slots, epoch):
                got_any = True
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], raw = raw, buffer[i]
                yield raw
            rng.shuffle(buffer)
            yield from buffer
            if not got_any:
                raise ShardSetError(f"rank {self.rank} slot {slot}: shards {self.urls[:3]}... yielded no samples")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, worker = self._slot()
        readers = max(self.num_workers, 1)
        slots = self.world_size * readers
        raws = self._shuffled(slot, slots) if self.train else self._slot_raw(slot, slots, 0)
        # Batches are taken from workers round-robin, so this worker produced every
        # readers-th of the consumed batches: skip exactly its share.
        skip = self.skip_batches // readers + (1 if worker < self.skip_batches % readers else 0)
        to_skip = skip * self.batch_size
        for raw in raws:
            try:
                image, meta = decode_sample(raw)
            except Exception as exc:  # noqa: BLE001 - any bad sample is skipped and counted
                self.skips.add("bad_image" if not isinstance(exc, (SchemaError, ValueError)) else "bad_json")
                log.warning("skipping sample %s: %s", raw.get("__key__", "?"), exc)
                continue
            if to_skip > 0:
                to_skip -= 1
                continue
            enc = (self.builder.encode(is_live(meta), meta.get("caption", "")) if self.with_answers
                   else self.builder.encode_prompt())
            yield _sample_tensors(enc, self.transform(image), meta, raw["__key__"])


def make_loader(stream: ShardStream, pad_id: int) -> DataLoader:
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=stream.num_workers,
                      collate_fn=functools.partial(collate, pad_id=pad_id), drop_last=stream.train)
