"""Raw shard samples -> model samples: decode, hold out the dev samples, augment (training), encode the prompt
and answer, transform the image. ``SampleMaker`` holds the choices a run makes once; the stream calls it per
sample with the sample's place in its reader's stream (what seeds its augmentation)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shards.captions import template_caption
from shards.schema import is_live
from trainer.data.augment import Augment
from trainer.data.decode import decode_sample
from trainer.data.reader import RawSample
from trainer.data.rng import Purpose, generator
from trainer.data.transform import ImageTransform
from trainer.sample.prompt import EncodedSample, PromptBuilder

Sample = dict[str, Any]  # one sample's tensors and lists, as ``batching.collate`` pads them into a batch


@dataclass(frozen=True)
class HeldOut:
    """Samples training never sees: those of ``split`` ("" = all) in these shards, which fix the decision
    threshold instead (eval.dev_shards; docs/architecture.md, "Thresholds")."""

    split: str
    shards: frozenset[str]

    def holds(self, url: str | None, split: Any) -> bool:
        return url in self.shards and (not self.split or split == self.split)

    def holds_raw(self, raw: RawSample) -> bool:
        """From the json member's split alone, before decoding (a bad json has none; decoding counts it)."""
        try:
            split = json.loads(raw["json"]).get("split")
        except (KeyError, ValueError, AttributeError):
            split = None
        return self.holds(raw.get("__url__"), split)


def sample_tensors(enc: EncodedSample, pixels: Any, meta: dict[str, Any], key: str) -> Sample:
    return {
        "input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
        "score_position": enc.score_position, "image_positions": enc.image_positions, "pixel_values": pixels,
        "live": int(is_live(meta)), "key": key, "meta": meta,
    }


@dataclass(frozen=True)
class SampleMaker:
    builder: PromptBuilder
    transform: ImageTransform
    with_answers: bool = True  # False: the prompt alone (evaluation, prediction)
    caption_source: str = "shards"  # shards: each sample's caption; template: its attack's template sentence
    augment: Augment | None = None  # training only
    held_out: HeldOut | None = None
    seed: int = 0  # the run's seed, for the augmentation's draws

    def is_held_out(self, raw: RawSample, meta: dict[str, Any] | None = None) -> bool:
        if self.held_out is None:
            return False
        if meta is None:
            return self.held_out.holds_raw(raw)
        return self.held_out.holds(raw.get("__url__"), meta.get("split"))

    def __call__(self, raw: RawSample, slot: int, position: int) -> Sample | None:
        """The sample, or None when it is held out; raises ``BadSample`` (decode.py) for one that cannot be used."""
        image, meta = decode_sample(raw)
        if self.is_held_out(raw, meta):
            return None
        if self.augment is not None:  # seeded by the sample's place in the stream: the same after a resume
            image = self.augment(image, generator(self.seed, Purpose.AUGMENT, slot=slot, position=position))
        if self.with_answers:
            caption = (meta.get("caption", "") if self.caption_source == "shards"
                       else template_caption(meta.get("attack", "none"), raw["__key__"]))
            enc = self.builder.encode(is_live(meta), caption)
        else:
            enc = self.builder.encode_prompt()
        # uint8 to the model, which normalises on the device (trainer/sample/pixels.py)
        return sample_tensors(enc, self.transform.pixels(image), meta, raw["__key__"])
