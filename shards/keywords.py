"""The spoof-keyword dictionary of SCF (``shards/data/keywords.json``, editable) and the matcher
that finds which cues a caption or an explanation names. Shared by the SCF caption filter
(shards.scf) and the explanation metrics (trainer.eval.explain), so both count cues the same way.
"""
from __future__ import annotations

import importlib.resources
import json
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Mapping

KEYWORDS_PATH = Path(str(importlib.resources.files("shards") / "data" / "keywords.json"))
NEGATIONS = frozenset({"no", "not", "without", "nothing", "never", "neither", "nor"})
NEGATION_WINDOW = 3  # words looked back for a negation, inside one clause
_CLAUSE = re.compile(r"[.,;:!?()\n]")
_WORD = re.compile(r"[a-z0-9]+")


def load_keywords(path: str | Path | None = None) -> dict[str, tuple[tuple[str, ...], ...]]:
    """attack type (and "live") -> keywords, each as a tuple of normalised words."""
    p = Path(path) if path is not None else KEYWORDS_PATH
    if not p.is_file():
        raise FileNotFoundError(f"keyword dictionary {p} does not exist; restore shards/data/keywords.json")
    raw = json.loads(p.read_text())
    return {group: tuple(tuple(_words(k)) for k in words) for group, words in raw.items() if not group.startswith("_")}


def _words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))  # moiré -> moire
    return _WORD.findall(text)


def _matches(word: str, key: str) -> bool:
    return word == key or word == key + "s" or word == key + "es"


def find_cues(text: str, keywords: Mapping[str, tuple[tuple[str, ...], ...]]) -> dict[str, set[str]]:
    """Group -> the keywords ``text`` names, not counting negated ones ("no moire", "without pores")."""
    found: dict[str, set[str]] = defaultdict(set)
    for clause in _CLAUSE.split(text):
        words = _words(clause)
        for group, keys in keywords.items():
            for key in keys:
                n = len(key)
                for i in range(len(words) - n + 1):
                    if all(_matches(words[i + j], key[j]) if j == n - 1 else words[i + j] == key[j] for j in range(n)):
                        if not NEGATIONS.intersection(words[max(0, i - NEGATION_WINDOW):i]):
                            found[group].add(" ".join(key))
                            break
    return dict(found)
