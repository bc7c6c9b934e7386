"""``python -m shards.bench.face_locations``: frames/s of a dataset build with the release's face locations against the
bundled detector, on the same videos in the same process (BENCHMARKS.md, "Shard building").

The tree is an OULU-NPU-style fixture (``--videos`` videos of ``--frames-per-video`` frames at
640x480, the frame size of most of the OCIM releases' cameras) with one eye-position file per video; the
build samples ``--frames`` frames per video at the default crop size. Both builds decode the same
frames, so the ratio is what the detector costs on top of decoding, cropping and JPEG encoding.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from shards.adapters import get_adapter
from shards.build import BuildOptions, build_dataset
from shards.fixtures import framed_face, write_video
from shards.io import setup_logging

WIDTH, HEIGHT = 640, 480
# framed_face(640, 480): the face fills the central 480x480 square; eye positions placed so that the
# eye-derived box (shards.face_locations) matches the detector's box on this frame within a few pixels
EYES = (80 + 0.47 * 480, 0.33 * 480, 80 + 0.59 * 480, 0.33 * 480)


def make_tree(root: Path, videos: int, frames: int) -> None:
    for i in range(videos):
        video = root / "Train_files" / f"1_1_{i + 1:02d}_1.avi"
        write_video(video, frames=frames, rgb=framed_face(WIDTH, HEIGHT))
        video.with_suffix(".txt").write_text("".join(f"{f}, {EYES[0]:.1f}, {EYES[1]:.1f}, {EYES[2]:.1f}, "
                                                     f"{EYES[3]:.1f}\n" for f in range(frames)))


def measure(root: Path, out: Path, face: str, frames: int, repeats: int) -> dict:
    """Best of ``repeats`` builds (frames/s), with the manifest's face-source counts."""
    best, result = float("inf"), None
    for r in range(repeats):
        start = time.perf_counter()
        result = build_dataset(get_adapter("oulu_npu", str(root)), out / f"{face}{r}",
                               BuildOptions(frames=frames, face=face), overwrite=True)
        best = min(best, time.perf_counter() - start)
    manifest = result["train"]
    n = manifest["num_samples"] + sum(manifest.get("skipped", {}).values())
    return {"face": face, "frames": n, "seconds": round(best, 3), "frames_per_s": round(n / best, 1),
            "face_source": manifest["counts"].get("face_source", {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.bench.face_locations", description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames-per-video", type=int, default=30)
    ap.add_argument("--frames", type=int, default=10, help="frames sampled per video (the build's --frames)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "oulu"
        make_tree(root, args.videos, args.frames_per_video)
        rows = [measure(root, Path(tmp) / "out", face, args.frames, args.repeats) for face in ("detect", "release")]
    base = rows[0]["frames_per_s"]
    for row in rows:
        row["ratio_vs_detect"] = round(row["frames_per_s"] / base, 2)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
