"""data.augment: each op does what it says, draws only from the given generator, and in the stream
is the same after a resume and absent in evaluation."""
from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from shards.fixtures import face_image
from tests.helpers import shard_stream
from trainer.config import AugmentConfig
from trainer.data import Augment, StreamState, make_loader, resolve_shards
from trainer.sample.prompt import PromptBuilder

OFF = AugmentConfig(enabled=True, crop_scale=1.0, flip=0.0, color=0.0, resample=0.0, blur=0.0, jpeg=0.0)


def face() -> Image.Image:
    return Image.fromarray(face_image(96))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_with_every_op_off_the_image_is_unchanged():
    img = face()
    assert np.array_equal(pixels(Augment(OFF)(img, np.random.default_rng(0))), pixels(img))


@pytest.mark.parametrize("change, check", [
    ({"flip": 1.0}, lambda src, out: np.array_equal(pixels(out), pixels(ImageOps.mirror(src)))),
    ({"crop_scale": 0.5}, lambda src, out: out.size != src.size and out.size[0] * out.size[1] >= 0.45 * 96 * 96),
    ({"color": 0.3}, lambda src, out: out.size == src.size and np.abs(pixels(out) - pixels(src)).mean() > 2),
    ({"resample": 1.0}, lambda src, out: out.size == src.size and np.abs(pixels(out) - pixels(src)).mean() > 1),
    ({"blur": 1.0}, lambda src, out: np.abs(np.diff(pixels(out), axis=1)).mean()
     < np.abs(np.diff(pixels(src), axis=1)).mean()),
    ({"jpeg": 1.0, "jpeg_quality_min": 10}, lambda src, out: out.format == "JPEG" and out.size == src.size),
])
def test_each_op_does_what_it_says(change, check):
    src = face()
    out = Augment(dataclasses.replace(OFF, **change))(src, np.random.default_rng(3))
    assert check(src, out)


def test_the_generator_alone_decides():
    aug = Augment(AugmentConfig(enabled=True, flip=0.5, resample=0.5, blur=0.5, jpeg=0.5))
    a, b, c = (pixels(aug(face(), np.random.default_rng(s))) for s in (7, 7, 8))
    assert np.array_equal(a, b) and (a.shape != c.shape or not np.array_equal(a, c))


@pytest.fixture(scope="module")
def builder(demo_tokenizer):
    return PromptBuilder(demo_tokenizer, 4, 96)


def stream(urls, builder, train=True, resume=None, augment=True):
    s = shard_stream(urls, builder, batch_size=4, shuffle_buffer=8, train=train, resume=resume,
                     augment=Augment(AugmentConfig(enabled=True)) if augment else None)
    return iter(make_loader(s, builder.tokenizer.pad_token_id))


def test_augmentation_is_identical_after_a_resume(small_shards, builder):
    urls = resolve_shards([str(small_shards["domain_a"])])
    unbroken = list(itertools.islice(stream(urls, builder), 7))
    plain = list(itertools.islice(stream(urls, builder, augment=False), 7))
    assert [b["keys"] for b in plain] == [b["keys"] for b in unbroken]  # the same samples, augmented
    assert not torch.equal(unbroken[0]["pixel_values"], plain[0]["pixel_values"])
    state = StreamState()
    for batch in unbroken[:4]:
        state.update(batch["stream_pos"])
    state = StreamState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    resumed = list(itertools.islice(stream(urls, builder, resume=state), 3))
    for got, want in zip(resumed, unbroken[4:]):
        assert got["keys"] == want["keys"] and torch.equal(got["pixel_values"], want["pixel_values"])


def test_evaluation_streams_never_augment(small_shards, builder):
    urls = resolve_shards([str(small_shards["domain_d"])])
    with_aug = next(stream(urls, builder, train=False))
    without = next(stream(urls, builder, train=False, augment=False))
    assert torch.equal(with_aug["pixel_values"], without["pixel_values"])


@pytest.mark.parametrize("override", ["data.augment.jpeg_quality_min=96", "data.augment.flip=1.5",
                                      "data.augment.crop_scale=0"])
def test_impossible_settings_are_config_errors(override):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.augment"):
        load_config(None, [override])
