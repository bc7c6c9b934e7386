"""Each public dataset's adapter on a fixture tree in its real layout and naming: labels, attack
types, subjects and splits must follow the dataset's documented conventions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from shards.adapters import get_adapter
from shards.build import BuildOptions, build_dataset
from shards.cli import verify_shard_set
from shards.fixtures import FIXTURES, write_tree
from shards.video import is_video


def _read(out: Path) -> dict[str, list[dict]]:
    """source path -> metadata of every sample built from it."""
    by_source: dict[str, list[dict]] = {}
    for split_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        urls = [str(p) for p in sorted(split_dir.glob("*.tar"))]
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            by_source.setdefault(meta["source"], []).append(meta)
    return by_source


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_dataset_adapter_builds_documented_labels(tmp_path: Path, name: str) -> None:
    spec = write_tree(name, tmp_path / "raw")
    adapter = get_adapter(name, str(tmp_path / "raw"))
    result = build_dataset(adapter, tmp_path / "out", BuildOptions(frames=2, size=32, max_samples=4))
    got = _read(tmp_path / "out")

    for rel, expected in spec:
        if expected is None:
            assert rel not in got, f"{rel} has unknown naming but produced samples"
            continue
        assert rel in got, f"{rel}: no sample built"
        metas = got[rel]
        assert len(metas) == (2 if is_video(rel) else 1)
        for meta in metas:
            for field, value in expected.items():
                assert meta[field] == value, f"{name} {rel}: {field}={meta[field]!r}, expected {value!r}"
            assert meta["dataset"] == adapter.dataset and meta["caption_source"] == "template"
    unknown = sum(1 for _, e in spec if e is None)
    for split, manifest in result.items():
        assert manifest is not None
        assert manifest["skipped_files"]["counts"] == {"unknown_naming": unknown}
        assert set(manifest["counts"]["split"]) == {split}
        problems, _ = verify_shard_set(tmp_path / "out" / split)
        assert problems == []
