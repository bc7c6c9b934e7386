"""Tiny fixture trees in each public dataset's real layout and naming (for tests and dry runs).

Files hold a real face (scikit-image's astronaut, which the bundled detector finds) so a build
exercises decoding, frame sampling and face cropping end to end. ``FIXTURES[name]`` lists
``(relative path, expected label/attack/subject/split)``; ``write_tree`` writes them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shards.video import is_video

SIZE = 80  # pixels; the detector still finds the face at this size


@functools.lru_cache(maxsize=1)
def face_image(size: int = SIZE) -> np.ndarray:
    """An RGB face the LBP cascade detects (a crop of skimage's astronaut)."""
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()[0:300, 60:360]).resize((size, size), Image.BILINEAR))


def write_image(path: Path, rgb: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face_image() if rgb is None else rgb).save(path)


def write_video(path: Path, frames: int = 6, rgb: np.ndarray | None = None) -> None:
    """A short video (MJPG in .avi, mp4v otherwise) of a slowly moving face."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    img = face_image() if rgb is None else rgb
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
    w = cv2.VideoWriter(str(path), fourcc, 10, (img.shape[1], img.shape[0]))
    for i in range(frames):
        w.write(cv2.cvtColor(np.roll(img, i, axis=1), cv2.COLOR_RGB2BGR))
    w.release()


def framed_face(width: int, height: int) -> np.ndarray:
    """A frame of a camera's size with the face filling its height, centred on grey (for datasets whose
    frame size carries information, like CASIA-MFSD's cameras)."""
    frame = np.full((height, width, 3), 128, np.uint8)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    frame[top : top + side, left : left + side] = face_image(side)
    return frame


def write_file(root: Path, rel: str, rgb: np.ndarray | None = None) -> None:
    p = root / rel
    if is_video(p):
        write_video(p, rgb=rgb)
    else:
        write_image(p, rgb)


def _e(attack: str, subject: str, split: str, **extra: Any) -> dict[str, Any]:
    return {
        "label": "live" if attack == "none" else "spoof",
        "attack": attack,
        "subject": subject,
        "split": split,
        **extra,
    }


