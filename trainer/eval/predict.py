"""Prediction on face images (the library of ``ifas-predict``, trainer/cli/predict.py): judgment,
liveness score and a generated explanation per input.

    ifas-predict --model runs/demo/export --threshold-from runs/demo/calibration.json \
        face1.jpg photos/ data/demo/domain_d --out predictions.jsonl

Inputs are image files, folders (searched recursively for images) or shard sets (a directory
with manifest.json or .tar shards, or a .tar file). The score is P(Yes) among {Yes, No} at the
first answer position (one forward pass); the judgment is score >= threshold, with the threshold
given, read from an ifas-eval output (calibration.json or eval_metrics.json), or 0.5. Images are
read as a person sees them (``shards.io.open_image``: EXIF orientation, 16-bit grey, alpha on white). The
explanation is generated after that judgment (see trainer.eval.explain); --no-explain skips it.
--face-crop finds the largest frontal face in a raw photo first with the shards' face detector
(``shards.faces``) and scores the crop made by the shards' crop rule, as the shards hold face crops.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from shards.io import open_image
from shards.manifest import MANIFEST_NAME
from trainer.data import BadSample, ImageTransform, ShardSetError, collate, decode_sample, resolve_shards
from trainer.eval.explain import generate_explanations
from trainer.eval.scoring import PROMPT_ONLY_MAX_LENGTH
from trainer.model.ifas import IFASModel
from trainer.sample.prompt import PromptBuilder

log = logging.getLogger("ifas.predict")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Item:
    """One input: an image to predict, or (``image`` None) the reason it could not be read."""

    path: str  # file path, or "<shard url>#<key>" for a shard sample
    image: Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # label/attack of shard samples
    error: str | None = None


def crop_face(image: Image.Image, size: int) -> tuple[Image.Image, list[float] | None]:
    """(face crop, normalised [x, y, w, h] box) by the shards' detector and crop rule (so a raw
    photo is cropped as the training shards were), or (the image unchanged, None) without a face."""
    from shards.faces import FaceCropper, detect_face

    rgb = np.asarray(image.convert("RGB"))
    box = detect_face(rgb)
    if box is None:
        return image, None
    return Image.fromarray(FaceCropper(mode="auto", size=size).crop(rgb, box)), [round(float(v), 4) for v in box]


def _is_shard_set(path: Path) -> bool:
    return path.suffix == ".tar" or (path.is_dir() and ((path / MANIFEST_NAME).is_file() or any(path.glob("*.tar"))))


def iter_inputs(specs: list[str]) -> Iterator[Item]:
    """Items of image files, folders (recursive, sorted) and shard sets, in the order given. An input
    that cannot be read (a missing path, a file that is no image, a damaged shard or sample) becomes
    an Item with its ``error``: it is reported, never silently dropped, and never stops the others."""
    for spec in specs:
        path = Path(spec)
        if not path.exists():
            yield Item(spec, error="does not exist (give image files, folders or shard sets)")
        elif _is_shard_set(path):
            try:
                urls = resolve_shards([spec], f"input {spec}")
            except ShardSetError as exc:
                yield Item(spec, error=str(exc))
                continue
            for url in urls:
                yield from _shard_items(url)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                log.warning("folder %s holds no images (%s)", path, ", ".join(IMAGE_SUFFIXES))
            yield from (_file_item(p) for p in files)
        else:
            yield _file_item(path)


def _file_item(path: Path) -> Item:
    try:
        return Item(str(path), open_image(path))
    except Exception as exc:  # noqa: BLE001 - PIL and the OS raise many types for unreadable files
        return Item(str(path), error=f"not a readable image ({type(exc).__name__}: {exc})")


def _shard_items(url: str) -> Iterator[Item]:
    """The samples of one shard; a damaged tar or sample is an error Item and reading goes on."""
    import webdataset as wds

    damage: list[str] = []

    def handler(exc: Exception) -> bool:  # webdataset may report one broken tar twice: keep it once
        message = f"damaged shard ({type(exc).__name__}: {exc})"
        if message not in damage:
            damage.append(message)
        return True

    reported = 0
    for raw in wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                              empty_check=False, handler=handler):
        for message in damage[reported:]:
            yield Item(url, error=message)
        reported = len(damage)
        try:
            image, meta = decode_sample(raw)
        except BadSample as exc:
            yield Item(f"{url}#{raw.get('__key__', '?')}", error=f"{exc.reason}: {exc}")
            continue
        yield Item(f"{url}#{raw['__key__']}", image,
                   {"label": meta["label"], "attack": meta["attack"], "dataset": meta["dataset"]})
    for message in damage[reported:]:
        yield Item(url, error=message)


@torch.no_grad()
def predict_batch(model: IFASModel, tokenizer, images: list[Image.Image], threshold: float = 0.5,
                  explain: bool = True, max_new_tokens: int = 48) -> list[tuple[float, str, str]]:
    """(score, judgment, explanation) per image."""
    dev = next(model.parameters()).device
    builder = PromptBuilder(tokenizer, model.num_image_tokens, PROMPT_ONLY_MAX_LENGTH,
                            image_span=model.arch.image_span)
    transform = ImageTransform.for_model(model.arch)
    enc = builder.encode_prompt()
    samples = [{"input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
                "score_position": enc.score_position, "image_positions": enc.image_positions,
                "pixel_values": transform(image), "live": 0,
                "key": str(i), "meta": {}} for i, image in enumerate(images)]
    batch = collate(samples, tokenizer.pad_token_id)
    inputs = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "pixel_values", "score_positions",
                                             "image_positions")}
    scores = model(**inputs).scores.cpu().tolist()
    live = [s >= threshold for s in scores]
    texts = (generate_explanations(model, tokenizer, inputs["input_ids"], inputs["pixel_values"], live, "greedy",
                                   max_new_tokens) if explain else [""] * len(images))
    return [(s, "Yes" if lv else "No", t) for s, lv, t in zip(scores, live, texts)]


def predict(model: IFASModel, tokenizer, paths: list[Path], threshold: float = 0.5, explain: bool = True,
            max_new_tokens: int = 48) -> list[dict[str, Any]]:
    """Records for image files (the library entry point; the command streams any input kind)."""
    images = [open_image(p) for p in paths]
    return [{"path": str(p), "judgment": j, "score": s, "threshold": threshold, "explanation": e}
            for p, (s, j, e) in zip(paths, predict_batch(model, tokenizer, images, threshold, explain, max_new_tokens))]


def batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    """Items in order, in lists holding ``size`` readable images (error Items ride along in place)."""
    batch: list[Item] = []
    readable = 0
    for item in items:
        batch.append(item)
        readable += item.image is not None
        if readable == size:
            yield batch
            batch, readable = [], 0
    if batch:
        yield batch
