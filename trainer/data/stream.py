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
those samples are read (trainer/data/epochs.py). The batches are exactly the unbroken run's
(docs/architecture.md, "Resume").
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from trainer.data.decode import BadSample
from trainer.data.epochs import EpochSchedule
from trainer.data.reader import LabelIndex, RawSample, Reader, manifest_sizes
from trainer.data.rng import Purpose, generator
from trainer.data.samples import Sample, SampleMaker
from trainer.data.shard_sets import ShardSetError
from trainer.data.state import GeneratorState, MixPosition, ReaderPosition, StreamState


@dataclass(frozen=True)
class StreamLayout:
    """Who reads: this rank among ``world_size``, with ``num_workers`` DataLoader workers (0 = read in the
    training process). Every (rank, worker) pair is a reader slot."""

    rank: int = 0
    world_size: int = 1
    num_workers: int = 0

    @property
    def readers(self) -> int:
        return max(self.num_workers, 1)

    @property
    def slots(self) -> int:
        return self.world_size * self.readers

    def slot(self, reader: int) -> int:
        return self.rank * self.readers + reader


@dataclass(frozen=True)
class Source:
    """A weighted training source: a shard set's tars (with ``label``, only that label's samples: one half of a
    live/spoof balanced set), drawn with probability proportional to ``weight``."""

    urls: tuple[str, ...]
    weight: float
    label: str | None = None


class ShardStream(IterableDataset):
    """Samples of shard sets for one rank, split further across DataLoader workers.

    train=True: infinite, reshuffled every pass, resuming from ``resume`` (a StreamState); with ``sources``,
    each weighted source streams on its own and a seeded chooser per reader draws every sample's source.
    train=False: one ordered pass over this rank's share (sample i goes to rank i % world_size), for evaluation.
    """

    def __init__(self, urls: list[str], samples: SampleMaker, layout: StreamLayout, *, batch_size: int,
                 seed: int = 0, shuffle_buffer: int = 512, train: bool = True, resume: StreamState | None = None,
                 sources: list[Source] | None = None) -> None:
        super().__init__()
        self.urls = list(urls)
        # evaluation never augments
        self.samples = samples if train else dataclasses.replace(samples, augment=None)
        self.layout, self.batch_size = layout, batch_size
        self.seed, self.shuffle_buffer, self.train = seed, shuffle_buffer, train
        self.resume = resume or StreamState()
        self.sources = sources if train else None
        self.labels = LabelIndex()  # a source's live and spoof parts read each shard's labels once

    def _schedule(self, urls: tuple[str, ...] | list[str], label: str | None = None) -> EpochSchedule:
        return EpochSchedule(tuple(urls), self.seed, self.shuffle_buffer, self.train, label,
                             self.labels if label is not None else None, f"rank {self.layout.rank}")

    def _new_reader(self, reader_id: int) -> Reader:
        return Reader(Counter(self.resume.skipped.get(reader_id, {})),
                      manifest_sizes(self.urls) | self.resume.shard_sizes)

    def _counts_tar_errors(self, urls: tuple[str, ...] | list[str], slot: int) -> bool:
        """With a sample-level split (fewer shards than slots, or evaluation) every slot reads every shard:
        only slot 0 counts its tar errors."""
        return (self.train and len(urls) >= self.layout.slots) or slot == 0

    def transition_length(self, reader_id: int = 0) -> int:
        """Samples of the transition epoch a reader delivers first after a change of layout (0 if none)."""
        origin = self.resume.origin
        if origin is None:
            return 0
        reader, slot = self._new_reader(reader_id), self.layout.slot(reader_id)
        if not self.sources:
            return self._schedule(self.urls).transition_length(reader, slot, self.layout.slots, origin)
        origins = origin.sources or (None,) * len(self.sources)
        return sum(self._schedule(s.urls, s.label).transition_length(reader, slot, self.layout.slots, o)
                   for s, o in zip(self.sources, origins))

    def _single(self, reader: Reader, slot: int, consumed: int) -> Iterator[tuple[RawSample, bool, None]]:
        """(raw sample, first pass, None) of the one shard set."""
        schedule = self._schedule(self.urls)
        count_tar_errors = self._counts_tar_errors(self.urls, slot)
        if not self.train:
            plan = schedule.standard(0, slot, self.layout.slots)
            return ((raw, True, None) for raw in plan.raws(reader, count_errors=count_tar_errors))
        raws = schedule.shuffled(reader, slot, self.layout.slots, consumed, self.resume.origin, count_tar_errors)
        return ((raw, first_pass, None) for raw, first_pass in raws)

    def _mixed(self, reader: Reader, reader_id: int, slot: int) -> Iterator[tuple[RawSample, bool, MixPosition]]:
        """(raw sample, first pass, the place among the sources after it) of the weighted sources."""
        assert self.sources is not None
        weights = [s.weight for s in self.sources]
        cumulative = np.cumsum(weights) / sum(weights)
        chooser = generator(self.seed, Purpose.SOURCE_CHOOSER, slot=slot)
        consumed = [0] * len(self.sources)
        if reader_id in self.resume.mix:
            self.resume.mix[reader_id].chooser.restore(chooser)
            consumed = list(self.resume.mix[reader_id].consumed)
        origins = (self.resume.origin.sources if self.resume.origin else None) or (None,) * len(self.sources)
        # a source's live and spoof parts read the same shards: only the live part counts tar errors
        streams = [self._schedule(s.urls, s.label).shuffled(
            reader, slot, self.layout.slots, done, origin,
            self._counts_tar_errors(s.urls, slot) and s.label in (None, "live"))
            for s, origin, done in zip(self.sources, origins, consumed)]
        while True:
            source = min(int(np.searchsorted(cumulative, chooser.random(), side="right")), len(streams) - 1)
            while True:  # held-out dev samples do not count towards the source's share
                raw, first_pass = next(streams[source])
                consumed[source] += 1
                if not self.samples.is_held_out(raw):
                    break
            yield raw, first_pass, MixPosition(GeneratorState.of(chooser), tuple(consumed))

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        # The DataLoader takes batches from its workers round-robin, starting with worker 0. To
        # continue the exact batch order after a resume, worker w plays reader (w + consumed) % n.
        reader_id = ((info.id if info is not None else 0) + self.resume.consumed_batches) % self.layout.readers
        reader, slot = self._new_reader(reader_id), self.layout.slot(reader_id)
        consumed = self.resume.raw_consumed.get(reader_id, 0)
        drawn = self._mixed(reader, reader_id, slot) if self.sources else self._single(reader, slot, consumed)
        # Every sample bad or held out would loop forever: stop after twice the data without one to train on.
        limit, unusable = 2 * sum(reader.expected.values()) + 10_000, 0
        for pos, (raw, first_pass, mix) in enumerate(drawn, start=consumed + 1):
            unusable += 1
            if unusable > limit:
                raise ShardSetError(f"rank {self.layout.rank}: {limit} samples in a row from {self.urls[:3]}... were "
                                    "bad or held out for eval.dev_shards; nothing is left to train on")
            try:
                sample = self.samples(raw, slot, pos)
            except BadSample as exc:
                if first_pass:  # later passes meet the same bad samples again
                    reader.count(exc.reason, str(exc))
                continue
            if sample is None:  # held out
                continue
            unusable = 0
            if self.train:
                sample["stream_pos"] = ReaderPosition(reader_id, pos, dict(reader.skipped), dict(reader.corrections),
                                                      mix)
            yield sample
