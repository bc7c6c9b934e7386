"""Adapters for data that follows no dataset's own naming: list files and live/spoof folders."""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

from shards.adapters.base import Adapter, AdapterError, Skip
from shards.schema import ATTACKS

log = logging.getLogger(__name__)

LIVE_WORDS = {"live", "real", "genuine", "bonafide", "bona_fide", "client"}
SPOOF_WORDS = {"spoof", "attack", "fake", "imposter", "impostor"}


def attack_from_words(parts: list[str] | tuple[str, ...], default: str = "other") -> str:
    """Guess the attack type from path words (``print``/``replay``/``mask``...)."""
    text = " ".join(parts).lower()
    for attack, words in (
        ("print", ("print", "paper", "photo")),
        ("replay", ("replay", "video", "screen", "display", "ipad", "iphone")),
        ("mask", ("mask", "3d", "silicone", "resin", "mannequin")),
    ):
        if any(w in text for w in words):
            return attack
    return default


class ListFileAdapter(Adapter):
    """Lines ``relative/path <label>`` (e.g. the CASIA-FAS-Dataset protocol lists).

    ``live_label`` says which label value means live (lists disagree: some write 1 for live,
    some 0); every other value is spoof. Paths are relative to ``--root``; the attack type is
    guessed from path words (``other`` when none). Options: ``list`` (required), ``live_label``
    (required: no polarity is safe to assume), ``split`` (default ``all``), ``dataset`` (default: the list file's stem).
    """

    name = "list"
    dataset = "list"
    layout = "root/<any path named in the list>; list lines: `relative/path <label>`"

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        lst = options.get("list")
        if not lst:
            raise AdapterError("the list adapter needs --list FILE (lines `relative/path <label>`)")
        self.list_path = Path(lst)
        if not self.list_path.is_file():
            raise AdapterError(f"{self.list_path}: list file not found (pass --list with an existing file)")
        lines = [ln.strip().rsplit(maxsplit=1) for ln in self.list_path.read_text(encoding="utf-8").splitlines()
                 if not ln.lstrip().startswith("#")]
        labels = sorted({parts[1] for parts in lines if len(parts) == 2})
        if options.get("live_label") is None:
            raise AdapterError(f"{self.list_path}: pass --live-label: the label value that means live (its labels: "
                               f"{', '.join(labels[:10])}; lists disagree on 1 vs 0, so there is no default)")
        self.live_label = str(options["live_label"])
        if self.live_label not in labels:  # a spoof-only list is legitimate, a wrong polarity is not: say so
            log.warning("%s: no line has the live label %r (its labels: %s): every sample will be spoof",
                        self.list_path, self.live_label, ", ".join(labels[:10]))
        self.split = str(options.get("split") or "all")
        self.dataset = str(options.get("dataset") or self.list_path.stem)  # type: ignore[misc]

    def items(self):  # type: ignore[override]
        for n, line in enumerate(self.list_path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.strip().rsplit(maxsplit=1)
            if not parts or line.lstrip().startswith("#"):
                continue
            if len(parts) != 2:
                yield Skip(f"{self.list_path.name}:{n}", "bad_list_line")
                continue
            rel, lab = PurePosixPath(parts[0].removeprefix("./")), parts[1]
            if not (self.root / rel).is_file():
                yield Skip(str(rel), "missing_file")
                continue
            attack = "none" if lab == self.live_label else attack_from_words(rel.parts[:-1] + (rel.stem,))
            subject = rel.parts[-2] if len(rel.parts) > 1 else rel.stem
            video = self.clip_of(rel)[1]  # frames of one folder = one video
            yield self.make_item(rel, {"attack": attack, "subject": subject, "split": self.split, "video": video})


class FolderAdapter(Adapter):
    """``root/{live,spoof}/...`` (also real/fake/attack); attack type from the sub-folder words.

    ``root/spoof/print/x.jpg`` -> print; ``root/spoof/x.jpg`` -> ``other``. An optional first
    level ``train|dev|val|test`` sets the split. Options: ``dataset`` (default: root folder name).
    """

    name = "folder"
    dataset = "folder"
    layout = "root/[train|dev|test/]{live,spoof}/[<attack type>/]...*.{jpg,png,avi,mov,mp4}"

    def __init__(self, root: str | Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.dataset = str(options.get("dataset") or self.root.name)  # type: ignore[misc]

    def parse(self, rel: PurePosixPath) -> dict[str, Any] | None:
        parts = [p.lower() for p in rel.parts[:-1]]
        split = (
            self.split_from_parts(rel, {"train": "train", "dev": "dev", "devel": "dev", "val": "dev", "test": "test"})
            or "all"
        )
        for i, p in enumerate(parts):
            rest = list(rel.parts[i + 1 : -1])
            if p in LIVE_WORDS:
                attack = "none"
            elif p in SPOOF_WORDS:
                if rest and rest[0].lower() in ATTACKS:
                    attack = rest.pop(0).lower()
                else:
                    attack = attack_from_words(rest)
            else:
                continue
            subject = rest[-1] if rest else rel.stem  # the folder holding the file, else the file itself
            return {"attack": attack, "subject": subject, "split": split}
        return None
