"""Shard sets as a run names them (a directory with manifest.json or *.tar, a glob, a brace pattern or a file)
resolved into tar paths, refused with a clear error when missing or empty."""
from __future__ import annotations

import glob
from pathlib import Path

import braceexpand

from shards.manifest import MANIFEST_NAME, ManifestError, shard_paths


class ShardSetError(ValueError):
    """A shard set is missing or empty; the message names it and the fix."""


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
