"""Adapter base: walk a dataset as its owners distribute it and say what every file is.

A per-dataset adapter only holds naming rules (``parse``); walking, filtering by extension,
skip bookkeeping and the output record (``Item``) live here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterator

from shards.video import IMAGE_EXTS, VIDEO_EXTS, is_video

SPLITS = ("train", "dev", "test", "all")
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS

# Split folder names of the public releases (case-insensitive), for ``Adapter.split_from_parts``.
SPLIT_WORDS = {
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


class SkipFile(Exception):
    """Raised by ``parse`` for a file the dataset ships but no sample should come from."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AdapterError(ValueError):
    """The dataset root or an adapter option is wrong (one line naming the path and the fix)."""


@dataclass
class Item:
    """One source file (an image or a video) with everything its name and folder say."""

    path: Path
    rel: str
    label: str  # live | spoof
    attack: str  # none | print | replay | mask | other
    subject: str
    split: str
    video: str  # groups frames of one capture (a video file or a folder of frames)
    session: str = ""
    device: str = ""
    spoof_type: str = ""  # the dataset's own fine attack name (e.g. "A4", "ipad_video")
    bbox: tuple[float, float, float, float] | None = None  # normalised x, y, w, h
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skip:
    """A file that yields no sample, with the reason the manifest counts."""

    rel: str
    reason: str


def live_or(attack: str) -> tuple[str, str]:
    """(label, attack) from an attack name; ``none`` means live."""
    return ("live", "none") if attack == "none" else ("spoof", attack)


class Adapter:
    """Base class: subclasses set ``name``/``dataset`` and implement ``parse``.

    ``parse(rel)`` gets the path relative to the root (POSIX) and returns a dict with keys
    ``attack`` (label follows), ``subject``, ``split`` and optionally ``video``, ``session``,
    ``device``, ``spoof_type``, ``bbox``; it returns None for a name it does not understand
    (counted as ``unknown_naming``) or raises ``SkipFile(reason)``.
    """

    name: ClassVar[str] = ""
    dataset: ClassVar[str] = ""
    exts: ClassVar[tuple[str, ...]] = MEDIA_EXTS  # the file types the dataset ships samples as
    layout: ClassVar[str] = ""  # the expected folder layout, listed by `ifas-shards build --help`
    # The face locations the release ships ("" = none; --face release refuses such a dataset) and, for
    # per-video files, their format (shards.face_locations) and extension, beside each video or in a
    # face-locations/ tree mirroring the videos' paths under the root.
    face_locations: ClassVar[str] = ""
    face_format: ClassVar[str] = ""
    face_ext: ClassVar[str] = ""

    def __init__(self, root: str | Path, **options: Any) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise AdapterError(
                f"{self.root}: dataset root is not a directory "
                f"(pass the folder that holds {self.dataset or 'the data'})"
            )
        self.options = options

    # -- walking -----------------------------------------------------------------------------
    def _walk(self) -> list[PurePosixPath]:
        """Every non-hidden file under the root, relative and sorted (the build's stable sample order)."""
        out = []
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root)
            if p.is_file() and not any(s.startswith(".") for s in rel.parts):
                out.append(PurePosixPath(rel.as_posix()))
        return sorted(out)

    def items(self) -> Iterator[Item | Skip]:
        """Every media file as an Item, or a Skip with its reason. An image or video of a type this
        dataset does not ship (a .png among OULU-NPU's videos) is counted (``unexpected_file_type``);
        other files (protocol lists, face boxes, READMEs) are the dataset's metadata, not samples."""
        for rel in self._walk():
            suffix = rel.suffix.lower()
            if suffix not in self.exts:
                if suffix in MEDIA_EXTS:
                    yield Skip(str(rel), "unexpected_file_type")
                continue
            try:
                fields = self.parse(rel)
            except SkipFile as s:
                yield Skip(str(rel), s.reason)
                continue
            if fields is None:
                yield Skip(str(rel), "unknown_naming")
                continue
            yield self.make_item(rel, fields)

    def make_item(self, rel: PurePosixPath, fields: dict[str, Any]) -> Item:
        fields = dict(fields)
        label, attack = live_or(fields.pop("attack"))
        fields.setdefault("video", str(rel.with_suffix("")))
        fields["subject"] = str(fields["subject"])
        known = {k: fields.pop(k) for k in list(fields) if k in Item.__dataclass_fields__}
        return Item(path=self.root / rel, rel=str(rel), label=label, attack=attack, extra=fields, **known)

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def face_file(self, item: Item) -> Path | None:
        """The release's face-location file of a video, or None (then every frame uses the detector).
        A name with an inner suffix (SiW's ``NNN-2-1-M-S.m.mov``) may have its file with or without it."""
        if not self.face_format:
            return None
        rel = PurePosixPath(item.rel)
        stems = [rel.stem] + ([rel.stem.rsplit(".", 1)[0]] if "." in rel.stem else [])
        for stem in stems:
            for folder in (self.root / rel.parent, self.root / "face-locations" / rel.parent):
                path = folder / (stem + self.face_ext)
                if path.is_file():
                    return path
        return None

    def frame_fields(self, item: Item, width: int, height: int) -> dict[str, Any]:
        """Fields only the decoded frame can tell (e.g. CASIA-MFSD's camera from its resolution); they
        override what ``parse`` said. None by default."""
        return {}

    # -- helpers for naming rules ------------------------------------------------------------
    @staticmethod
    def split_from_parts(rel: PurePosixPath, mapping: dict[str, str]) -> str | None:
        """First folder name (case-insensitive) found in ``mapping`` -> split."""
        for part in rel.parts[:-1]:
            s = mapping.get(part.lower())
            if s:
                return s
        return None

    @staticmethod
    def clip_of(rel: PurePosixPath) -> tuple[str, str]:
        """(name, video id) of the capture a file belongs to: a video file is its own capture; an image
        is a frame of its folder's capture (datasets that ship frames store one capture per folder)."""
        if is_video(rel):
            return rel.stem, str(rel.with_suffix(""))
        return rel.parent.name, str(rel.parent)

    @staticmethod
    def match(pattern: str, text: str) -> re.Match | None:
        return re.fullmatch(pattern, text, flags=re.IGNORECASE)
