"""Every random stream of the data pipeline, derived in one place from (run seed, purpose, keys).

Each purpose names what its draws decide and the keys that tell its streams apart. The seed sequence
of a stream is ``[seed, *keys, tag]`` (the shard order has no tag): a layout fixed once, because a
checkpoint's stream positions are positions in these streams, so changing it would make every resumed
run read other samples than the unbroken one. Different purposes differ in their tag or in the number
of keys, so no two streams share a seed sequence.
"""
from __future__ import annotations

import enum

import numpy as np


class Purpose(enum.Enum):
    """(tag, key names) of each random stream."""

    SHARD_ORDER = (None, ("epoch",))  # the order of a shard set's shards in an epoch (all slots agree)
    EPOCH_SHUFFLE = (1, ("epoch", "slot"))  # a slot's shuffle buffer in a standard epoch
    TRANSITION_SHUFFLE = (2, ("epoch", "slot"))  # a slot's shuffle buffer in a transition epoch
    TRANSITION_SHARDS = (3, ("epoch",))  # the order an old layout's unfinished shards are dealt out in
    AUGMENT = (4, ("slot", "position"))  # one sample's augmentation, by its place in the slot's stream
    SOURCE_CHOOSER = (5, ("slot",))  # a slot's draws among weighted sources

    @property
    def tag(self) -> int | None:
        return self.value[0]

    @property
    def keys(self) -> tuple[str, ...]:
        return self.value[1]


def generator(seed: int, purpose: Purpose, **keys: int) -> np.random.Generator:
    """The generator of ``purpose``'s stream for these keys, e.g. ``generator(seed, Purpose.AUGMENT, slot=1,
    position=42)``; every key of the purpose must be given."""
    if set(keys) != set(purpose.keys):
        raise TypeError(f"{purpose.name} is keyed by {purpose.keys}, got {tuple(keys)}")
    entropy = [seed, *(keys[name] for name in purpose.keys)]
    return np.random.default_rng(entropy if purpose.tag is None else [*entropy, purpose.tag])
