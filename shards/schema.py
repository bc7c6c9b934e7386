"""The sample schema every shard in this project follows (docs/architecture.md, "Parts").

A sample is two tar members sharing a key: one image, ``<key>.jpg`` (the face crop; the builders
write JPEG) or ``<key>.png``/``<key>.jpeg`` (lossless or hand-made sets), and ``<key>.json`` (the
metadata below). Keys are unique inside a shard set and stable across rebuilds. The loader, prediction
and ``ifas-shards verify`` all take the image through ``image_member``, so they accept the same samples.
"""
from __future__ import annotations

from typing import Any

LABELS = ("live", "spoof")
ATTACKS = ("none", "print", "replay", "mask", "other")
CAPTION_SOURCES = ("spoof_aware", "general", "template", "none")
IMAGE_MEMBERS = ("jpg", "jpeg", "png")  # a sample holds exactly one of these
REQUIRED_FIELDS = ("label", "attack", "dataset", "subject", "video", "caption", "caption_source")

QUESTION = "Is this photo of a real person?"
# What SCF asks a captioner (ifas-shards caption) and what its fine-tuning trains on (data.task=caption).
CAPTION_PROMPT = "Describe this face image in detail, including any signs that it is not a real person."


class SchemaError(ValueError):
    """A sample's metadata does not follow the shard schema."""


def validate_meta(meta: dict[str, Any], key: str = "?") -> dict[str, Any]:
    """Check one sample's metadata; return it unchanged or raise SchemaError naming the field."""
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        raise SchemaError(f"sample {key}: missing field(s) {missing}")
    if meta["label"] not in LABELS:
        raise SchemaError(f"sample {key}: label {meta['label']!r} is not one of {LABELS}")
    if meta["attack"] not in ATTACKS:
        raise SchemaError(f"sample {key}: attack {meta['attack']!r} is not one of {ATTACKS}")
    if (meta["label"] == "live") != (meta["attack"] == "none"):
        raise SchemaError(f"sample {key}: label {meta['label']!r} contradicts attack {meta['attack']!r}")
    if meta["caption_source"] not in CAPTION_SOURCES:
        raise SchemaError(f"sample {key}: caption_source {meta['caption_source']!r} is not one of {CAPTION_SOURCES}")
    return meta


def image_member(sample: dict[str, Any], key: str = "?") -> tuple[str, bytes]:
    """(extension, bytes) of a raw sample's one image member; SchemaError when it has none or several."""
    found = [ext for ext in IMAGE_MEMBERS if ext in sample]
    if len(found) != 1:
        what = "no image member" if not found else f"{len(found)} image members ({', '.join(found)})"
        raise SchemaError(f"sample {key}: {what}; a sample holds exactly one of "
                          f"{', '.join('.' + e for e in IMAGE_MEMBERS)} (shards/schema.py)")
    return found[0], sample[found[0]]


def is_live(meta: dict[str, Any]) -> bool:
    return meta["label"] == "live"
