"""Naming rules of the multi-attack datasets (CelebA-Spoof, SiW, SiW-M-V2, Rose-Youtu), as distributed.

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

from shards.adapters.base import SPLIT_WORDS, Adapter, SkipFile
from shards.video import IMAGE_EXTS, VIDEO_EXTS

log = logging.getLogger(__name__)


class CelebASpoof(Adapter):
    """``Data/{train,test}/<id>/{live,spoof}/<n>.{jpg,png}`` + ``<n>_BB.txt`` (face box on a 224 scale);
    spoof type = index 40 of ``metas/intra_test/{train,test}_label.json``."""

    name, dataset = "celeba_spoof", "CelebA-Spoof"
    exts = IMAGE_EXTS
    layout = (
        "root/Data/{train,test}/<id>/{live,spoof}/<n>.{jpg,png} + <n>_BB.txt; "
        "root/metas/intra_test/{train,test}_label.json"
    )
    face_locations = "a box per image in <n>_BB.txt"
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
    """``{Train,Test}/{live,spoof}/<subject>/<subject>-<sensor>-<type>-<medium>-<session>[.m].mov``;
    type 1 live, 2 print, 3 replay. The release names the sensor-2 live videos of subjects 153, 154, 158
    and 161 ``NNN-2-1-M-S.m.mov`` (an extra ``.m``): the same capture naming, accepted as such."""

    name, dataset = "siw", "SiW"
    exts = (".mov", ".mp4", ".avi")
    layout = "root/{Train,Test}/{live,spoof}/<subject>/<SSS>-<sensor>-<type 1-3>-<medium>-<session>[.m].mov"
    face_locations, face_format, face_ext = "per-frame boxes in <video>.face", "line_xyxy", ".face"
    MEDIA = {
        (2, 1): "print_hq",
        (2, 2): "print_lq",
        (3, 1): "ipad_pro",
        (3, 2): "iphone7",
        (3, 3): "galaxy_s8",
        (3, 4): "asus_mb168b",
    }

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        m = self.match(r"(\d+)-(\d)-([123])-(\d)-(\d)(?:\.m)?", rel.stem)
        split = self.split_from_parts(rel, SPLIT_WORDS)
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
        split = self.split_from_parts(rel, SPLIT_WORDS) or "all"
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
            "split": self.split_from_parts(rel, SPLIT_WORDS) or "all",
            "device": device,
        }
