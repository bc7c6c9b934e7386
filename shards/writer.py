"""Write WebDataset tar shards plus a ``manifest.json`` describing them.

A shard set is one directory: ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... and
``manifest.json``. Each shard is written to ``<name>.tmp`` and renamed only once complete, and
the manifest is written last (also via a rename), so a reader that trusts the manifest never
sees a partial shard. Tar members carry a fixed mtime/owner so the same samples give
byte-identical shards (and sha256) on every rebuild.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import webdataset as wds

from shards.io import atomic_write_text, sha256_file
from shards.manifest import COUNT_FIELDS, MANIFEST_NAME
from shards.schema import IMAGE_MEMBERS, validate_meta

log = logging.getLogger(__name__)

VERSION = "0.1.0"
_TAR_BLOCK = 512
_TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # webdataset splits a member name at its first dot


def _tar_member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_bytes(content: int) -> int:
    """Size of the finished archive: members + end marker, padded to whole records."""
    return -(-content // _TAR_RECORD) * _TAR_RECORD


class ShardWriter:
    """Write samples (JPEG bytes + metadata dict) into size-bounded tar shards.

    Use as a context manager; ``close()`` (or leaving the ``with`` block normally) finishes the
    last shard and writes the manifest. If the block raises, the unfinished shard is deleted and
    no manifest is written, so the directory never looks like a complete shard set.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        name: str | None = None,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume_shards: list[dict[str, Any]] | None = None,
        resume_counts: dict[str, dict[str, int]] | None = None,
        on_shard: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.name = name or self.out_dir.name
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.extra = dict(extra or {})
        self.on_shard = on_shard  # called with each finished shard's manifest entry (resumable builds)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # resume_shards: finished shards of an interrupted run; kept, and numbering continues after them.
        self._shards: list[dict[str, Any]] = [dict(s) for s in (resume_shards or [])]
        self._clear_previous(overwrite or bool(self._shards), keep={s["file"] for s in self._shards})

        self._keys: set[str] = set()
        self._counts: dict[str, Counter] = {f: Counter((resume_counts or {}).get(f, {})) for f in COUNT_FIELDS}
        self._tar: wds.TarWriter | None = None
        self._fileobj = None
        self._tmp_path: Path | None = None
        self._shard_samples = 0
        self._shard_bytes = 0
        self._closed = False
        self.manifest: dict[str, Any] | None = None  # set by close()

    def _clear_previous(self, overwrite: bool, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Refuse to mix with an older shard set in the same directory (or delete it, except ``keep``)."""
        # Manifest first, so a reader never sees a manifest whose shards are being deleted.
        old = sorted(self.out_dir.glob(MANIFEST_NAME + "*")) + sorted(self.out_dir.glob(f"{self.prefix}-*.tar*"))
        old = [p for p in old if p.name not in keep]
        if not old:
            return
        if not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds a shard set ({old[0].name}, ...); pass overwrite=True")
        for p in old:
            p.unlink()

    # -- writing ---------------------------------------------------------------------------
    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open_shard(self) -> None:
        final = self._shard_path(len(self._shards))
        self._tmp_path = final.with_name(final.name + ".tmp")
        self._fileobj = open(self._tmp_path, "wb")
        # Fixed mtime/owner: identical samples must give identical bytes.
        self._tar = wds.TarWriter(self._fileobj, encoder=False, mtime=0, user="", group="")  # int mtime: no PAX headers
        self._shard_samples = 0
        self._shard_bytes = 2 * _TAR_BLOCK  # end-of-archive marker

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._fileobj is not None and self._tmp_path is not None
        self._tar.close()
        self._fileobj.flush()
        os.fsync(self._fileobj.fileno())
        self._fileobj.close()
        final = self._shard_path(len(self._shards))
        os.replace(self._tmp_path, final)
        entry = {
            "file": final.name,
            "num_samples": self._shard_samples,
            "sha256": sha256_file(final),
            "bytes": final.stat().st_size,
        }
        self._shards.append(entry)
        log.info("wrote %s (%d samples, %d bytes)", final, entry["num_samples"], entry["bytes"])
        self._tar = self._fileobj = self._tmp_path = None
        if self.on_shard is not None:
            self.on_shard(dict(entry))

    def write(self, key: str, image: bytes, meta: dict[str, Any], ext: str = "jpg") -> None:
        """Add one sample (its image as the member ``<key>.<ext>``, one of shards.schema.IMAGE_MEMBERS); starts a
        new shard first if this one would exceed a limit."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not _KEY_RE.match(key):
            raise ValueError(f"key {key!r} must match {_KEY_RE.pattern} (webdataset splits names at '.')")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}")
        if ext not in IMAGE_MEMBERS:
            raise ValueError(f"image member .{ext} of {key!r} is not one of {IMAGE_MEMBERS} (shards/schema.py)")
        validate_meta(meta, key)
        meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        sample_bytes = _tar_member_bytes(len(image)) + _tar_member_bytes(len(meta_bytes))
        if self._tar is not None and (
            self._shard_samples >= self.max_samples
            or _tar_file_bytes(self._shard_bytes + sample_bytes) > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.write({"__key__": key, ext: bytes(image), "json": meta_bytes})
        self._keys.add(key)
        self._shard_samples += 1
        self._shard_bytes += sample_bytes
        for field, counter in self._counts.items():
            if field in meta:
                counter[str(meta[field])] += 1

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Samples written so far per value of each COUNT_FIELDS field (at ``on_shard``: the finished shards')."""
        return {f: dict(sorted(c.items())) for f, c in self._counts.items() if c}

    def close(self) -> dict[str, Any] | None:
        """Finish the open shard, write ``manifest.json`` atomically and return the manifest.

        Returns None if the writer was aborted (no manifest written).
        """
        if self._closed:
            return self.manifest
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        manifest: dict[str, Any] = {
            "name": self.name,
            "num_samples": sum(s["num_samples"] for s in self._shards),
            "shards": self._shards,
            "counts": self.counts,
            "created_by": {
                "command": " ".join(sys.argv),
                "version": VERSION,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        clash = set(manifest) & set(self.extra)
        if clash:
            raise ValueError(f"extra manifest fields {sorted(clash)} clash with reserved ones")
        manifest.update(self.extra)
        atomic_write_text(self.out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        self.manifest = manifest
        log.info("shard set %s: %d samples in %d shards", self.out_dir, manifest["num_samples"], len(self._shards))
        return manifest

    def abort(self) -> None:
        """Drop the unfinished shard; completed shards stay but no manifest is written."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._fileobj.close()
            finally:
                if self._tmp_path is not None:
                    self._tmp_path.unlink(missing_ok=True)
            self._tar = self._fileobj = self._tmp_path = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
