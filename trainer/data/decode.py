"""Decoding one raw webdataset sample into (image, validated metadata); a sample that cannot be used raises
``BadSample`` with its reason, which the stream counts and skips (never fatal)."""
from __future__ import annotations

import json
from typing import Any

from PIL import Image

from shards.io import open_image
from shards.schema import SchemaError, image_member, validate_meta

SKIP_REASONS = ("unreadable_shard", "corrupt_tar", "missing_member", "bad_json", "bad_image")


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_sample(raw: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one raw webdataset sample into (image, validated metadata); raise BadSample."""
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    try:
        _, image_bytes = image_member(raw, key)
    except SchemaError as exc:
        raise BadSample("missing_member", f"{url}: {exc}") from exc
    if "json" not in raw:
        raise BadSample("missing_member", f"sample {key} in {url}: has no .json member")
    try:
        meta = validate_meta(json.loads(raw["json"]), key)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError and SchemaError are ValueErrors
        raise BadSample("bad_json", f"sample {key} in {url}: {exc}") from exc
    try:
        image = open_image(image_bytes)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for garbage bytes
        raise BadSample("bad_image", f"sample {key} in {url}: undecodable image ({exc})") from exc
    return image, meta
