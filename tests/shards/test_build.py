"""``ifas-shards build``: generic adapters, frame sampling, face crops, skip accounting, size
targets and resuming an interrupted build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards.adapters import get_adapter
from shards.build import STATE_NAME, BuildOptions, build_dataset
from shards.cli import main as cli_main
from shards.cli import verify_shard_set
from shards.errors import ShardsError
from shards.faces import FaceCropper
from shards.fixtures import face_image, write_image, write_video
from shards.manifest import read_manifest, shard_paths
from shards.video import frame_indices, read_video_frames


def _metas(shard_dir: Path) -> list[dict]:
    return [
        json.loads(s["json"]) for s in wds.WebDataset(shard_paths(shard_dir), shardshuffle=False, empty_check=False)
    ]


def test_frame_indices_evenly_spaced() -> None:
    assert frame_indices(100, 4) == [12, 37, 62, 87]
    assert frame_indices(3, 5) == [0, 1, 2]
    assert frame_indices(0, 5) == []


def test_video_frames_sampled_evenly(tmp_path: Path) -> None:
    write_video(tmp_path / "v.mp4", frames=20)
    got = read_video_frames(tmp_path / "v.mp4", 4)
    assert [i for i, _ in got] == [2, 7, 12, 17]
    assert got[0][1].shape == (80, 80, 3) and got[0][1].dtype == np.uint8


def test_face_cropper_modes() -> None:
    face, blank = face_image(), np.full((80, 80, 3), 127, np.uint8)
    assert FaceCropper(size=32).crop(face).shape == (32, 32, 3)
    assert FaceCropper(size=32).crop(blank) is None  # no face -> skipped, not centre-cropped
    assert FaceCropper(size=32, center_fallback=True).crop(blank).shape == (32, 32, 3)
    assert FaceCropper(mode="bbox", size=16).crop(blank, (0.25, 0.25, 0.5, 0.5)).shape == (16, 16, 3)
    assert FaceCropper(mode="bbox", size=16).crop(face) is None  # bbox mode without a box


@pytest.mark.parametrize("live_label", ["1", "0"])
def test_list_adapter_label_polarity(tmp_path: Path, live_label: str) -> None:
    for rel in ("frames/live/s1/001.png", "frames/print/s1/001.png", "frames/replay/s2/001.png"):
        write_image(tmp_path / rel)
    spoof_label = "0" if live_label == "1" else "1"
    lst = tmp_path / "casia_train.txt"
    lst.write_text(
        f"frames/live/s1/001.png {live_label}\nframes/print/s1/001.png {spoof_label}\n"
        f"frames/replay/s2/001.png {spoof_label}\nframes/missing.png 1\nbroken_line\n"
    )
    adapter = get_adapter("list", str(tmp_path), list=str(lst), live_label=live_label, split="train")
    m = build_dataset(adapter, tmp_path / "out", BuildOptions(size=32))["train"]
    by_src = {x["source"]: x for x in _metas(tmp_path / "out" / "train")}
    assert by_src["frames/live/s1/001.png"]["label"] == "live"
    assert by_src["frames/print/s1/001.png"]["attack"] == "print"
    assert by_src["frames/replay/s2/001.png"]["attack"] == "replay"
    assert by_src["frames/replay/s2/001.png"]["subject"] == "s2" and m["counts"]["dataset"] == {"casia_train": 3}
    assert m["skipped_files"]["counts"] == {"bad_list_line": 1, "missing_file": 1}


def test_folder_adapter(tmp_path: Path) -> None:
    write_image(tmp_path / "raw/train/live/alice/0.png")
    write_image(tmp_path / "raw/train/spoof/print/bob/0.png")
    write_video(tmp_path / "raw/test/spoof/replay/carol.mp4")
    write_image(tmp_path / "raw/test/fake/dave.jpg")
    out = build_dataset(get_adapter("folder", str(tmp_path / "raw")), tmp_path / "out", BuildOptions(frames=3, size=32))
    assert set(out) == {"train", "test"}
    train = {m["subject"]: m for m in _metas(tmp_path / "out/train")}
    assert train["alice"]["label"] == "live" and train["bob"]["attack"] == "print"
    test = _metas(tmp_path / "out/test")
    assert sorted((m["subject"], m["attack"]) for m in test) == [("carol", "replay")] * 3 + [("dave", "other")]
    assert {m["dataset"] for m in test} == {"raw"}


def test_bad_inputs_are_skipped_and_counted(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    write_video(raw / "Train_files/1_1_01_1.avi")
    (raw / "Train_files/1_1_02_2.avi").write_bytes(b"RIFF not really a video")  # corrupt video
    write_video(raw / "Train_files/1_1_03_4.avi", rgb=np.full((80, 80, 3), 90, np.uint8))  # no face anywhere
    write_video(raw / "Train_files/clip_final.avi")  # unparseable name
    rc = cli_main(["build", "oulu_npu", str(raw), "--out", str(tmp_path / "out"), "--frames", "2", "--size", "32"])
    assert rc == 0
    m = read_manifest(tmp_path / "out/train")
    assert m["num_samples"] == 2
    assert m["skipped"] == {"no_face": 2, "unreadable_video": 1}
    assert m["skipped_files"]["counts"] == {"unknown_naming": 1}
    assert m["skipped_examples"]["unreadable_video"] == ["Train_files/1_1_02_2.avi"]
    report = capsys.readouterr().out
    assert "no_face" in report and "unreadable_video" in report and "unknown_naming" in report
    # the centre-crop fallback is opt-in
    build_dataset(
        get_adapter("oulu_npu", str(raw)), tmp_path / "out2", BuildOptions(frames=2, size=32, center_fallback=True)
    )
    assert read_manifest(tmp_path / "out2/train")["num_samples"] == 4


def test_shards_size_targeted_by_count_and_bytes(tmp_path: Path) -> None:
    for i in range(6):
        write_image(tmp_path / f"raw/live/s{i}/0.png")
    a = build_dataset(
        get_adapter("folder", str(tmp_path / "raw")), tmp_path / "a", BuildOptions(size=48, max_samples=4)
    )["all"]
    assert [s["num_samples"] for s in a["shards"]] == [4, 2]
    b = build_dataset(
        get_adapter("folder", str(tmp_path / "raw")), tmp_path / "b", BuildOptions(size=48, max_bytes=10240 * 2)
    )["all"]
    assert len(b["shards"]) > 1 and all(s["bytes"] <= 10240 * 2 for s in b["shards"])


def test_interrupted_build_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for user in range(1, 6):
        for f in (1, 2, 4):
            write_video(raw / f"Train_files/1_1_{user:02d}_{f}.avi", frames=4)
    opts = BuildOptions(frames=2, size=32, max_samples=4)
    full = build_dataset(get_adapter("oulu_npu", str(raw)), tmp_path / "full", opts)["train"]

    out = tmp_path / "part"
    assert build_dataset(get_adapter("oulu_npu", str(raw)), out, opts, stop_after_shards=3)["train"] is None
    assert not (out / "train/manifest.json").exists() and (out / "train" / STATE_NAME).exists()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    assert len(done) == 3
    (out / "train/shard-000003.tar.tmp").write_bytes(b"half a shard")  # what a kill leaves behind
    resumed = build_dataset(get_adapter("oulu_npu", str(raw)), out, opts)["train"]
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]
    assert resumed["counts"] == full["counts"] and resumed["num_samples"] == 30
    assert {n: (out / "train" / n).stat().st_mtime_ns for n in done} == done  # finished shards untouched
    assert not (out / "train" / STATE_NAME).exists() and verify_shard_set(out / "train")[0] == []
    # a complete build is not redone; other options need --overwrite
    assert build_dataset(get_adapter("oulu_npu", str(raw)), out, opts)["train"]["shards"] == resumed["shards"]
    with pytest.raises(ShardsError, match="overwrite"):
        build_dataset(get_adapter("oulu_npu", str(raw)), out, BuildOptions(frames=3, size=32))


def test_unknown_root_and_dataset_fail_with_one_line(tmp_path: Path, capsys) -> None:
    assert cli_main(["build", "siw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardsError, match="no usable"):
        build_dataset(get_adapter("siw", str(tmp_path / "empty")), tmp_path / "o", BuildOptions())
    assert cli_main(["build", "siw", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ifas-shards: error: ") and "no usable SiW files" in err[0]


# ----- build defects found on trees laid out like the public releases -----

def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


@pytest.mark.parametrize("ext", [".avi", ".mp4"])
def test_container_shortfall_names_a_cut_file(tmp_path: Path, ext: str) -> None:
    from shards.video import container_shortfall

    v = tmp_path / f"v{ext}"
    write_video(v, frames=10)
    assert container_shortfall(v) is None
    size = v.stat().st_size
    _cut(v, size - 5)
    assert f"the file has {size - 5}" in container_shortfall(v)


def test_truncated_video_is_skipped_and_counted_not_written(tmp_path: Path) -> None:
    """A video cut inside its last frame still decodes (that frame half grey); one cut in half
    decodes only its first frames. Both are refused as truncated, counted, and nothing of them is
    written."""
    raw = tmp_path / "raw"
    write_video(raw / "Train_files/1_1_01_1.avi", frames=10)
    for user, keep in (("02", None), ("03", 0.5)):
        v = raw / f"Train_files/1_1_{user}_1.avi"
        write_video(v, frames=10)
        data = v.read_bytes()
        last_frame = data.rfind(b"\xff\xd8")  # the last MJPG frame's start
        _cut(v, (last_frame + data.rfind(b"\xff\xd9")) // 2 if keep is None else int(len(data) * keep))
    rc = cli_main(["build", "oulu_npu", str(raw), "--out", str(tmp_path / "out"), "--frames", "10", "--face",
                   "center", "--size", "32"])
    assert rc == 0
    m = read_manifest(tmp_path / "out/train")
    assert m["skipped"] == {"truncated_video": 2} and m["num_samples"] == 10
    assert {x["source"] for x in _metas(tmp_path / "out/train")} == {"Train_files/1_1_01_1.avi"}
    assert sorted(m["skipped_examples"]["truncated_video"]) == ["Train_files/1_1_02_1.avi", "Train_files/1_1_03_1.avi"]


def test_stop_on_a_splits_last_shard_completes_that_split_and_resumes(tmp_path: Path, capsys) -> None:
    from shards.fixtures import write_tree

    write_tree("casia_mfsd", tmp_path / "raw")
    args = ["build", "casia_mfsd", str(tmp_path / "raw"), "--frames", "2", "--face", "center", "--size", "32"]
    assert cli_main([*args, "--out", str(tmp_path / "full")]) == 0
    # one shard per split: the stop falls on test's only shard, which close() finishes
    assert cli_main([*args, "--out", str(tmp_path / "part"), "--stop-after-shards", "1"]) == 3
    report = capsys.readouterr().out
    assert "part/train: interrupted" in report and read_manifest(tmp_path / "part/test")["num_samples"] == 4
    assert not (tmp_path / "part/train/manifest.json").exists()
    assert cli_main([*args, "--out", str(tmp_path / "part")]) == 0  # the same command finishes it
    for split in ("test", "train"):
        full, part = (read_manifest(tmp_path / d / split) for d in ("full", "part"))
        assert [s["sha256"] for s in part["shards"]] == [s["sha256"] for s in full["shards"]]


def test_list_adapter_needs_the_live_label(tmp_path: Path, capsys) -> None:
    write_image(tmp_path / "frames/a/001.png")
    lst = tmp_path / "list.txt"
    lst.write_text("frames/a/001.png 1\n")
    rc = cli_main(["build", "list", str(tmp_path), "--list", str(lst), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--live-label" in err and "list.txt" in err and "its labels: 1" in err
    assert not (tmp_path / "out").exists()


def test_media_of_an_unexpected_type_is_counted(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_video(raw / "Train_files/1_1_01_1.avi")
    write_image(raw / "Train_files/1_1_01_1.png")  # a still among OULU-NPU's videos
    (raw / "Train_files/1_1_01_1.txt").write_text("0 10 10 40 40\n")  # OULU's face boxes: metadata, not a sample
    m = build_dataset(get_adapter("oulu_npu", str(raw)), tmp_path / "out", BuildOptions(frames=2, size=32))["train"]
    assert m["skipped_files"]["counts"] == {"unexpected_file_type": 1}
    assert m["skipped_files"]["examples"]["unexpected_file_type"] == ["Train_files/1_1_01_1.png"]
