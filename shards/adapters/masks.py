"""Naming rules of the mask datasets (HiFiMask, CASIA-SURF 3DMask, HKBU-MARs, WMCA), as distributed.

Each class holds only its dataset's conventions (see docs/datasets.md for the layouts and the
commands). Where a naming field is not part of a release (e.g. no official split), the sample
gets split ``all``.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from shards.adapters.base import SPLIT_WORDS, Adapter, SkipFile
from shards.adapters.generic import LIVE_WORDS, attack_from_words
from shards.video import IMAGE_EXTS, VIDEO_EXTS


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
            "split": self.split_from_parts(rel, SPLIT_WORDS) or "all",
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
            "split": self.split_from_parts(rel, SPLIT_WORDS) or "all",
        }


class CasiaSurf3DMask(_KeywordLayout):
    """``<subject>/{live,mask}/...`` (videos or frames); every spoof is a 3D mask."""

    name, dataset = "casia_surf_3dmask", "CASIA-SURF-3DMask"
    layout = "root/<subject>/{live,mask}/<capture>.{mp4,avi} or .../<capture>/<frame>.jpg"


class HkbuMars(_KeywordLayout):
    """``{real,mask}/...`` with ``<subject>_<session>_<n>.avi`` (masks: ThatsMyFace, REAL-f folders)."""

    name, dataset = "hkbu_mars_v1p", "HKBU-MARs-V1+"
    layout = "root/{real,mask/ThatsMyFace,mask/REAL-f}/<subject>_<session>_<n>.avi"


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
            "split": self.split_from_parts(rel, SPLIT_WORDS) or "all",
            "pai": m[5],
        }
