"""Reading raw samples out of shards for one reader slot (rank x DataLoader worker): shard sizes from the
manifests, the per-label sample offsets live/spoof balancing needs, and the ``Reader`` that streams a
shard's raw samples while counting damage and recording shards whose true size differs from the manifest.
"""
from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

from shards.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

RawSample = dict[str, Any]  # webdataset's: the members' bytes by extension, plus __key__ and __url__


def manifest_sizes(urls: list[str]) -> dict[str, int]:
    """Sample counts of the shards whose directory has a manifest listing them."""
    sizes: dict[str, int] = {}
    for directory in {str(Path(u).parent) for u in urls}:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            continue
        try:
            listed = {s["file"]: int(s["num_samples"]) for s in json.loads(path.read_text())["shards"]}
        except (ValueError, KeyError, TypeError) as exc:
            # resolve_shards refuses a bad manifest; a glob over its tars still streams, sizes counted by reading
            log.warning("%s is unreadable (%s): its shards' sizes are counted by reading them", path, exc)
            continue
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
                if member.name.endswith(".json"):
                    try:
                        label = json.loads(tar.extractfile(member).read()).get("label")  # type: ignore[union-attr]
                    except (ValueError, AttributeError):
                        continue  # a bad json: the stream skips and counts it when decoding
                    if isinstance(label, str):
                        found.setdefault(label, []).append(index)
    except (OSError, tarfile.TarError) as exc:  # damaged: what came before still streams
        log.warning("%s: labels read up to sample %d (%s)", url, index, exc)
    return {label: tuple(offsets) for label, offsets in found.items()}


class LabelIndex:
    """Each shard's per-label sample offsets, read once per process and shared by the label parts of a source."""

    def __init__(self) -> None:
        self._offsets: dict[str, dict[str, tuple[int, ...]]] = {}

    def offsets(self, url: str, label: str) -> tuple[int, ...]:
        if url not in self._offsets:
            self._offsets[url] = label_offsets(url)
        return self._offsets[url].get(label, ())


class Reader:
    """Raw samples of one shard at a time for one reader slot, with damage counted and true shard
    sizes recorded where they differ from the manifest.

    Whether something is counted is the caller's choice per call: the stream counts in an epoch's
    first pass only (in it every shard, or with a sample-level split every sample, is read by exactly
    one slot, so the sums over ranks count each bad sample once, however often later passes meet it)."""

    def __init__(self, skipped: Counter, expected: dict[str, int]) -> None:
        self.skipped = skipped  # reason -> bad samples counted so far
        self.expected = expected  # shard -> sample count (manifests, corrected)
        self.corrections: dict[str, int] = {}  # what this reader found different; travels in the stream position

    def count(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        log.warning("skipping %s: %s", reason.replace("_", " "), message)

    def shard(self, url: str, skip: int = 0, *, count_errors: bool = False) -> Iterator[RawSample]:
        """The raw samples of one shard after its first ``skip``; ``count_errors``: count a broken tar."""
        failed = False

        def handler(exc: Exception) -> bool:
            nonlocal failed  # webdataset reports one broken tar twice (reader, then expander): count it once
            if count_errors and not failed:
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
            self.expected[url] = sum(1 for _ in self.shard(url))
        return self.expected[url]


def read_samples(reader: Reader, wanted: list[tuple[str, int]]) -> list[RawSample | None]:
    """The raw samples at these (shard, offset) places, in that order (None where a shard lacks one);
    each shard is read once, up to its last wanted sample; nothing is counted (it was read before)."""
    by_shard: dict[str, dict[int, list[int]]] = {}
    for pos, (url, offset) in enumerate(wanted):
        by_shard.setdefault(url, {}).setdefault(offset, []).append(pos)
    found: list[RawSample | None] = [None] * len(wanted)
    for url, offsets in by_shard.items():
        last = max(offsets)
        for offset, raw in enumerate(reader.shard(url)):
            for pos in offsets.get(offset, ()):
                found[pos] = raw
            if offset >= last:
                break
    return found
