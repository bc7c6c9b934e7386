"""The releases' own face locations (OULU-NPU eye positions, Replay-Attack and SiW .face boxes): read per
frame, used for the crop with the detector as the per-frame fallback, and counted per source."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.adapters import get_adapter
from shards.build import BuildOptions, build_dataset
from shards.cli import main
from shards.errors import ShardsError
from shards.face_locations import FaceFileError, eyes_to_box, normalised, read_face_file
from shards.faces import FaceCropper
from shards.fixtures import framed_face, write_video
from shards.video import read_video_frames

# framed_face(160, 120): the face image fills the central 120x120 square, the eyes of the astronaut near
# (60, 40) and (79, 40) of it; other boxes are deliberately off-face so the crop shows which box was used
W, H = 160, 120


def _samples(split_dir: Path) -> list[tuple[dict, np.ndarray]]:
    urls = [str(p) for p in sorted(split_dir.glob("*.tar"))]
    return [(json.loads(s["json"]), np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")))
            for s in wds.WebDataset(urls, shardshuffle=False)]


def test_each_release_format_is_read_per_frame(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("0, 100, 50, 140, 50\n1,0,0,0,0\n2, 10, 20, 10, 60\n")
    assert read_face_file(tmp_path / "a.txt", "oulu_eyes") == {0: (70.0, 10.0, 100.0, 100.0),
                                                               2: eyes_to_box(10, 20, 10, 60)}
    (tmp_path / "b.face").write_text("0 10 20 30 40\n1 0 0 0 0\n7 1 2 3 4\n")
    assert read_face_file(tmp_path / "b.face", "frame_xywh") == {0: (10, 20, 30, 40), 7: (1, 2, 3, 4)}
    (tmp_path / "c.face").write_text("10 20 40 60\n0 0 0 0\n5 5 25 45\n")
    assert read_face_file(tmp_path / "c.face", "line_xyxy") == {0: (10, 20, 30, 40), 2: (5, 5, 20, 40)}
    (tmp_path / "d.face").write_text("10 20 forty 60\n")
    with pytest.raises(FaceFileError, match=r"d.face:1: expected 4 numbers"):
        read_face_file(tmp_path / "d.face", "line_xyxy")


def _expected(video: Path, frames: int, box_of) -> list[np.ndarray]:
    """The reference crops: the build's crop rule on the decoded frames with the box ``box_of(frame)``."""
    cropper = FaceCropper(mode="bbox", size=48)
    return [cropper.crop(rgb, box_of(i)) for i, rgb in read_video_frames(video, frames)]


def test_oulu_eye_positions_crop_each_frame_and_the_detector_fills_the_gaps(tmp_path: Path) -> None:
    raw = tmp_path / "oulu"
    video = raw / "Train_files/1_1_01_1.avi"
    write_video(video, frames=4, rgb=framed_face(W, H))
    # eyes placed off the face (top-left corner) on frames 0 and 2; no row for 1 and 3: the detector
    eyes = {0: (10, 12, 30, 12), 2: (12, 14, 34, 14)}
    video.with_suffix(".txt").write_text("".join(f"{f}, {x1}, {y1}, {x2}, {y2}\n" for f, (x1, y1, x2, y2)
                                                 in eyes.items()))
    write_video(raw / "Train_files/1_1_02_1.avi", frames=4, rgb=framed_face(W, H))  # no .txt: the detector
    result = build_dataset(get_adapter("oulu_npu", str(raw)), tmp_path / "out",
                           BuildOptions(frames=4, size=48, face="release"))
    sources = result["train"]["counts"]["face_source"]
    assert sources["release"] == 2  # the detector may miss a face: those frames are no_face, not release
    assert sources["detector"] + result["train"]["skipped"].get("no_face", 0) == 6
    samples = _samples(tmp_path / "out" / "train")
    ref = _expected(video, 4, lambda i: normalised(eyes_to_box(*eyes[i]), W, H) if i in eyes else None)
    for meta, crop in samples:
        if meta["source"] != "Train_files/1_1_01_1.avi" or meta["frame"] not in eyes:
            assert meta["face_source"] == "detector"
            continue
        assert meta["face_source"] == "release"
        assert np.abs(crop.astype(float) - ref[meta["frame"]]).mean() < 4  # JPEG only
    detect = build_dataset(get_adapter("oulu_npu", str(raw)), tmp_path / "det",
                           BuildOptions(frames=4, size=48, face="detect"))
    assert set(detect["train"]["counts"]["face_source"]) == {"detector"}


def test_replay_and_siw_face_files_are_found_where_the_releases_put_them(tmp_path: Path) -> None:
    replay = tmp_path / "replay"
    rel = "train/real/client001_session01_webcam_authenticate_adverse_1"
    write_video(replay / f"{rel}.mov", frames=3, rgb=framed_face(W, H))
    (replay / "face-locations" / rel).parent.mkdir(parents=True)
    (replay / "face-locations" / f"{rel}.face").write_text("0 20 30 40 40\n1 22 30 40 40\n2 24 30 40 40\n")
    siw = tmp_path / "siw"
    for name, face in (("006-1-1-1-1", "006-1-1-1-1.face"), ("153-2-1-1-1.m", "153-2-1-1-1.face")):
        subject = name[:3]
        write_video(siw / f"Train/live/{subject}/{name}.mov", frames=3, rgb=framed_face(W, H))
        (siw / f"Train/live/{subject}/{face}").write_text("20 30 60 70\n22 30 62 70\n0 0 0 0\n")
    for name, root, expected in (("replay_attack", replay, {"release": 3}),
                                 ("siw", siw, {"release": 4, "detector": 2})):
        result = build_dataset(get_adapter(name, str(root)), tmp_path / f"out_{name}",
                               BuildOptions(frames=3, size=48, face="auto", center_fallback=True))
        sources = result["train"]["counts"]["face_source"]
        assert sources["release"] == expected["release"], name
        assert sources.get("detector", 0) + sources.get("center", 0) == expected.get("detector", 0), name


def test_release_mode_is_refused_up_front_for_a_dataset_without_face_locations(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "msu"
    write_video(raw / "scene01/real/real_client002_android_SD_scene01.mp4", frames=2)
    with pytest.raises(ShardsError, match="MSU-MFSD ships no face locations"):
        build_dataset(get_adapter("msu_mfsd", str(raw)), tmp_path / "out", BuildOptions(face="release"))
    assert main(["build", "msu_mfsd", str(raw), "--out", str(tmp_path / "out"), "--face", "release"]) == 2
    assert "use --face auto or detect" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
