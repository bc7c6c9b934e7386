"""What one reader slot (rank x DataLoader worker) reads in each epoch, and where it stands after
yielding a given number of samples, computed from shard sizes and seeds alone (no data read):
the arithmetic behind the bounded-time and elastic resumes of trainer/stream.py
(docs/architecture.md, "Resume").

An epoch is an EpochPlan: shards read in order (all their samples, or listed offsets), of which
the slot takes sample ``phase + k * stride`` of the concatenation, through a seeded shuffle
buffer. A standard epoch gives the slot every ``slots``-th shard of the epoch's shard order (or,
with fewer shards than slots, every ``slots``-th sample). After a change of layout (world size or
loader workers) the first epoch is a transition: the samples the old slots had not yet yielded in
their epoch, dealt out over the new slots; standard epochs follow.
"""
from __future__ import annotations

import bisect
import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds

from shards.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)
Segment = tuple[str, tuple[int, ...] | None]  # (shard, the sample offsets it contributes; None = all)


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


def label_offsets(url: str) -> dict[str, tuple[int, ...]]:
    """{label: offsets of its samples in the shard}, from the json members alone (tar headers are
    skipped over, images never read). Samples are numbered as webdataset groups them: consecutive
    members sharing the name before the first dot. Used by live/spoof balancing (data.balance)."""
    found: dict[str, list[int]] = {}
    index, key = -1, None
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                # webdataset's rules: regular files, no __meta__ files, key = the path up to the
                # first dot of the file name (files without one belong to no sample)
                match = re.match(r"^((?:.*/|)[^./]+)[.]([^/]*)$", member.name)
                if not member.isreg() or Path(member.name).name.startswith("__") or match is None:
                    continue
                if match.group(1) != key:
                    index, key = index + 1, match.group(1)
                name = member.name
                if name.endswith(".json"):
                    try:
                        label = json.loads(tar.extractfile(member).read()).get("label")  # type: ignore[union-attr]
                    except (ValueError, AttributeError):
                        continue  # a bad json: the stream skips and counts it when decoding
                    if isinstance(label, str):
                        found.setdefault(label, []).append(index)
    except (OSError, tarfile.TarError) as exc:  # damaged: what came before still streams
        log.warning("%s: labels read up to sample %d (%s)", url, index, exc)
    return {label: tuple(offsets) for label, offsets in found.items()}


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


class Reader:
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


@dataclass(frozen=True)
class EpochPlan:
    number: int  # the epoch; a transition carries the number of the epoch it finishes
    segments: tuple[Segment, ...]
    stride: int = 1
    phase: int = 0
    transition: bool = False

    def rng(self, seed: int, slot: int) -> np.random.Generator:
        return np.random.default_rng([seed, self.number, slot, 2 if self.transition else 1])

    @staticmethod
    def _kept(reader: Reader, url: str, offsets: tuple[int, ...]) -> tuple[int, ...]:
        """Listed offsets the shard really has (a damaged shard found shorter than its manifest)."""
        size = reader.expected.get(url)
        return offsets if size is None or not offsets or offsets[-1] < size else tuple(o for o in offsets if o < size)

    def _sizes(self, reader: Reader) -> list[int]:
        return [len(self._kept(reader, url, offsets)) if offsets is not None else reader.size(url)
                for url, offsets in self.segments]

    def length(self, reader: Reader) -> int:
        total = sum(self._sizes(reader))
        return max(0, -(-(total - self.phase) // self.stride))

    def raws(self, reader: Reader, start: int = 0) -> Iterator[dict[str, Any]]:
        """The slot's raw samples from its ``start``-th on (whole segments before it left unread)."""
        first = self.phase + start * self.stride  # index in the concatenation of the first one wanted
        sizes = self._sizes(reader) if start else None
        base = 0  # concatenation index of the segment's first sample
        for i, (url, offsets) in enumerate(self.segments):
            if sizes is not None and base + sizes[i] <= first:
                base += sizes[i]
                continue
            if offsets is None:
                skip = max(0, first - base)
                g = base + skip
                for raw in reader.shard(url, skip):
                    if (g - self.phase) % self.stride == 0:
                        yield raw
                    g += 1
                base += reader.expected.get(url, g - base)  # the shard's true size, now that it was read
                continue
            kept = self._kept(reader, url, offsets)
            if not kept:
                continue
            position = {offset: j for j, offset in enumerate(kept)}
            for offset, raw in enumerate(reader.shard(url)):
                j = position.get(offset)
                if j is not None and base + j >= first and (base + j - self.phase) % self.stride == 0:
                    yield raw
                if offset >= kept[-1]:
                    break
            base += len(self._kept(reader, url, kept))  # fewer if reading it just found it short

    def identities(self, reader: Reader, ids: list[int]) -> list[tuple[str, int]]:
        """(shard, offset in the shard) of the slot's samples with these indices."""
        starts = np.cumsum([0] + self._sizes(reader)).tolist()
        found = []
        for k in ids:
            g = self.phase + k * self.stride
            s = bisect.bisect_right(starts, g) - 1
            url, offsets = self.segments[s]
            found.append((url, g - starts[s] if offsets is None else self._kept(reader, url, offsets)[g - starts[s]]))
        return found


def read_samples(reader: Reader, wanted: list[tuple[str, int]]) -> list[dict[str, Any] | None]:
    """The raw samples at these (shard, offset) places, in that order (None where a shard lacks one);
    each shard is read once, up to its last wanted sample; nothing is counted (read before)."""
    by_shard: dict[str, dict[int, list[int]]] = {}
    for pos, (url, offset) in enumerate(wanted):
        by_shard.setdefault(url, {}).setdefault(offset, []).append(pos)
    found: list[dict[str, Any] | None] = [None] * len(wanted)
    counting, reader.counting = reader.counting, False
    try:
        for url, offsets in by_shard.items():
            last = max(offsets)
            for offset, raw in enumerate(reader.shard(url)):
                for pos in offsets.get(offset, ()):
                    found[pos] = raw
                if offset >= last:
                    break
    finally:
        reader.counting = counting
    return found
