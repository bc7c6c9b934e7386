"""One rank's sample stream over shard sets, and its exact, bounded-time resume.

Every (rank, DataLoader worker) slot is a reader: in each epoch it reads its own shards (the
epoch's seeded shard order, every n-th shard), or with fewer shards than slots every n-th
sample, shuffles the raw samples in a seeded buffer and only then decodes. Training is counted
in steps, so the stream is infinite.

A reader's position is one number: the raw samples its shuffle has yielded (StreamState). A
resume does not replay them. Shard sizes (manifest counts, corrected by what the readers found in
damaged shards) give each epoch's length, so whole epochs are skipped arithmetically; inside the
current epoch the shuffle is replayed on sample indices only (the same seeded draws, no data), which
says which samples are in the buffer and where reading continues; then only the shards holding
those samples are read. The batches are exactly the unbroken run's (docs/architecture.md, "Resume").
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from shards.captions import template_caption
from shards.schema import is_live
from trainer.augment import Augment
from trainer.data import BadSample, ImageTransform, ShardSetError, decode_sample, sample_tensors
from trainer.epochs import EpochPlan, Reader, label_offsets, manifest_sizes, read_samples, replay_shuffle
from trainer.model.prompt import PromptBuilder

log = logging.getLogger(__name__)


@dataclass
class StreamState:
    """How far one rank's training stream got: batches consumed; per reader (DataLoader worker) the
    raw samples its shuffle had yielded and the bad samples it had skipped; and the true sample
    counts of shards that differ from their manifest (damaged tars), learned while reading."""

    consumed_batches: int = 0
    raw_consumed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)
    shard_sizes: dict[str, int] = field(default_factory=dict)
    # After a change of layout: the stream before it ({"slots", "consumed" per old slot, its own
    # "origin"}); positions then count from the transition epoch (trainer/epochs.py).
    origin: dict[str, Any] | None = None
    # Weighted sources: per reader, the source chooser's generator state and each source's position.
    mix: dict[int, dict[str, Any]] = field(default_factory=dict)

    def update(self, batch: dict[str, Any]) -> None:
        reader, raw_pos, skipped, sizes, mix = batch["stream_pos"]
        self.consumed_batches += 1
        self.raw_consumed[reader] = raw_pos
        self.skipped[reader] = skipped
        self.shard_sizes.update(sizes)
        if mix is not None:
            self.mix[reader] = mix

    def source_counts(self) -> list[int]:
        """Samples drawn from each weighted source so far, over this rank's readers."""
        counts = [m["consumed"] for m in self.mix.values()]
        return [sum(c) for c in zip(*counts)] if counts else []

    def skipped_total(self) -> Counter:
        total: Counter = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches, "raw_consumed": dict(self.raw_consumed),
                "skipped": {k: dict(v) for k, v in self.skipped.items()}, "shard_sizes": dict(self.shard_sizes),
                "origin": self.origin, "mix": {k: dict(v) for k, v in self.mix.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "StreamState":
        # JSON/pickle round trips may turn int keys into strings.
        return cls(int(state["consumed_batches"]), {int(k): int(v) for k, v in state["raw_consumed"].items()},
                   {int(k): dict(v) for k, v in state.get("skipped", {}).items()},
                   {str(k): int(v) for k, v in state.get("shard_sizes", {}).items()}, state.get("origin"),
                   {int(k): dict(v) for k, v in state.get("mix", {}).items()})

    @classmethod
    def after_layout_change(cls, streams: list[dict[str, Any]], num_workers: int, shuffle_buffer: int,
                            rank: int) -> "StreamState":
        """Rank ``rank``'s state for a run that continues the streams of another layout (its ranks'
        state dicts, its ``data.num_workers`` and ``data.shuffle_buffer``): the old slots' positions
        become the origin of a transition epoch; rank 0 carries the skip counts so far."""
        old = [cls.from_state_dict(s) for s in streams]
        readers = max(num_workers, 1)
        consumed = {r * readers + w: c for r, st in enumerate(old) for w, c in st.raw_consumed.items()}
        state = cls(origin={"slots": len(old) * readers, "consumed": consumed, "shuffle_buffer": shuffle_buffer,
                            "origin": old[0].origin})
        if any(st.mix for st in old):  # weighted sources: each source's own positions, its own transition
            per_source = {r * readers + w: m["consumed"] for r, st in enumerate(old) for w, m in st.mix.items()}
            sources = len(next(iter(per_source.values())))
            parents = (old[0].origin or {}).get("sources") or [None] * sources
            state.origin["sources"] = [{"slots": len(old) * readers, "shuffle_buffer": shuffle_buffer,
                                        "consumed": {s: c[i] for s, c in per_source.items()}, "origin": parents[i]}
                                       for i in range(sources)]
        for st in old:
            state.shard_sizes.update(st.shard_sizes)
            if rank == 0:
                state.skipped[0] = dict(Counter(state.skipped.get(0, {})) + st.skipped_total())
        return state


def _split_of(raw: dict[str, Any]) -> dict[str, Any]:
    """The json member's split field alone (the held-out test before decoding; bad json: none)."""
    try:
        return {"split": json.loads(raw["json"]).get("split")}
    except (KeyError, ValueError, AttributeError):
        return {}


class ShardStream(IterableDataset):
    """Samples of a shard set for one rank, split further across DataLoader workers.

    train=True: infinite, reshuffled every pass, resuming from ``resume`` (a StreamState).
    train=False: one ordered pass over this rank's share (sample i goes to rank i % world_size),
    for evaluation.
    """

    def __init__(self, urls: list[str], builder: PromptBuilder, transform: ImageTransform, *, rank: int,
                 world_size: int, batch_size: int, seed: int = 0, shuffle_buffer: int = 512, train: bool = True,
                 with_answers: bool = True, resume: StreamState | None = None, num_workers: int = 0,
                 caption_source: str = "shards", held_out: tuple[str, frozenset[str]] | None = None,
                 augment: Augment | None = None, sources: list[tuple[list[str], float, str | None]] | None = None,
                 label: str | None = None) -> None:
        super().__init__()
        self.label = label  # only this label's samples (a part of a live/spoof balanced source)
        self._label_offsets: dict[str, dict[str, tuple[int, ...]]] = {}
        # Weighted sources (urls, weight, label or None), training only: each streams on its own, a
        # seeded chooser draws every sample's source with probability proportional to its weight.
        self.sources = sources if train else None
        self.augment = augment if train else None  # evaluation never augments
        self.caption_source = caption_source  # shards | template (config.DataConfig.caption_source)
        # (split, shards): training never sees that split's samples in those shards, which fix the
        # decision threshold instead (eval.dev_shards; docs/architecture.md, "Thresholds").
        self.held_out = held_out
        self.urls, self.builder, self.transform = urls, builder, transform
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle_buffer, self.train = seed, shuffle_buffer, train
        self.with_answers = with_answers
        self.resume = resume or StreamState()
        self.num_workers = num_workers  # DataLoader workers; 0 = read in the training process

    # -- which raw samples a slot reads, epoch by epoch (trainer/epochs.py) -----------------------
    def _segment(self, url: str) -> tuple[str, tuple[int, ...] | None]:
        if self.label is None:
            return url, None
        if url not in self._label_offsets:
            self._label_offsets[url] = label_offsets(url)
        return url, self._label_offsets[url].get(self.label, ())

    def _standard(self, epoch: int, slot: int, slots: int) -> EpochPlan:
        order = list(self.urls)
        if self.train:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        if len(order) >= slots and self.train:
            return EpochPlan(epoch, tuple(self._segment(u) for u in order[slot::slots]))
        # fewer shards than slots (or evaluation): every slots-th sample
        return EpochPlan(epoch, tuple(self._segment(u) for u in order), stride=slots, phase=slot)

    def _plans(self, reader: Reader, slot: int, slots: int, origin: dict[str, Any] | None) -> Iterator[EpochPlan]:
        """The slot's epochs: after a change of layout a transition first, then standard epochs."""
        epoch = 0
        if origin is not None:
            transition = self._transition(reader, slot, slots, origin)
            yield transition
            epoch = transition.number + 1
        while True:
            yield self._standard(epoch, slot, slots)
            epoch += 1

    def _position(self, reader: Reader, slot: int, slots: int, consumed: int,
                  origin: dict[str, Any] | None) -> tuple[Iterator[EpochPlan], EpochPlan, int]:
        """(the epochs after it, the epoch, samples done in it) of the slot after ``consumed``: whole
        epochs are skipped by their lengths."""
        plans = self._plans(reader, slot, slots, origin)
        if consumed == 0:  # a fresh start needs no epoch length (a set without manifest is not read for it)
            return plans, next(plans), 0
        empty = 0
        for plan in plans:
            n = plan.length(reader)
            empty = empty + 1 if n <= 0 else 0
            if n <= 0:
                self._check_empty(plan, slot, empty)
            if consumed < n:
                return plans, plan, consumed
            consumed -= n
        raise AssertionError("unreachable: the epochs never end")

    def _check_empty(self, plan: EpochPlan, slot: int, in_a_row: int) -> None:
        """An epoch in which the slot has nothing to read: a transition may be empty, and so may a
        label part's epoch (its shards that epoch hold only the other label), but not forever."""
        if plan.transition or (self.label is not None and in_a_row < 64):
            return
        what = f"no {self.label} samples" if self.label else "no samples"
        raise ShardSetError(f"rank {self.rank} slot {slot}: shards {self.urls[:3]}... hold {what} for it")

    def _remaining(self, reader: Reader, slot: int, slots: int, consumed: int, origin: dict[str, Any] | None,
                   shuffle_buffer: int) -> tuple[int, list[tuple[str, int]]]:
        """(epoch, the (shard, offset) of every sample the slot had not yet yielded in it)."""
        _, plan, done = self._position(reader, slot, slots, consumed, origin)
        n = plan.length(reader)
        ids, next_read, draining = replay_shuffle(plan.rng(self.seed, slot), n, shuffle_buffer, done)
        return plan.number, plan.identities(reader, ids if draining else ids + list(range(next_read, n)))

    def _transition(self, reader: Reader, slot: int, slots: int, origin: dict[str, Any]) -> EpochPlan:
        """What the old slots had left of their epoch, dealt out by shard over the new slots."""
        left: dict[str, set[int]] = {}
        epoch = 0
        consumed = {int(k): v for k, v in origin["consumed"].items()}  # (JSON turns the keys into strings)
        for old_slot in range(origin["slots"]):
            number, places = self._remaining(reader, old_slot, origin["slots"], consumed.get(old_slot, 0),
                                             origin.get("origin"), origin["shuffle_buffer"])
            epoch = max(epoch, number)
            for url, offset in places:
                left.setdefault(url, set()).add(offset)
        rank_of = {u: i for i, u in enumerate(self.urls)}
        shards = sorted(left, key=rank_of.__getitem__)
        np.random.default_rng([self.seed, epoch, 3]).shuffle(shards)
        segments = tuple((u, tuple(sorted(left[u]))) for u in shards)
        if len(segments) >= slots:
            return EpochPlan(epoch, segments[slot::slots], transition=True)
        return EpochPlan(epoch, segments, stride=slots, phase=slot, transition=True)

    def _epoch(self, reader: Reader, slot: int, plan: EpochPlan, done: int) -> Iterator[dict]:
        """The shuffled raw samples of one epoch after the first ``done``."""
        rng = plan.rng(self.seed, slot)
        buffer: list[dict] = []
        start = 0
        if done:
            ids, start, draining = replay_shuffle(rng, plan.length(reader), self.shuffle_buffer, done)
            found = read_samples(reader, plan.identities(reader, ids))
            if any(raw is None for raw in found):
                raise ShardSetError(f"rank {self.rank} slot {slot}: shards changed since the checkpoint (a sample "
                                    "the resumed shuffle buffer needs is gone); resume with the run's own shards")
            buffer = found  # type: ignore[assignment]
            if draining:
                yield from buffer
                return
        for raw in plan.raws(reader, start):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], raw = raw, buffer[i]
            yield raw
        rng.shuffle(buffer)
        yield from buffer

    def _shuffled(self, reader: Reader, slot: int, slots: int, consumed: int) -> Iterator[dict]:
        """The slot's infinite shuffled raw stream after its first ``consumed`` samples."""
        plans, plan, done = self._position(reader, slot, slots, consumed, self.resume.origin)
        tar_errors = reader.count_tar_errors
        empty = 0  # epochs in a row in which the slot had nothing
        while True:
            reader.counting = plan.number == 0  # bad samples are counted in the first pass only
            # a transition re-reads shards whose damage the old slots already counted
            reader.count_tar_errors = tar_errors and not plan.transition
            yielded = 0
            for raw in self._epoch(reader, slot, plan, done):
                yielded += 1
                yield raw
            empty = 0 if yielded or done else empty + 1
            if empty:
                self._check_empty(plan, slot, empty)
            plan, done = next(plans), 0

    # -- samples -------------------------------------------------------------------------------
    def _is_held_out(self, raw: dict[str, Any], meta: dict[str, Any]) -> bool:
        if self.held_out is None:
            return False
        split, shards = self.held_out
        return raw.get("__url__") in shards and (not split or meta.get("split") == split)

    def _reader(self, reader_id: int) -> tuple[Reader, int, int]:
        """(the reader, its slot, the number of slots)."""
        slots = self.world_size * max(self.num_workers, 1)
        slot = self.rank * max(self.num_workers, 1) + reader_id
        skipped = Counter(self.resume.skipped.get(reader_id, {}))
        expected = manifest_sizes(self.urls) | self.resume.shard_sizes
        # With a sample-level split every slot reads every shard: only slot 0 counts tar errors.
        sample_split = not self.train or len(self.urls) < slots
        return Reader(skipped, count_tar_errors=not sample_split or slot == 0, expected=expected), slot, slots

    def transition_length(self, reader_id: int = 0) -> int:
        """Samples of the transition epoch a reader delivers first after a change of layout (0 if none)."""
        if self.resume.origin is None:
            return 0
        if self.sources:
            origins = self.resume.origin.get("sources") or [None] * len(self.sources)
            return sum(self._part(urls, label, o).transition_length(reader_id)
                       for (urls, _, label), o in zip(self.sources, origins))
        reader, slot, slots = self._reader(reader_id)
        return next(self._plans(reader, slot, slots, self.resume.origin)).length(reader)

    def _part(self, urls: list[str], label: str | None, origin: dict[str, Any] | None) -> "ShardStream":
        """The stream of one weighted source (its position comes from the chooser's state)."""
        part = ShardStream(urls, self.builder, self.transform, rank=self.rank, world_size=self.world_size,
                           batch_size=self.batch_size, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                           resume=StreamState(origin=origin), num_workers=self.num_workers, label=label)
        part._label_offsets = self._label_offsets  # a source's live and spoof parts read each shard's labels once
        return part

    def _mixed(self, reader: Reader, reader_id: int, slot: int, slots: int) -> Iterator[tuple[dict, dict]]:
        """(raw sample, chooser state after it) of the weighted sources, resumed from the state."""
        assert self.sources is not None
        cumulative = np.cumsum([w for _, w, _ in self.sources]) / sum(w for _, w, _ in self.sources)
        chooser = np.random.default_rng([self.seed, slot, 5])
        consumed = [0] * len(self.sources)
        if reader_id in self.resume.mix:
            chooser.bit_generator.state = self.resume.mix[reader_id]["rng"]
            consumed = list(self.resume.mix[reader_id]["consumed"])
        origins = (self.resume.origin or {}).get("sources") or [None] * len(self.sources)
        streams = []
        for (urls, _, label), origin, done in zip(self.sources, origins, consumed):
            # a source's live and spoof parts read the same shards: only the live part counts tar errors
            part_reader = Reader(reader.skipped, count_tar_errors=(len(urls) >= slots or slot == 0)
                                 and label in (None, "live"), expected=reader.expected)
            part_reader.corrections = reader.corrections  # one record of damaged shards per reader
            streams.append((self._part(urls, label, origin)._shuffled(part_reader, slot, slots, done), part_reader))
        while True:
            source = min(int(np.searchsorted(cumulative, chooser.random(), side="right")), len(streams) - 1)
            stream, part_reader = streams[source]
            while True:  # held-out dev samples do not count towards the source's share
                raw = next(stream)
                consumed[source] += 1
                if not self._is_held_out(raw, _split_of(raw)):
                    break
            reader.counting = part_reader.counting  # bad samples counted in the source's first pass only
            yield raw, {"rng": chooser.bit_generator.state, "consumed": list(consumed)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        readers = max(self.num_workers, 1)
        # The DataLoader takes batches from its workers round-robin, starting with worker 0. To
        # continue the exact batch order after a resume, worker w plays reader (w + consumed) % n.
        reader_id = ((info.id if info is not None else 0) + self.resume.consumed_batches) % readers
        reader, slot, slots = self._reader(reader_id)
        skipped = reader.skipped
        consumed = self.resume.raw_consumed.get(reader_id, 0)
        if self.sources:
            drawn = self._mixed(reader, reader_id, slot, slots)  # (raw, chooser state)
        else:
            raws = (self._shuffled(reader, slot, slots, consumed) if self.train
                    else self._standard(0, slot, slots).raws(reader))
            drawn = ((raw, None) for raw in raws)
        # Every sample bad or held out would loop forever: stop after twice the data without one to train on.
        limit, unusable = 2 * sum(reader.expected.values()) + 10_000, 0
        for pos, (raw, mix) in enumerate(drawn, start=consumed + 1):
            unusable += 1
            if unusable > limit:
                raise ShardSetError(f"rank {self.rank}: {limit} samples in a row from {self.urls[:3]}... were bad or "
                                    "held out for eval.dev_shards; nothing is left to train on")
            try:
                image, meta = decode_sample(raw)
            except BadSample as exc:
                reader.count(exc.reason, str(exc))
                continue
            if self._is_held_out(raw, meta):
                continue
            unusable = 0
            if self.augment is not None:  # seeded by the sample's place in the stream: the same after a resume
                image = self.augment(image, np.random.default_rng([self.seed, slot, pos, 4]))
            if self.with_answers:
                caption = (meta.get("caption", "") if self.caption_source == "shards"
                           else template_caption(meta.get("attack", "none"), raw["__key__"]))
                enc = self.builder.encode(is_live(meta), caption)
            else:
                enc = self.builder.encode_prompt()
            sample = sample_tensors(enc, self.transform(image), meta, raw["__key__"])
            if self.train:
                sample["stream_pos"] = (reader_id, pos, dict(skipped), dict(reader.corrections), mix)
            yield sample
