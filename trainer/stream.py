"""One rank's sample stream over shard sets, and its exact, bounded-time resume.

Every (rank, DataLoader worker) slot is a reader: in each epoch it reads its own shards (the
epoch's seeded shard order, every n-th shard), or with fewer shards than slots every n-th
sample, shuffles the raw samples in a seeded buffer and only then decodes. Training is counted
in steps, so the stream is infinite.

A reader's position is one number: the raw samples its shuffle has yielded (StreamState). A
resume does not replay them. Shard sizes (manifest counts, corrected by what the readers found in
damaged shards) give each epoch's length, so whole epochs are skipped arithmetically; inside the
current epoch the shuffle is replayed on sample indices only (the same seeded draws, no data), which
says which samples are in the buffer and where reading continues; then only the shards holding
those samples are read. The batches are exactly the unbroken run's (docs/architecture.md, "Resume").
"""
from __future__ import annotations

import bisect
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from shards.captions import template_caption
from shards.manifest import MANIFEST_NAME
from shards.schema import is_live
from trainer.data import BadSample, ImageTransform, ShardSetError, decode_sample, sample_tensors
from trainer.model.prompt import PromptBuilder

log = logging.getLogger(__name__)


@dataclass
class StreamState:
    """How far one rank's training stream got: batches consumed; per reader (DataLoader worker) the
    raw samples its shuffle had yielded and the bad samples it had skipped; and the true sample
    counts of shards that differ from their manifest (damaged tars), learned while reading."""

    consumed_batches: int = 0
    raw_consumed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)
    shard_sizes: dict[str, int] = field(default_factory=dict)

    def update(self, batch: dict[str, Any]) -> None:
        reader, raw_pos, skipped, sizes = batch["stream_pos"]
        self.consumed_batches += 1
        self.raw_consumed[reader] = raw_pos
        self.skipped[reader] = skipped
        self.shard_sizes.update(sizes)

    def skipped_total(self) -> Counter:
        total: Counter = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches, "raw_consumed": dict(self.raw_consumed),
                "skipped": {k: dict(v) for k, v in self.skipped.items()}, "shard_sizes": dict(self.shard_sizes)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "StreamState":
        # JSON/pickle round trips may turn int keys into strings.
        return cls(int(state["consumed_batches"]), {int(k): int(v) for k, v in state["raw_consumed"].items()},
                   {int(k): dict(v) for k, v in state.get("skipped", {}).items()},
                   {str(k): int(v) for k, v in state.get("shard_sizes", {}).items()})


def manifest_sizes(urls: list[str]) -> dict[str, int]:
    """Sample counts of the shards whose directory has a manifest listing them."""
    sizes: dict[str, int] = {}
    for directory in {str(Path(u).parent) for u in urls}:
        path = Path(directory) / MANIFEST_NAME
        if path.is_file():
            try:
                listed = {s["file"]: int(s["num_samples"]) for s in json.loads(path.read_text())["shards"]}
            except (ValueError, KeyError, TypeError):
                continue  # resolve_shards refuses a bad manifest; a glob over its tars still streams
            sizes.update({u: listed[Path(u).name] for u in urls if str(Path(u).parent) == directory
                          and Path(u).name in listed})
    return sizes


def replay_shuffle(rng: np.random.Generator, n: int, buffer_size: int, done: int) -> tuple[list[int], int, bool]:
    """The shuffle buffer of an epoch of ``n`` raw samples after it yielded ``done`` of them, on
    indices only: (buffer contents, next index to read, draining). Draws from ``rng`` exactly what
    the live shuffle (ShardStream._epoch) draws, so it continues with the same state."""
    if n <= buffer_size:
        order = list(range(n))
        rng.shuffle(order)
        return order[done:], n, True
    streamed = min(done, n - buffer_size)
    buffer = list(range(buffer_size))
    for k, slot in enumerate(rng.integers(buffer_size, size=streamed).tolist()):  # = one draw per yield
        buffer[slot] = buffer_size + k
    if done <= n - buffer_size:
        return buffer, buffer_size + done, False
    rng.shuffle(buffer)
    return buffer[done - streamed:], n, True


