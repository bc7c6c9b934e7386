"""The caption cache of an SCF run (``ifas-shards caption``): JSON lines ``{"key": ..., "caption": ...}`` in the
output folder, one file per writer so ranks never share a file: ``captions.jsonl`` for a one-process run,
``captions.rank<r>.jsonl`` for rank r of a data-parallel run (docs/datasets.md, "SCF captions").

A batch's lines are flushed and fsync'ed before the next batch starts, so a kill loses at most the batch in
flight; a kill during the write can leave a torn last line, which readers skip and the file's owner cuts off
before it appends again. Every file is read on resume, so a rerun with another number of ranks still skips
every caption already written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

from shards.errors import ShardsError

log = logging.getLogger(__name__)

CACHE_NAME = "captions.jsonl"
CACHE_GLOB = "captions*.jsonl"


def cache_file(out: Path, rank: int, world_size: int) -> Path:
    """The cache file this writer appends to."""
    return out / (CACHE_NAME if world_size == 1 else f"captions.rank{rank}.jsonl")


def _read_one(path: Path, cache: dict[str, str]) -> int:
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, else a line cut by a kill
    if torn:
        log.warning("%s: skipping an unfinished last line (%d bytes: a kill, or a rank still writing)", path, len(torn))
    n = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, caption = rec["key"], rec["caption"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardsError(
                f"{path}:{i}: not a caption record ({e}); delete that line (its sample is captioned again on rerun)"
            ) from e
        cache.setdefault(key, caption)  # the first file (by name) wins should two writers have one key
        n += 1
    return n


def read_caches(out: Path) -> dict[str, str]:
    """key -> caption from every cache file in ``out`` (files in name order)."""
    cache: dict[str, str] = {}
    for path in sorted(out.glob(CACHE_GLOB)):
        log.info("%s: %d cached captions", path, _read_one(path, cache))
    return cache


class CacheAppender:
    """Appends batches of captions to one writer's cache file, durable per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "ab")
        end = self._f.tell()
        if end:  # cut a torn last line, or the next record would be glued onto it
            with open(path, "rb") as r:
                data = r.read()
            keep = data.rfind(b"\n") + 1
            if keep != end:
                self._f.truncate(keep)
                self._f.seek(keep)

    def append(self, records: Iterable[tuple[str, str]]) -> None:
        self._f.write(b"".join((json.dumps({"key": k, "caption": c}) + "\n").encode() for k, c in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CacheAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
