"""What a build takes from the decoded frames: the frame size in every sample, CASIA-MFSD's camera quality
from it (the paper's resolutions, docs/datasets.md), and --first-frames (SiW protocol 1's first 60 frames)."""
from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from shards.adapters import get_adapter
from shards.build import BuildOptions, build_dataset
from shards.cli import main
from shards.fixtures import framed_face, write_video
from shards.video import frame_indices


def _metas(split_dir: Path) -> list[dict]:
    urls = [str(p) for p in sorted(split_dir.glob("*.tar"))]
    return [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def test_casia_quality_is_read_from_the_frame_size_not_the_file_name(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    sizes = {"train_release/1/1.avi": (640, 480), "train_release/1/HR_2.avi": (640, 480),  # misnamed copy
             "train_release/1/3.avi": (1280, 720), "train_release/1/7.avi": (800, 600)}
    for rel, (w, h) in sizes.items():
        write_video(raw / rel, frames=3, rgb=framed_face(w, h))
    build_dataset(get_adapter("casia_mfsd", str(raw)), tmp_path / "out", BuildOptions(frames=2, size=32))
    got = {(m["source"], m["device"], tuple(m["frame_size"])) for m in _metas(tmp_path / "out" / "train")}
    assert got == {("train_release/1/1.avi", "low_or_normal", (640, 480)),
                   ("train_release/1/HR_2.avi", "low_or_normal", (640, 480)),
                   ("train_release/1/3.avi", "high", (1280, 720)),
                   ("train_release/1/7.avi", "unknown_800x600", (800, 600))}


def test_first_frames_samples_only_the_start_of_each_video(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_video(raw / "Train/live/006/006-1-1-1-1.mov", frames=80)
    write_video(raw / "Train/spoof/006/006-1-2-1-1.mov", frames=30)  # shorter than N: all of it
    args = ["build", "siw", str(raw), "--face", "center", "--size", "32"]
    assert main([*args, "--out", str(tmp_path / "p1"), "--first-frames", "60", "--frames", "60"]) == 0
    frames = {}
    for m in _metas(tmp_path / "p1" / "train"):
        frames.setdefault(m["source"], []).append(m["frame"])
    assert frames == {"Train/live/006/006-1-1-1-1.mov": list(range(60)),
                      "Train/spoof/006/006-1-2-1-1.mov": list(range(30))}
    assert main([*args, "--out", str(tmp_path / "spread"), "--first-frames", "60", "--frames", "6"]) == 0
    live = [m["frame"] for m in _metas(tmp_path / "spread" / "train") if m["label"] == "live"]
    assert live == frame_indices(60, 6) and max(live) < 60
    assert main([*args, "--out", str(tmp_path / "whole"), "--frames", "6"]) == 0
    live = [m["frame"] for m in _metas(tmp_path / "whole" / "train") if m["label"] == "live"]
    assert live == frame_indices(80, 6) and max(live) >= 60


def test_first_frames_applies_to_frame_folders_too() -> None:
    from shards.adapters.base import Item
    from shards.build import select_image_frames

    def folder(name: str, n: int) -> list[Item]:
        return [Item(Path(f"{name}/{i:04d}.png"), f"{name}/{i:04d}.png", "live", "none", "1", "train", name)
                for i in range(n)]

    items = folder("a", 10) + folder("b", 3)
    kept = lambda got: [it.rel for it in got]  # noqa: E731
    assert kept(select_image_frames(items, 0, 4)) == kept(items[:4] + items[10:])
    assert kept(select_image_frames(items, 2, 4)) == [items[i].rel for i in frame_indices(4, 2)] + [
        items[10 + i].rel for i in frame_indices(3, 2)]
    assert select_image_frames(items, 0, 0) == items
