"""Which raw samples one reader slot (rank x DataLoader worker) reads in each epoch, and where it stands after
yielding a given number of them, computed from shard sizes and seeds alone (no data read): the arithmetic
behind the bounded-time and elastic resumes (docs/architecture.md, "Resume").

An epoch is an ``EpochPlan``: shards read in order (all their samples, or listed offsets), of which the slot
takes sample ``phase + k * stride`` of the concatenation, through a seeded shuffle buffer. A standard epoch
gives the slot every ``slots``-th shard of the epoch's shard order (or, with fewer shards than slots, every
``slots``-th sample). After a change of layout (world size or loader workers) the first epoch is a
transition: the samples the old slots had not yet yielded in their epoch, dealt out over the new slots;
standard epochs follow. ``EpochSchedule`` makes these plans for one shard set (or one label's samples of it)
and streams a slot's shuffled raw samples from any position.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from trainer.data.reader import LabelIndex, RawSample, Reader, read_samples
from trainer.data.rng import Purpose, generator
from trainer.data.shard_sets import ShardSetError
from trainer.data.state import LayoutOrigin

Segment = tuple[str, tuple[int, ...] | None]  # (shard, the sample offsets it contributes; None = all)
LABEL_EMPTY_EPOCHS = 64  # a label part may find none of its label in this many epochs in a row, not more


def replay_shuffle(rng: np.random.Generator, n: int, buffer_size: int, done: int) -> tuple[list[int], int, bool]:
    """The shuffle buffer of an epoch of ``n`` raw samples after it yielded ``done`` of them, on
    indices only: (buffer contents, next index to read, draining). Draws from ``rng`` exactly what
    the live shuffle (EpochSchedule.epoch) draws, so it continues with the same state."""
    if n <= buffer_size:
        order = list(range(n))
        rng.shuffle(order)
        return order[done:], n, True
    streamed = min(done, n - buffer_size)
    buffer = list(range(buffer_size))
    for k, slot in enumerate(rng.integers(buffer_size, size=streamed).tolist()):  # = one draw per yield
        buffer[slot] = buffer_size + k
    if done <= n - buffer_size:
        return buffer, buffer_size + done, False
    rng.shuffle(buffer)
    return buffer[done - streamed:], n, True


@dataclass(frozen=True)
class EpochPlan:
    number: int  # the epoch; a transition carries the number of the epoch it finishes
    segments: tuple[Segment, ...]
    stride: int = 1
    phase: int = 0
    transition: bool = False

    def rng(self, seed: int, slot: int) -> np.random.Generator:
        """The slot's shuffle-buffer draws in this epoch."""
        purpose = Purpose.TRANSITION_SHUFFLE if self.transition else Purpose.EPOCH_SHUFFLE
        return generator(seed, purpose, epoch=self.number, slot=slot)

    @staticmethod
    def _kept(reader: Reader, url: str, offsets: tuple[int, ...]) -> tuple[int, ...]:
        """Listed offsets the shard really has (a damaged shard found shorter than its manifest)."""
        size = reader.expected.get(url)
        return offsets if size is None or not offsets or offsets[-1] < size else tuple(o for o in offsets if o < size)

    def _sizes(self, reader: Reader) -> list[int]:
        return [len(self._kept(reader, url, offsets)) if offsets is not None else reader.size(url)
                for url, offsets in self.segments]

    def length(self, reader: Reader) -> int:
        total = sum(self._sizes(reader))
        return max(0, -(-(total - self.phase) // self.stride))

    def raws(self, reader: Reader, start: int = 0, count_errors: bool = False) -> Iterator[RawSample]:
        """The slot's raw samples from its ``start``-th on (whole segments before it left unread)."""
        first = self.phase + start * self.stride  # index in the concatenation of the first one wanted
        sizes = self._sizes(reader) if start else None
        base = 0  # concatenation index of the segment's first sample
        for i, (url, offsets) in enumerate(self.segments):
            if sizes is not None and base + sizes[i] <= first:
                base += sizes[i]
                continue
            if offsets is None:
                skip = max(0, first - base)
                g = base + skip
                for raw in reader.shard(url, skip, count_errors=count_errors):
                    if (g - self.phase) % self.stride == 0:
                        yield raw
                    g += 1
                base += reader.expected.get(url, g - base)  # the shard's true size, now that it was read
                continue
            kept = self._kept(reader, url, offsets)
            if not kept:
                continue
            position = {offset: j for j, offset in enumerate(kept)}
            for offset, raw in enumerate(reader.shard(url, count_errors=count_errors)):
                j = position.get(offset)
                if j is not None and base + j >= first and (base + j - self.phase) % self.stride == 0:
                    yield raw
                if offset >= kept[-1]:
                    break
            base += len(self._kept(reader, url, kept))  # fewer if reading it just found it short

    def identities(self, reader: Reader, ids: list[int]) -> list[tuple[str, int]]:
        """(shard, offset in the shard) of the slot's samples with these indices."""
        starts = np.cumsum([0] + self._sizes(reader)).tolist()
        found = []
        for k in ids:
            g = self.phase + k * self.stride
            s = bisect.bisect_right(starts, g) - 1
            url, offsets = self.segments[s]
            found.append((url, g - starts[s] if offsets is None else self._kept(reader, url, offsets)[g - starts[s]]))
        return found


@dataclass(frozen=True)
class EpochSchedule:
    """The epochs of one shard set for every slot: with ``label``, only that label's samples (a part of a
    live/spoof balanced source). ``train=False``: one ordered pass, sample i to slot i % slots."""

    urls: tuple[str, ...]
    seed: int
    shuffle_buffer: int
    train: bool = True
    label: str | None = None
    labels: LabelIndex | None = None  # the shards' label offsets, needed with ``label``
    owner: str = "rank 0"  # who reads, for error messages

    def _segment(self, url: str) -> Segment:
        if self.label is None:
            return url, None
        assert self.labels is not None, "a label part needs the shards' label index"
        return url, self.labels.offsets(url, self.label)

    def standard(self, epoch: int, slot: int, slots: int) -> EpochPlan:
        order = list(self.urls)
        if self.train:
            generator(self.seed, Purpose.SHARD_ORDER, epoch=epoch).shuffle(order)
        if len(order) >= slots and self.train:
            return EpochPlan(epoch, tuple(self._segment(u) for u in order[slot::slots]))
        # fewer shards than slots (or evaluation): every slots-th sample
        return EpochPlan(epoch, tuple(self._segment(u) for u in order), stride=slots, phase=slot)

    def plans(self, reader: Reader, slot: int, slots: int, origin: LayoutOrigin | None) -> Iterator[EpochPlan]:
        """The slot's epochs: after a change of layout a transition first, then standard epochs."""
        epoch = 0
        if origin is not None:
            transition = self._transition(reader, slot, slots, origin)
            yield transition
            epoch = transition.number + 1
        while True:
            yield self.standard(epoch, slot, slots)
            epoch += 1

    def position(self, reader: Reader, slot: int, slots: int, consumed: int,
                 origin: LayoutOrigin | None) -> tuple[Iterator[EpochPlan], EpochPlan, int]:
        """(the epochs after it, the epoch, samples done in it) of the slot after ``consumed``: whole
        epochs are skipped by their lengths."""
        plans = self.plans(reader, slot, slots, origin)
        if consumed == 0:  # a fresh start needs no epoch length (a set without manifest is not read for it)
            return plans, next(plans), 0
        empty = 0
        for plan in plans:
            n = plan.length(reader)
            empty = empty + 1 if n <= 0 else 0
            if n <= 0:
                self.check_empty(plan, slot, empty)
            if consumed < n:
                return plans, plan, consumed
            consumed -= n
        raise AssertionError("unreachable: the epochs never end")

    def check_empty(self, plan: EpochPlan, slot: int, in_a_row: int) -> None:
        """An epoch in which the slot has nothing to read: a transition may be empty, and so may a
        label part's epoch (its shards that epoch hold only the other label), but not forever."""
        if plan.transition or (self.label is not None and in_a_row < LABEL_EMPTY_EPOCHS):
            return
        what = f"no {self.label} samples" if self.label else "no samples"
        raise ShardSetError(f"{self.owner} slot {slot}: shards {list(self.urls[:3])}... hold {what} for it")

    def _remaining(self, reader: Reader, slot: int, origin: LayoutOrigin) -> tuple[int, list[tuple[str, int]]]:
        """(epoch, the (shard, offset) of every sample old slot ``slot`` of ``origin`` had not yet yielded in it)."""
        _, plan, done = self.position(reader, slot, origin.slots, origin.consumed.get(slot, 0), origin.parent)
        n = plan.length(reader)
        ids, next_read, draining = replay_shuffle(plan.rng(self.seed, slot), n, origin.shuffle_buffer, done)
        return plan.number, plan.identities(reader, ids if draining else ids + list(range(next_read, n)))

    def _transition(self, reader: Reader, slot: int, slots: int, origin: LayoutOrigin) -> EpochPlan:
        """What the old slots had left of their epoch, dealt out by shard over the new slots."""
        left: dict[str, set[int]] = {}
        epoch = 0
        for old_slot in range(origin.slots):
            number, places = self._remaining(reader, old_slot, origin)
            epoch = max(epoch, number)
            for url, offset in places:
                left.setdefault(url, set()).add(offset)
        rank_of = {u: i for i, u in enumerate(self.urls)}
        shards = sorted(left, key=rank_of.__getitem__)
        generator(self.seed, Purpose.TRANSITION_SHARDS, epoch=epoch).shuffle(shards)
        segments = tuple((u, tuple(sorted(left[u]))) for u in shards)
        if len(segments) >= slots:
            return EpochPlan(epoch, segments[slot::slots], transition=True)
        return EpochPlan(epoch, segments, stride=slots, phase=slot, transition=True)

    def epoch(self, reader: Reader, slot: int, plan: EpochPlan, done: int,
              count_errors: bool) -> Iterator[RawSample]:
        """The shuffled raw samples of one epoch after the first ``done``."""
        rng = plan.rng(self.seed, slot)
        buffer: list[RawSample] = []
        start = 0
        if done:
            ids, start, draining = replay_shuffle(rng, plan.length(reader), self.shuffle_buffer, done)
            found = read_samples(reader, plan.identities(reader, ids))
            if any(raw is None for raw in found):
                raise ShardSetError(f"{self.owner} slot {slot}: shards changed since the checkpoint (a sample "
                                    "the resumed shuffle buffer needs is gone); resume with the run's own shards")
            buffer = found  # type: ignore[assignment]
            if draining:
                yield from buffer
                return
        for raw in plan.raws(reader, start, count_errors):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], raw = raw, buffer[i]
            yield raw
        rng.shuffle(buffer)
        yield from buffer

    def shuffled(self, reader: Reader, slot: int, slots: int, consumed: int, origin: LayoutOrigin | None,
                 count_tar_errors: bool) -> Iterator[tuple[RawSample, bool]]:
        """The slot's infinite shuffled raw stream after its first ``consumed`` samples, each with whether it
        comes from the first pass (where bad samples are counted: every later pass meets them again).
        ``count_tar_errors``: this slot counts broken tars (with a sample-level split every slot reads every
        shard, and only one may count); a transition re-reads shards whose damage the old slots counted."""
        plans, plan, done = self.position(reader, slot, slots, consumed, origin)
        empty = 0  # epochs in a row in which the slot had nothing
        while True:
            first_pass = plan.number == 0
            yielded = 0
            for raw in self.epoch(reader, slot, plan, done, first_pass and count_tar_errors and not plan.transition):
                yielded += 1
                yield raw, first_pass
            empty = 0 if yielded or done else empty + 1
            if empty:
                self.check_empty(plan, slot, empty)
            plan, done = next(plans), 0

    def transition_length(self, reader: Reader, slot: int, slots: int, origin: LayoutOrigin | None) -> int:
        """Samples of the transition epoch the slot delivers first after a change of layout (0 if none)."""
        return 0 if origin is None else next(self.plans(reader, slot, slots, origin)).length(reader)