class _Reader:
    """Raw samples of one shard at a time for one reader slot, with bad shards counted and true
    shard sizes recorded where they differ from the manifest.

    Counting happens in the first pass only: in it every shard (or, with a sample-level split,
    every sample) is read by exactly one slot, so the sums over ranks count each bad sample
    once, however often later passes meet it again (the later shard orders differ).
    """

    def __init__(self, skipped: Counter, count_tar_errors: bool, expected: dict[str, int]) -> None:
        self.skipped = skipped
        self.count_tar_errors = count_tar_errors
        self.counting = True
        self.expected = expected  # shard -> sample count (manifests, corrected)
        self.corrections: dict[str, int] = {}  # what this reader found different; travels in stream_pos

    def count(self, reason: str, message: str) -> None:
        if self.counting:
            self.skipped[reason] += 1
            log.warning("skipping %s: %s", reason.replace("_", " "), message)

    def shard(self, url: str, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard after its first ``skip``."""
        failed = False

        def handler(exc: Exception) -> bool:
            nonlocal failed  # webdataset reports one broken tar twice (reader, then expander): count it once
            if self.count_tar_errors and not failed:
                failed = True
                unreadable = isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError)
                self.count("unreadable_shard" if unreadable else "corrupt_tar", str(exc))
            return True  # keep going with the next member

        n = 0
        for raw in wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                  empty_check=False, handler=handler):
            n += 1
            if n > self.expected.get(url, n):  # more than the manifest says: known from now on
                self.corrections[url] = self.expected[url] = n
            if n > skip:
                yield raw
        if url in self.expected and n != self.expected[url]:
            self.corrections[url] = self.expected[url] = n

    def size(self, url: str) -> int:
        """Samples in a shard: known, else counted by reading it (a shard set without a manifest)."""
        if url not in self.expected:
            counting, self.counting = self.counting, False
            self.expected[url] = sum(1 for _ in self.shard(url))
            self.counting = counting
        return self.expected[url]


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
        self.caption_source = caption_source  # shards | template (config.DataConfig.caption_source)
        # (split, shards): training never sees that split's samples in those shards, which fix the
        # decision threshold instead (eval.dev_shards; docs/architecture.md, "Thresholds").
        self.held_out = held_out
        self.urls, self.builder, self.transform = urls, builder, transform
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle_buffer, self.train = seed, shuffle_buffer, train
        self.with_answers = with_answers
        self.resume = resume or StreamState()
        self.num_workers = num_workers  # DataLoader workers; 0 = read in the training process

    # -- which raw samples a slot reads in an epoch --------------------------------------------
    def _layout(self, epoch: int, slot: int, slots: int) -> tuple[list[str], int, int]:
        """(shards in reading order, stride, phase): the slot's k-th raw sample of the epoch is
        sample ``phase + k * stride`` of those shards concatenated."""
        order = list(self.urls)
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        if len(order) >= slots and self.train:
            return order[slot::slots], 1, 0
        return order, slots, slot  # fewer shards than slots (or evaluation): every slots-th sample

    def _slot_raw(self, reader: _Reader, slot: int, slots: int, epoch: int, start: int = 0) -> Iterator[dict]:
        """The slot's raw samples of an epoch from its ``start``-th on (whole shards before it unread)."""
        shards, stride, phase = self._layout(epoch, slot, slots)
        first, base = phase + start * stride, 0  # global index of the first sample wanted, of the shard
        for url in shards:
            if start and base + reader.size(url) <= first:
                base += reader.size(url)
                continue
            skip = max(0, first - base)
            g = base + skip
            for raw in reader.shard(url, skip):
                if (g - phase) % stride == 0:
                    yield raw
                g += 1
            base += reader.expected.get(url, g - base)  # the shard's true size, now that it was read

    def _members(self, reader: _Reader, ids: list[int], epoch: int, slot: int, slots: int) -> list[dict]:
        """The raw samples with the given slot indices of an epoch (the resumed shuffle buffer)."""
        shards, stride, phase = self._layout(epoch, slot, slots)
        starts = np.cumsum([0] + [reader.size(u) for u in shards]).tolist()
        wanted: dict[int, dict[int, int]] = {}  # shard position -> {offset in shard: position in ids}
        for pos, k in enumerate(ids):
            g = phase + k * stride
            s = bisect.bisect_right(starts, g) - 1
            wanted.setdefault(s, {})[g - starts[s]] = pos
        found: list[dict | None] = [None] * len(ids)
        counting, reader.counting = reader.counting, False  # read before the checkpoint: counted then
        for s, offsets in wanted.items():
            last = max(offsets)
            for offset, raw in enumerate(reader.shard(shards[s])):
                if offset in offsets:
                    found[offsets[offset]] = raw
                if offset >= last:
                    break
        reader.counting = counting
        if any(r is None for r in found):
            raise ShardSetError(f"rank {self.rank} slot {slot}: shards changed since the checkpoint (a sample the "
                                "resumed shuffle buffer needs is gone); resume with the shards the run started with")
        return found  # type: ignore[return-value]

    def _epoch(self, reader: _Reader, slot: int, slots: int, epoch: int, done: int) -> Iterator[dict]:
        """The shuffled raw samples of one epoch after the first ``done``."""
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        buffer: list[dict] = []
        start = 0
        if done:
            shards, stride, phase = self._layout(epoch, slot, slots)
            total = sum(reader.size(u) for u in shards)
            ids, start, draining = replay_shuffle(rng, -(-(total - phase) // stride), self.shuffle_buffer, done)
            buffer = self._members(reader, ids, epoch, slot, slots)
            if draining:
                yield from buffer
                return
        got_any = bool(buffer)
        for raw in self._slot_raw(reader, slot, slots, epoch, start):
            got_any = True
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], raw = raw, buffer[i]
            yield raw
        if not got_any:
            raise ShardSetError(f"rank {self.rank} slot {slot}: shards {self.urls[:3]}... yielded no samples")
        rng.shuffle(buffer)
        yield from buffer

    def _shuffled(self, reader: _Reader, slot: int, slots: int, consumed: int) -> Iterator[dict]:
        """The slot's infinite shuffled raw stream after its first ``consumed`` samples."""
        epoch = 0
        while consumed:  # skip whole epochs by their sizes
            shards, stride, phase = self._layout(epoch, slot, slots)
            n = -(-(sum(reader.size(u) for u in shards) - phase) // stride)
            if n <= 0:
                raise ShardSetError(f"rank {self.rank} slot {slot}: shards {self.urls[:3]}... yielded no samples")
            if consumed < n:
                break
            consumed -= n
            epoch += 1
        while True:
            reader.counting = epoch == 0
            yield from self._epoch(reader, slot, slots, epoch, consumed)
            consumed = 0
            epoch += 1

    # -- samples -------------------------------------------------------------------------------
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
        expected = manifest_sizes(self.urls) | self.resume.shard_sizes
        reader = _Reader(skipped, count_tar_errors=not sample_split or slot == 0, expected=expected)
        consumed = self.resume.raw_consumed.get(reader_id, 0)
        raws = self._shuffled(reader, slot, slots, consumed) if self.train else self._slot_raw(reader, slot, slots, 0)
        for pos, raw in enumerate(raws, start=consumed + 1):
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
            sample = sample_tensors(enc, self.transform(image), meta, raw["__key__"])
            if self.train:
                sample["stream_pos"] = (reader_id, pos, dict(skipped), dict(reader.corrections))
            yield sample
