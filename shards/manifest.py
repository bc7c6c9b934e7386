"""The ``manifest.json`` of a shard set: its name, what ``read_manifest`` checks, and the tar files
in manifest order. Written by ``shards.writer.ShardWriter``; read by every consumer of shards
(the trainer's loader, ``ifas-shards verify``, builds that resume)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
# Metadata fields whose value distribution the manifest records (when present in samples).
COUNT_FIELDS = ("label", "attack", "dataset", "split", "face_source")
_MANIFEST_FIELDS = {"name": str, "num_samples": int, "shards": list, "counts": dict}


class ManifestError(ValueError):
    """A shard set's manifest is malformed; the message names the file."""


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``<shard_dir>/manifest.json``; errors name the file."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest {path} (is {shard_dir} a shard set written by ShardWriter?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: top level must be an object")
    for field, typ in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(field), typ):
            raise ManifestError(f"{path}: field {field!r} missing or not a {typ.__name__}")
    for i, s in enumerate(manifest["shards"]):
        if not (isinstance(s, dict) and {"file", "num_samples", "sha256", "bytes"} <= s.keys()):
            raise ManifestError(f"{path}: shards[{i}] needs file, num_samples, sha256, bytes")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        raise ManifestError(f"{path}: num_samples does not equal the sum over shards")
    return manifest


def shard_paths(shard_dir: str | os.PathLike) -> list[str]:
    """Absolute paths of a shard set's tar files, in manifest order (for ``wds.WebDataset``)."""
    root = Path(shard_dir).resolve()
    return [str(root / s["file"]) for s in read_manifest(shard_dir)["shards"]]


def data_source(manifest: dict[str, Any]) -> str:
    """Where a shard set's samples come from, as its manifest records it: ``synthetic`` (written by
    shards.synth), ``dataset`` (``ifas-shards build`` of a real dataset) or ``unknown`` (hand-made, or a
    writer that records neither)."""
    if (manifest.get("generator") or {}).get("name") == "shards.synth":
        return "synthetic"
    if "adapter" in ((manifest.get("build") or {}).get("fingerprint") or {}):
        return "dataset"
    return "unknown"