# (relative path, expected fields); None = the adapter must skip it as unknown naming.
FIXTURES: dict[str, list[tuple[str, dict[str, Any] | None]]] = {
    "oulu_npu": [
        ("Train_files/1_1_01_1.avi", _e("none", "01", "train", device="phone1", session="1")),
        ("Train_files/2_3_05_3.avi", _e("print", "05", "train", spoof_type="print2")),
        ("Dev_files/3_2_22_4.avi", _e("replay", "22", "dev", device="phone3")),
        ("Test_files/6_1_40_5.avi", _e("replay", "40", "test", spoof_type="replay2")),
        ("Test_files/6_1_40.avi", None),
    ],
    "casia_mfsd": [
        ("train_release/1/1.avi", _e("none", "train_01", "train", device="low_or_normal", frame_size=[640, 480])),
        ("train_release/1/HR_1.avi", _e("none", "train_01", "train", device="high", frame_size=[1280, 720])),
        ("train_release/2/4.avi", _e("print", "train_02", "train", spoof_type="warped_photo")),
        ("test_release/3/HR_3.avi", _e("print", "test_03", "test", spoof_type="cut_photo")),
        ("test_release/3/8.avi", _e("replay", "test_03", "test")),
        ("test_release/3/9.avi", None),
    ],
    "replay_attack": [
        ("train/real/client001_session01_webcam_authenticate_adverse_1.mov", _e("none", "001", "train", session="01")),
        ("devel/attack/fixed/attack_print_client003_session01_highdef_photo_controlled.mov", _e("print", "003", "dev")),
        (
            "test/attack/hand/attack_highdef_client007_session01_highdef_video_adverse.mov",
            _e("replay", "007", "test", spoof_type="highdef_video"),
        ),
        (
            "test/attack/hand/attack_mobile_client007_session01_mobile_photo_adverse.mov",
            _e("replay", "007", "test", device="mobile"),
        ),
        ("test/real/client007_webcam.mov", None),
    ],
    "msu_mfsd": [
        ("scene01/real/real_client002_android_SD_scene01.mp4", _e("none", "002", "train", device="android")),
        (
            "scene01/attack/attack_client002_laptop_SD_printed_photo_scene01.mp4",
            _e("print", "002", "train", device="laptop"),
        ),
        ("scene01/attack/attack_client001_android_SD_ipad_video_scene01.mov", _e("replay", "001", "test")),
        ("scene01/attack/attack_client013_laptop_SD_iphone_video_scene01.mov", _e("replay", "013", "test")),
        ("scene01/attack/client013_laptop.mp4", None),
    ],
    "celeba_spoof": [
        ("Data/train/4980/live/494401.jpg", _e("none", "4980", "train")),
        ("Data/train/4980/spoof/494405.jpg", _e("print", "4980", "train", spoof_type="A4")),
        ("Data/train/4981/spoof/494410.png", _e("replay", "4981", "train", spoof_type="phone")),
        ("Data/test/5001/spoof/500001.jpg", _e("mask", "5001", "test", spoof_type="3d_mask")),
        ("Data/test/5001/other/500002.jpg", None),
    ],
    "siw": [
        ("Train/live/006/006-1-1-1-1.mov", _e("none", "006", "train", device="sensor1")),
        ("Train/spoof/006/006-2-2-2-1.mov", _e("print", "006", "train", spoof_type="print_lq")),
        ("Test/spoof/090/090-1-3-4-1.mov", _e("replay", "090", "test", spoof_type="asus_mb168b")),
        ("Test/live/153/153-2-1-1-1.m.mov", _e("none", "153", "test", device="sensor2", session="1")),
        ("Test/spoof/090/090-1-4-1-1.mov", None),
    ],
    "siw_m_v2": [
        ("Live/Live_12.mov", _e("none", "12", "all")),
        ("Spoof/Print/Print_3.mov", _e("print", "3", "all")),
        ("Spoof/Mask_Silicone/Mask_Silicone_7.mov", _e("mask", "7", "all", spoof_type="Mask_Silicone")),
        ("Spoof/Makeup_Co/Makeup_Co_2.mov", _e("other", "2", "all")),
        ("Extras/readme_clip.mov", None),
    ],
    "hifimask": [
        ("train/1_06_0_1_1_1/0001.png", _e("none", "06", "train", device="sensor1")),
        ("train/1_06_0_1_1_1/0002.png", _e("none", "06", "train")),
        ("train/2_07_3_2_1_4/0001.png", _e("mask", "07", "train", spoof_type="resin")),
        ("test/3_60_1_1_1_1/0001.png", _e("mask", "60", "test", spoof_type="transparent")),
        ("test/misc/0001.png", None),
    ],
    "casia_surf_3dmask": [
        ("001/live/indoor_1.mp4", _e("none", "01", "all")),
        ("001/mask/indoor_1.mp4", _e("mask", "01", "all")),
        ("002/mask/outdoor_2.mp4", _e("mask", "02", "all")),
        ("notes/clip.mp4", None),
    ],
    "hkbu_mars_v1p": [
        ("real/01_01_01.avi", _e("none", "01", "all")),
        ("mask/ThatsMyFace/03_02_01.avi", _e("mask", "03", "all")),
        ("mask/REAL-f/05_01_02.avi", _e("mask", "05", "all")),
        ("other/clip.avi", None),
    ],
    "rose_youtu": [
        ("train/2/G_NT_HS_g_E_2_1.mp4", _e("none", "02", "train", device="hs")),
        ("train/2/Ps_T_5s_wg_E_2_1.mp4", _e("print", "02", "train")),
        ("test/13/Vm_NT_IP_g_E_13_2.mp4", _e("replay", "13", "test", device="ip")),
        ("test/13/Mu_NT_ZTE_g_E_13_1.mp4", _e("mask", "13", "test")),
        ("test/13/Xx_clip.mp4", None),
    ],
    "wmca": [
        ("rgb/035_01_000_0_00.mp4", _e("none", "035", "all", session="01")),
        ("rgb/018_02_000_3_10.mp4", _e("print", "018", "all")),
        ("rgb/530_03_001_2_18.mp4", _e("mask", "530", "all", spoof_type="fake_head")),
        ("rgb/100_01_000_4_21/0000.png", _e("replay", "100", "all")),
        ("rgb/clip.mp4", None),
    ],
}

# CelebA-Spoof ships its labels and boxes beside the images.
_CELEBA_TYPE = {"494401": 0, "494405": 3, "494410": 9, "500001": 10}


def write_tree(name: str, root: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Write ``FIXTURES[name]`` (plus the dataset's side files) under ``root``; return the spec."""
    spec = FIXTURES[name]
    for rel, _ in spec:
        # CASIA-MFSD: the paper's cameras, 1280x720 for the HR_ videos, 640x480 for the USB ones
        size = ((1280, 720) if "HR_" in rel else (640, 480)) if name == "casia_mfsd" else None
        write_file(root, rel, framed_face(*size) if size else None)
    if name == "celeba_spoof":
        labels: dict[str, dict[str, list[int]]] = {"train": {}, "test": {}}
        for rel, _ in spec:
            stem = Path(rel).stem
            if stem in _CELEBA_TYPE:
                vec = [0] * 44
                vec[40], vec[43] = _CELEBA_TYPE[stem], int(_CELEBA_TYPE[stem] != 0)
                labels[rel.split("/")[1]][rel] = vec
                # box on the 224x224 scale: the face of face_image() spans ~(0.37, 0.21, 0.33, 0.33)
                (root / rel).with_name(stem + "_BB.txt").write_text("83 47 73 73 0.99\n")
        metas = root / "metas" / "intra_test"
        metas.mkdir(parents=True, exist_ok=True)
        for split, d in labels.items():
            (metas / f"{split}_label.json").write_text(json.dumps(d))
    if name == "msu_mfsd":
        (root / "train_sub_list.txt").write_text("002\n003\n")
        (root / "test_sub_list.txt").write_text("001\n013\n")
    return spec
