"""Naming rules of the OCIM datasets (OULU-NPU, CASIA-MFSD, Replay-Attack, MSU-MFSD), as distributed.

Each class holds only its dataset's conventions (see docs/datasets.md for the layouts and the
commands). Where a naming field is not part of a release (e.g. no official split), the sample
gets split ``all``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from shards.adapters.base import SPLIT_WORDS, Adapter, Item, SkipFile


class OuluNPU(Adapter):
    """``{Train,Dev,Test}_files/<Phone>_<Session>_<User>_<File>.avi``; File 1 live, 2-3 print, 4-5 replay."""

    name, dataset = "oulu_npu", "OULU-NPU"
    exts = (".avi", ".mp4", ".mov")
    layout = "root/{Train_files,Dev_files,Test_files}/<Phone 1-6>_<Session 1-3>_<User 01-55>_<File 1-5>.avi"
    face_locations, face_format, face_ext = "per-frame eye positions in <video>.txt", "oulu_eyes", ".txt"
    FILE_ATTACK = {
        1: ("none", ""),
        2: ("print", "print1"),
        3: ("print", "print2"),
        4: ("replay", "replay1"),
        5: ("replay", "replay2"),
    }

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        m = self.match(r"(\d)_(\d)_(\d{1,2})_(\d)", rel.stem)
        if not m or int(m[4]) not in self.FILE_ATTACK:
            return None
        phone, session, user, f = int(m[1]), int(m[2]), int(m[3]), int(m[4])
        split = self.split_from_parts(rel, SPLIT_WORDS) or ("train" if user <= 20 else "dev" if user <= 35 else "test")
        attack, spoof_type = self.FILE_ATTACK[f]
        return {
            "attack": attack,
            "spoof_type": spoof_type,
            "subject": f"{user:02d}",
            "split": split,
            "session": str(session),
            "device": f"phone{phone}",
        }


class CasiaMFSD(Adapter):
    """``{train,test}_release/<subject>/<1..8|HR_1..HR_4>.avi``; 1,2,HR_1 live; 3-6,HR_2-3 print; 7,8,HR_4 replay.

    Camera quality (``device``) comes from the decoded frame size, as the dataset's paper describes its
    cameras (Zhang et al., "A face antispoofing database with diverse attacks", ICB 2012; docs/datasets.md):
    low quality 640x480 (an old USB camera), normal quality 640x480 (a new USB camera), high quality
    1280x720 (Sony NEX-5). Frame size tells high from the others only, so 640x480 is ``low_or_normal``:
    the file numbers 1-8 are not documented to say which USB camera, and loaders disagree on it.
    """

    name, dataset = "casia_mfsd", "CASIA-MFSD"
    exts = (".avi", ".mp4", ".mov")
    layout = "root/{train_release,test_release}/<subject>/{1..8,HR_1..HR_4}.avi"
    NAME_ATTACK = {
        "1": ("none", ""),
        "2": ("none", ""),
        "hr_1": ("none", ""),
        "3": ("print", "warped_photo"),
        "4": ("print", "warped_photo"),
        "hr_2": ("print", "warped_photo"),
        "5": ("print", "cut_photo"),
        "6": ("print", "cut_photo"),
        "hr_3": ("print", "cut_photo"),
        "7": ("replay", "video"),
        "8": ("replay", "video"),
        "hr_4": ("replay", "video"),
    }
    QUALITY_OF_SIZE = {(1280, 720): "high", (640, 480): "low_or_normal"}  # (width, height), the paper's cameras

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        rule = self.NAME_ATTACK.get(rel.stem.lower())
        split = self.split_from_parts(rel, SPLIT_WORDS)
        if rule is None or split is None or len(rel.parts) < 2 or not rel.parts[-2].isdigit():
            return None
        attack, spoof_type = rule
        # Test subjects are numbered from 1 again but are other people: keep the split in the id.
        return {
            "attack": attack,
            "spoof_type": spoof_type,
            "subject": f"{split}_{int(rel.parts[-2]):02d}",
            "split": split,
        }

    def frame_fields(self, item: Item, width: int, height: int) -> dict[str, Any]:
        return {"device": self.QUALITY_OF_SIZE.get((width, height), f"unknown_{width}x{height}")}


class ReplayAttack(Adapter):
    """``{train,devel,test}/real/client<id>_session<n>_webcam_authenticate_<light>_<k>.mov`` and
    ``.../attack/{fixed,hand}/attack_{highdef,mobile,print}_client<id>_session<n>_<device>_{photo,video}_<light>.mov``."""

    name, dataset = "replay_attack", "Replay-Attack"
    exts = (".mov", ".avi", ".mp4")
    layout = "root/{train,devel,test}/{real,attack/fixed,attack/hand}/*.mov (enroll/ is skipped)"
    face_locations = "per-frame boxes in <video>.face (beside it or under root/face-locations/)"
    face_format, face_ext = "frame_xywh", ".face"

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        if "enroll" in [p.lower() for p in rel.parts[:-1]]:
            raise SkipFile("enrollment_video")
        split = self.split_from_parts(rel, SPLIT_WORDS)
        if split is None:
            return None
        m = self.match(r"client(\d+)_session(\d+)_webcam_authenticate_(adverse|controlled)_(\d+)", rel.stem)
        if m:
            return {
                "attack": "none",
                "subject": f"{int(m[1]):03d}",
                "split": split,
                "session": m[2],
                "device": "webcam",
                "lighting": m[3],
            }
        m = self.match(
            r"attack_(highdef|mobile|print)_client(\d+)_session(\d+)_(highdef|mobile)_(photo|video)_(adverse|controlled)",
            rel.stem,
        )
        if not m:
            return None
        support = next((p.lower() for p in rel.parts[:-1] if p.lower() in ("fixed", "hand")), "")
        return {
            "attack": "print" if m[1] == "print" else "replay",
            "spoof_type": f"{m[1]}_{m[5]}",
            "subject": f"{int(m[2]):03d}",
            "split": split,
            "session": m[3],
            "device": m[4],
            "lighting": m[6],
            "support": support,
        }


class MsuMFSD(Adapter):
    """``scene01/{real,attack}/{real,attack}_client<id>_<android|laptop>_<SD|HD>[_<type>]_scene01.{mp4,mov}``;
    the split comes from ``train_sub_list.txt``/``test_sub_list.txt`` (shipped with the dataset)."""

    name, dataset = "msu_mfsd", "MSU-MFSD"
    exts = (".mp4", ".mov", ".avi")
    layout = "root/scene01/{real,attack}/*.{mp4,mov} + root/{train,test}_sub_list.txt"
    # The official 15 training subjects (used when the sub-list files are absent).
    TRAIN = {2, 3, 5, 6, 7, 8, 9, 11, 12, 21, 22, 34, 53, 54, 55}
    TYPES = {"printed_photo": "print", "ipad_video": "replay", "iphone_video": "replay"}

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.split_of: dict[int, str] = {}
        for split in ("train", "test"):
            for f in sorted(self.root.rglob(f"{split}_sub_list.txt")):
                for tok in f.read_text().split():
                    if tok.isdigit():
                        self.split_of[int(tok)] = split

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        m = self.match(
            r"(real|attack)_client(\d+)_(android|laptop)_(sd|hd)(?:_(printed_photo|ipad_video|iphone_video))?_(scene\d+)",
            rel.stem,
        )
        if not m or (m[1].lower() == "attack") != bool(m[5]):
            return None
        client = int(m[2])
        split = self.split_of.get(client) or ("train" if client in self.TRAIN else "test")
        attack = "none" if m[1].lower() == "real" else self.TYPES[m[5].lower()]
        return {
            "attack": attack,
            "spoof_type": (m[5] or "").lower(),
            "subject": f"{client:03d}",
            "split": split,
            "device": m[3].lower(),
            "session": m[6].lower(),
        }
