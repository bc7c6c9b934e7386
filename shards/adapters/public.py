"""Naming rules of the 12 public FAS datasets, as their owners distribute them.

Each class holds only its dataset's conventions (see docs/datasets.md for the layouts and the
commands). Where a naming field is not part of a release (e.g. no official split), the sample
gets split ``all``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Any

from shards.adapters.base import Adapter, SkipFile
from shards.adapters.generic import LIVE_WORDS, attack_from_words
from shards.video import IMAGE_EXTS, VIDEO_EXTS

log = logging.getLogger(__name__)

_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "train_files": "train",
    "train_release": "train",
    "dev": "dev",
    "devel": "dev",
    "val": "dev",
    "valid": "dev",
    "dev_files": "dev",
    "test": "test",
    "testing": "test",
    "test_files": "test",
    "test_release": "test",
}


class OuluNPU(Adapter):
    """``{Train,Dev,Test}_files/<Phone>_<Session>_<User>_<File>.avi``; File 1 live, 2-3 print, 4-5 replay."""

    name, dataset = "oulu_npu", "OULU-NPU"
    exts = (".avi", ".mp4", ".mov")
    layout = "root/{Train_files,Dev_files,Test_files}/<Phone 1-6>_<Session 1-3>_<User 01-55>_<File 1-5>.avi"
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
        split = self.split_from_parts(rel, _SPLIT_WORDS) or ("train" if user <= 20 else "dev" if user <= 35 else "test")
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
    """``{train,test}_release/<subject>/<1..8|HR_1..HR_4>.avi``; 1,2,HR_1 live; 3-6,HR_2-3 print; 7,8,HR_4 replay."""

    name, dataset = "casia_mfsd", "CASIA-MFSD"
    exts = (".avi", ".mp4", ".mov")
    layout = "root/{train_release,test_release}/<subject>/{1..8,HR_1..HR_4}.avi"
    NAME_ATTACK = {
        "1": ("none", "", "low"),
        "2": ("none", "", "normal"),
        "hr_1": ("none", "", "high"),
        "3": ("print", "warped_photo", "low"),
        "4": ("print", "warped_photo", "normal"),
        "hr_2": ("print", "warped_photo", "high"),
        "5": ("print", "cut_photo", "low"),
        "6": ("print", "cut_photo", "normal"),
        "hr_3": ("print", "cut_photo", "high"),
        "7": ("replay", "video", "low"),
        "8": ("replay", "video", "normal"),
        "hr_4": ("replay", "video", "high"),
    }

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        rule = self.NAME_ATTACK.get(rel.stem.lower())
        split = self.split_from_parts(rel, _SPLIT_WORDS)
        if rule is None or split is None or len(rel.parts) < 2 or not rel.parts[-2].isdigit():
            return None
        attack, spoof_type, quality = rule
        # Test subjects are numbered from 1 again but are other people: keep the split in the id.
        return {
            "attack": attack,
            "spoof_type": spoof_type,
            "subject": f"{split}_{int(rel.parts[-2]):02d}",
            "split": split,
            "device": quality,
        }


class ReplayAttack(Adapter):
    """``{train,devel,test}/real/client<id>_session<n>_webcam_authenticate_<light>_<k>.mov`` and
    ``.../attack/{fixed,hand}/attack_{highdef,mobile,print}_client<id>_session<n>_<device>_{photo,video}_<light>.mov``."""

    name, dataset = "replay_attack", "Replay-Attack"
    exts = (".mov", ".avi", ".mp4")
    layout = "root/{train,devel,test}/{real,attack/fixed,attack/hand}/*.mov (enroll/ is skipped)"

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        if "enroll" in [p.lower() for p in rel.parts[:-1]]:
            raise SkipFile("enrollment_video")
        split = self.split_from_parts(rel, _SPLIT_WORDS)
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


class CelebASpoof(Adapter):
    """``Data/{train,test}/<id>/{live,spoof}/<n>.{jpg,png}`` + ``<n>_BB.txt`` (face box on a 224 scale);
    spoof type = index 40 of ``metas/intra_test/{train,test}_label.json``."""

    name, dataset = "celeba_spoof", "CelebA-Spoof"
    exts = IMAGE_EXTS
    layout = (
        "root/Data/{train,test}/<id>/{live,spoof}/<n>.jpg + <n>_BB.txt; root/metas/intra_test/{train,test}_label.json"
    )
    # index 40: 0 live, 1 photo, 2 poster, 3 A4, 4 face mask, 5 upper-body mask, 6 region mask, 7 PC, 8 pad,
    # 9 phone, 10 3D mask
    SPOOF_TYPES = {
        0: ("none", "live"),
        1: ("print", "photo"),
        2: ("print", "poster"),
        3: ("print", "A4"),
        4: ("mask", "face_mask"),
        5: ("mask", "upper_body_mask"),
        6: ("mask", "region_mask"),
        7: ("replay", "pc"),
        8: ("replay", "pad"),
        9: ("replay", "phone"),
        10: ("mask", "3d_mask"),
    }

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.labels: dict[str, list[int]] = {}
        metas = self.root / "metas" / "intra_test"
        for f in sorted(metas.glob("*_label.json")):
            for k, v in json.loads(f.read_text()).items():
                self.labels[str(PurePosixPath(k).with_suffix(""))] = v
        if not self.labels:
            log.warning("%s: no metas/intra_test/*_label.json; spoof types will be 'other'", self.root)

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        parts = [p.lower() for p in rel.parts]
        if len(parts) < 5 or parts[-2] not in ("live", "spoof") or parts[-4] not in ("train", "test"):
            return None
        folder_live = parts[-2] == "live"
        meta = self.labels.get(str(rel.with_suffix("")))
        if meta is not None:
            attack, spoof_type = self.SPOOF_TYPES.get(int(meta[40]), ("other", str(meta[40])))
            if (attack == "none") != folder_live:
                raise SkipFile("label_conflict")
        else:
            attack, spoof_type = ("none", "live") if folder_live else ("other", "unknown")
        return {
            "attack": attack,
            "spoof_type": spoof_type,
            "subject": rel.parts[-3],
            "split": parts[-4],
            "bbox": self._bbox(self.root / rel),
        }

    @staticmethod
    def _bbox(image: Path) -> tuple[float, float, float, float] | None:
        """Box from ``<n>_BB.txt`` (``x y w h score`` on a 224x224 scale) as fractions of the image."""
        bb = image.with_name(image.stem + "_BB.txt")
        try:
            x, y, w, h = (float(t) for t in bb.read_text().split()[:4])
        except (OSError, ValueError):
            return None
        return x / 224, y / 224, w / 224, h / 224


class SiW(Adapter):
    """``{Train,Test}/{live,spoof}/<subject>/<subject>-<sensor>-<type>-<medium>-<session>.mov``;
    type 1 live, 2 print, 3 replay."""

    name, dataset = "siw", "SiW"
    exts = (".mov", ".mp4", ".avi")
    layout = "root/{Train,Test}/{live,spoof}/<subject>/<SSS>-<sensor>-<type 1-3>-<medium>-<session>.mov"
    MEDIA = {
        (2, 1): "print_hq",
        (2, 2): "print_lq",
        (3, 1): "ipad_pro",
        (3, 2): "iphone7",
        (3, 3): "galaxy_s8",
        (3, 4): "asus_mb168b",
    }

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        m = self.match(r"(\d+)-(\d)-([123])-(\d)-(\d)", rel.stem)
        split = self.split_from_parts(rel, _SPLIT_WORDS)
        if not m or split is None:
            return None
        t, medium = int(m[3]), int(m[4])
        attack = {1: "none", 2: "print", 3: "replay"}[t]
        return {
            "attack": attack,
            "spoof_type": self.MEDIA.get((t, medium), "") if t > 1 else "",
            "subject": f"{int(m[1]):03d}",
            "split": split,
            "device": f"sensor{m[2]}",
            "session": m[5],
        }


class SiWMV2(Adapter):
    """``Live/<name>.mov`` and ``Spoof/<Type>/<name>.mov`` (Type e.g. Print, Replay, Mask_Silicone,
    Makeup_Co, Partial_Eye); makeup and partial attacks are ``other``."""

    name, dataset = "siw_m_v2", "SiW-M-V2"
    exts = VIDEO_EXTS
    layout = "root/Live/*.mov, root/Spoof/<Type>/*.mov"

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        parts = [p.lower() for p in rel.parts[:-1]]
        subject = (re.search(r"\d+", rel.stem) or [rel.stem])[0]
        split = self.split_from_parts(rel, _SPLIT_WORDS) or "all"
        if "live" in parts:
            return {"attack": "none", "subject": subject, "split": split}
        if "spoof" not in parts or parts.index("spoof") + 1 >= len(parts):
            return None
        kind = rel.parts[parts.index("spoof") + 1]
        k = kind.lower()
        attack = (
            "print"
            if k.startswith("print")
            else "replay"
            if k.startswith("replay")
            else "mask"
            if k.startswith("mask") or "mannequin" in k or "silicone" in k
            else "other"
        )
        return {"attack": attack, "spoof_type": kind, "subject": subject, "split": split}


class HiFiMask(Adapter):
    """``<split>/<Skin>_<Subject>_<Type>_<Scene>_<Light>_<Sensor>/<frame>.png`` (or a video of that name);
    Type 0 live, 1 transparent, 2 plaster, 3 resin mask."""

    name, dataset = "hifimask", "HiFiMask"
    layout = "root/[train|dev|test/]<Skin>_<Subject>_<Type>_<Scene>_<Light>_<Sensor>/<frame>.{png,jpg} (or .mp4)"
    TYPES = {0: ("none", ""), 1: ("mask", "transparent"), 2: ("mask", "plaster"), 3: ("mask", "resin")}

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        name, video = self.clip_of(rel)
        m = self.match(r"(\d)_(\d+)_(\d)_(\d)_(\d)_(\d)", name)
        if not m or int(m[3]) not in self.TYPES:
            return None
        attack, spoof_type = self.TYPES[int(m[3])]
        return {
            "attack": attack,
            "spoof_type": spoof_type,
            "subject": f"{int(m[2]):02d}",
            "split": self.split_from_parts(rel, _SPLIT_WORDS) or "all",
            "video": video,
            "session": f"scene{m[4]}_light{m[5]}",
            "device": f"sensor{m[6]}",
            "skin": m[1],
        }


class _KeywordLayout(Adapter):
    """Datasets whose folders say live/mask: label from folder words, subject from the first number."""

    LIVE = LIVE_WORDS - {"client"}  # the generic live words, less "client"
    SPOOF_HINTS = ("mask", "spoof", "attack", "fake", "thatsmyface", "real-f", "realf")
    default_attack = "mask"

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        folders = [p.lower() for p in rel.parts[:-1]]
        spoof = next((p for p in folders if any(h in p for h in self.SPOOF_HINTS)), None)
        live = any(p in self.LIVE for p in folders)
        if spoof is None and not live:
            return None
        num = next((p for p in rel.parts[:-1] if p.isdigit()), None) or (re.match(r"\d+", rel.stem) or [None])[0]
        if num is None:
            return None
        attack = "none" if spoof is None else attack_from_words([spoof], self.default_attack)
        return {
            "attack": attack,
            "spoof_type": spoof or "",
            "subject": f"{int(num):02d}",
            "video": self.clip_of(rel)[1],
            "split": self.split_from_parts(rel, _SPLIT_WORDS) or "all",
        }


class CasiaSurf3DMask(_KeywordLayout):
    """``<subject>/{live,mask}/...`` (videos or frames); every spoof is a 3D mask."""

    name, dataset = "casia_surf_3dmask", "CASIA-SURF-3DMask"
    layout = "root/<subject>/{live,mask}/<capture>.{mp4,avi} or .../<capture>/<frame>.jpg"


class HkbuMars(_KeywordLayout):
    """``{real,mask}/...`` with ``<subject>_<session>_<n>.avi`` (masks: ThatsMyFace, REAL-f folders)."""

    name, dataset = "hkbu_mars_v1p", "HKBU-MARs-V1+"
    layout = "root/{real,mask/ThatsMyFace,mask/REAL-f}/<subject>_<session>_<n>.avi"


class RoseYoutu(Adapter):
    """``[train|test/]<client>/<Type>_<...>_<client>_<n>.mp4``; Type G live, Ps/Pq print, Vl/Vm replay,
    Mc/Mf/Mu paper mask."""

    name, dataset = "rose_youtu", "Rose-Youtu"
    exts = VIDEO_EXTS
    layout = "root/[train|test/]<client>/<G|Ps|Pq|Vl|Vm|Mc|Mf|Mu>_<talk>_<device>_<...>_<client>_<n>.mp4"
    TYPES = {
        "g": "none",
        "ps": "print",
        "pq": "print",
        "vl": "replay",
        "vm": "replay",
        "mc": "mask",
        "mf": "mask",
        "mu": "mask",
    }
    DEVICES = {"hs", "hw", "ip", "5s", "zte"}

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        toks = rel.stem.split("_")
        if len(toks) < 4 or toks[0].lower() not in self.TYPES or not toks[-2].isdigit():
            return None
        device = next((t.lower() for t in toks[1:-2] if t.lower() in self.DEVICES), "")
        return {
            "attack": self.TYPES[toks[0].lower()],
            "spoof_type": toks[0] if toks[0].lower() != "g" else "",
            "subject": f"{int(toks[-2]):02d}",
            "split": self.split_from_parts(rel, _SPLIT_WORDS) or "all",
            "device": device,
        }


class WMCA(Adapter):
    """``<client>_<session>_<presenter>_<type>_<pai>`` (BATL naming) as RGB videos or frame folders;
    type 0 bona fide, 1 glasses, 2 fake head, 3 print, 4 replay, 5 rigid, 6 flexible, 7 paper mask.
    The raw ``.hdf5`` captures are counted as skipped: export their RGB stream first."""

    name, dataset = "wmca", "WMCA"
    exts = VIDEO_EXTS + IMAGE_EXTS + (".hdf5", ".h5")
    layout = "root/**/<client>_<session>_<presenter>_<type>_<pai>.{mp4,avi} or .../<that name>/<frame>.png"
    TYPES = {
        0: ("none", "bonafide"),
        1: ("other", "glasses"),
        2: ("mask", "fake_head"),
        3: ("print", "print"),
        4: ("replay", "replay"),
        5: ("mask", "rigid_mask"),
        6: ("mask", "flexible_mask"),
        7: ("mask", "paper_mask"),
    }

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        if rel.suffix.lower() in (".hdf5", ".h5"):
            raise SkipFile("hdf5_not_exported")
        name, video = self.clip_of(rel)
        m = self.match(r"(\d+)_(\d+)_(\d+)_(\d)_(\d+)", name)
        if not m or int(m[4]) not in self.TYPES:
            return None
        attack, spoof_type = self.TYPES[int(m[4])]
        return {
            "attack": attack,
            "spoof_type": spoof_type,
            "subject": f"{int(m[1]):03d}",
            "video": video,
            "session": m[2],
            "split": self.split_from_parts(rel, _SPLIT_WORDS) or "all",
            "pai": m[5],
        }
