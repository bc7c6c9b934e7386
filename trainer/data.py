"""Streaming data pipeline: shard sets -> (split by rank and worker) -> shuffle -> decode ->
image transform -> prompt/labels -> padded batches.

The training stream is infinite and deterministic for a seed: every (rank, worker) slot reads
its own shards (or, with fewer shards than slots, every n-th sample), shuffles raw samples in
a seeded buffer, and only then decodes. Training is counted in steps, so every rank takes the
same number of steps whatever the shard counts (no collective ever waits on a rank that ran
out of data). A stream's state (StreamState: batches consumed, raw samples pulled per reader)
is saved in every checkpoint; restoring it replays the raw, undecoded stream up to that point,
so a resumed run sees exactly the batches the unbroken run would have seen. Bad samples
(unreadable shard, corrupt tar, missing member, bad json, undecodable image) are skipped and
counted once each, never fatal.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.captions import template_caption
from shards.manifest import MANIFEST_NAME, ManifestError, shard_paths
from shards.schema import is_live, validate_meta
from trainer.model.prompt import EncodedSample, PromptBuilder

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


def _sample_tensors(enc: EncodedSample, pixels: torch.Tensor, meta: dict[str, Any], key: str) -> dict[str, Any]:
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


# ----- the stream -----

@dataclass
class StreamState:
    """How far one rank's training stream got: batches consumed, and for every reader (DataLoader
    worker) the raw samples it had pulled (after shuffling, before decoding) and the bad samples
    it had skipped. Restoring it replays the raw stream up to there without decoding anything."""

    consumed_batches: int = 0
    raw_consumed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)

    def update(self, batch: dict[str, Any]) -> None:
        reader, raw_pos, skipped = batch["stream_pos"]
        self.consumed_batches += 1
        self.raw_consumed[reader] = raw_pos
        self.skipped[reader] = skipped

    def skipped_total(self) -> Counter:
        total: Counter = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches, "raw_consumed": dict(self.raw_consumed),
                "skipped": {k: dict(v) for k, v in self.skipped.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "StreamState":
        # JSON/pickle round trips may turn int keys into strings.
        return cls(int(state["consumed_batches"]), {int(k): int(v) for k, v in state["raw_consumed"].items()},
                   {int(k): dict(v) for k, v in state.get("skipped", {}).items()})


class _Reader:
    """Raw samples of a list of shards for one reader slot, with bad ones counted.

    Counting happens in the first pass only: in it every shard (or, with a sample-level split,
    every sample) is read by exactly one slot, so the sums over ranks count each bad sample
    once, however often later passes meet it again (the later shard orders differ).
    """

    def __init__(self, skipped: Counter, count_tar_errors: bool) -> None:
        self.skipped = skipped
        self.count_tar_errors = count_tar_errors
        self.counting = True

    def count(self, reason: str, message: str) -> None:
        if self.counting:
            self.skipped[reason] += 1
            log.warning("skipping %s: %s", reason.replace("_", " "), message)

    def raw_samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        failed: set[str] = set()

        def handler(exc: Exception) -> bool:
            # webdataset reports one broken tar twice (reader, then expander): count it per shard.
            shard = next((u for u in urls if u in str(exc)), str(exc))
            if self.count_tar_errors and shard not in failed:
                failed.add(shard)
                unreadable = isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError)
                self.count("unreadable_shard" if unreadable else "corrupt_tar", str(exc))
            return True  # keep going with the next member / shard

        yield from wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                  empty_check=False, handler=handler)


class ShardStream(IterableDataset):
    """Samples of a shard set for one rank, split further across DataLoader workers.

    train=True: infinite, reshuffled every pass, resuming from ``resume`` (a StreamState).
    train=False: one ordered pass over this rank's share (sample i goes to rank i % world_size),
    for evaluation.
    """

    def __init__(self, urls: list[str], builder: PromptBuilder, transform: ImageTransform, *, rank: int,
                 world_size: int, batch_size: int, seed: int = 0, shuffle_buffer: int = 512, train: bool = True,
                 with_answers: bool = True, resume: StreamState | None = None, num_workers: int = 0,
                 caption_source: str = "shards", held_out: tuple[str, frozenset[str]] | None = None) -> None:
        super().__init__()
        # (split, shards): training never sees that split's samples in those shards, which fix the
        # decision threshold instead (eval.dev_shards; docs/architecture.md, "Thresholds").
        self.held_out = held_out
        self.caption_source = caption_source  # shards | template (config.DataConfig.caption_source)
        self.urls, self.builder, self.transform = urls, builder, transform
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle_buffer, self.train = seed, shuffle_buffer, train
        self.with_answers = with_answers
        self.resume = resume or StreamState()
        self.num_workers = num_workers  # DataLoader workers; 0 = read in the training process

    def _slot_raw(self, reader: _Reader, slot: int, slots: int, epoch: int) -> Iterator[dict[str, Any]]:
        order = list(self.urls)
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        if len(order) >= slots and self.train:
            yield from reader.raw_samples(order[slot::slots])
        else:  # fewer shards than slots (or evaluation): every slots-th sample
            for i, raw in enumerate(reader.raw_samples(order)):
                if i % slots == slot:
                    yield raw

    def _shuffled(self, reader: _Reader, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, slot, 1])
            buffer: list[dict[str, Any]] = []
            got_any = False
            for raw in self._slot_raw(reader, slot, slots, epoch):
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
            reader.counting = False

    def _is_held_out(self, raw: dict[str, Any], meta: dict[str, Any]) -> bool:
        if self.held_out is None:
            return False
        split, shards = self.held_out
        return raw.get("__url__") in shards and (not split or meta.get("split") == split)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        readers = max(self.num_workers, 1)
        # The DataLoader takes batches from its workers round-robin, starting with worker 0. To
        # continue the exact batch order after a resume, worker w plays reader (w + consumed) % n.
        reader_id = ((info.id if info is not None else 0) + self.resume.consumed_batches) % readers
        slot, slots = self.rank * readers + reader_id, self.world_size * readers
        sample_split = not self.train or len(self.urls) < slots
        skipped = Counter(self.resume.skipped.get(reader_id, {}))
        # With a sample-level split every slot reads every shard: only slot 0 counts tar errors.
        reader = _Reader(skipped, count_tar_errors=not sample_split or slot == 0)
        raws = self._shuffled(reader, slot, slots) if self.train else self._slot_raw(reader, slot, slots, 0)
        to_skip = self.resume.raw_consumed.get(reader_id, 0)
        for pos, raw in enumerate(raws, start=1):
            if pos <= to_skip:
                continue  # consumed before the checkpoint: replayed, never decoded
            try:
                image, meta = decode_sample(raw)
            except BadSample as exc:
                reader.count(exc.reason, str(exc))
                continue
            if self._is_held_out(raw, meta):
                continue
            if self.with_answers:
                caption = (meta.get("caption", "") if self.caption_source == "shards"
                           else template_caption(meta.get("attack", "none"), raw["__key__"]))
                enc = self.builder.encode(is_live(meta), caption)
            else:
                enc = self.builder.encode_prompt()
            sample = _sample_tensors(enc, self.transform(image), meta, raw["__key__"])
            if self.train:
                sample["stream_pos"] = (reader_id, pos, dict(skipped))
            yield sample


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
