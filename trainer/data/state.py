"""How far one rank's training stream got: the resume state a checkpoint holds (docs/architecture.md,
"Resume"), typed throughout. ``state_dict``/``from_state_dict`` give the JSON-safe form checkpoints store
(its keys are a file format: older checkpoints keep resuming)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GeneratorState:
    """A numpy PCG64 generator's state (the weighted-source chooser's, carried so its draws continue)."""

    state: int
    inc: int
    has_uint32: int = 0
    uinteger: int = 0

    @classmethod
    def of(cls, rng: np.random.Generator) -> "GeneratorState":
        s = rng.bit_generator.state
        if s["bit_generator"] != "PCG64":
            raise ValueError(f"only PCG64 generators are carried in the stream state, got {s['bit_generator']}")
        return cls(int(s["state"]["state"]), int(s["state"]["inc"]), int(s["has_uint32"]), int(s["uinteger"]))

    def restore(self, rng: np.random.Generator) -> None:
        rng.bit_generator.state = self.to_dict()

    def to_dict(self) -> dict[str, Any]:  # numpy's own form
        return {"bit_generator": "PCG64", "state": {"state": self.state, "inc": self.inc},
                "has_uint32": self.has_uint32, "uinteger": self.uinteger}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeneratorState":
        return cls(int(d["state"]["state"]), int(d["state"]["inc"]), int(d["has_uint32"]), int(d["uinteger"]))


@dataclass(frozen=True)
class MixPosition:
    """A reader's place among weighted sources: the chooser's state and the raw samples taken from each source."""

    chooser: GeneratorState
    consumed: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"rng": self.chooser.to_dict(), "consumed": list(self.consumed)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixPosition":
        return cls(GeneratorState.from_dict(d["rng"]), tuple(int(c) for c in d["consumed"]))


@dataclass(frozen=True)
class LayoutOrigin:
    """The streams of the layout a run resumed from (another world size or loader-worker count): how many slots it
    had, the raw samples each had yielded, its shuffle buffer, the layout it had itself resumed from, and with
    weighted sources each source's own origin. Positions after such a resume count from its transition epoch
    (trainer/data/epochs.py)."""

    slots: int
    consumed: dict[int, int]  # old slot -> raw samples it had yielded
    shuffle_buffer: int
    parent: "LayoutOrigin | None" = None
    sources: "tuple[LayoutOrigin | None, ...] | None" = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"slots": self.slots, "consumed": dict(self.consumed),
                             "shuffle_buffer": self.shuffle_buffer, "origin": _dict_or_none(self.parent)}
        if self.sources is not None:
            d["sources"] = [_dict_or_none(s) for s in self.sources]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LayoutOrigin | None":
        if d is None:
            return None
        sources = d.get("sources")
        return cls(int(d["slots"]), {int(k): int(v) for k, v in d["consumed"].items()},  # JSON: string keys
                   int(d["shuffle_buffer"]), cls.from_dict(d.get("origin")),
                   None if sources is None else tuple(cls.from_dict(s) for s in sources))


def _dict_or_none(origin: LayoutOrigin | None) -> dict[str, Any] | None:
    return None if origin is None else origin.to_dict()


@dataclass(frozen=True)
class ReaderPosition:
    """Where the reader that produced a batch stands after it (it travels with the batch from the loader worker)."""

    reader: int
    raw_consumed: int
    skipped: dict[str, int]
    corrections: dict[str, int]  # shards whose true sample count differs from their manifest
    mix: MixPosition | None = None


@dataclass
class StreamState:
    """How far one rank's training stream got: batches consumed; per reader (DataLoader worker) the raw samples
    its shuffle had yielded and the bad samples it had skipped; the true sample counts of shards that differ from
    their manifest (damaged tars), learned while reading; after a change of layout, the layout before it; with
    weighted sources, each reader's place among them."""

    consumed_batches: int = 0
    raw_consumed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict[str, int]] = field(default_factory=dict)
    shard_sizes: dict[str, int] = field(default_factory=dict)
    origin: LayoutOrigin | None = None
    mix: dict[int, MixPosition] = field(default_factory=dict)

    def update(self, position: ReaderPosition) -> None:
        """One batch consumed, produced by the reader at ``position``."""
        self.consumed_batches += 1
        self.raw_consumed[position.reader] = position.raw_consumed
        self.skipped[position.reader] = position.skipped
        self.shard_sizes.update(position.corrections)
        if position.mix is not None:
            self.mix[position.reader] = position.mix

    def source_counts(self) -> list[int]:
        """Samples drawn from each weighted source so far, over this rank's readers."""
        counts = [m.consumed for m in self.mix.values()]
        return [sum(c) for c in zip(*counts)] if counts else []

    def skipped_total(self) -> Counter:
        total: Counter = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches, "raw_consumed": dict(self.raw_consumed),
                "skipped": {k: dict(v) for k, v in self.skipped.items()}, "shard_sizes": dict(self.shard_sizes),
                "origin": _dict_or_none(self.origin), "mix": {k: m.to_dict() for k, m in self.mix.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "StreamState":
        # JSON/pickle round trips may turn int keys into strings.
        return cls(int(state["consumed_batches"]), {int(k): int(v) for k, v in state["raw_consumed"].items()},
                   {int(k): dict(v) for k, v in state.get("skipped", {}).items()},
                   {str(k): int(v) for k, v in state.get("shard_sizes", {}).items()},
                   LayoutOrigin.from_dict(state.get("origin")),
                   {int(k): MixPosition.from_dict(v) for k, v in state.get("mix", {}).items()})

    @classmethod
    def after_layout_change(cls, streams: list[dict[str, Any]], num_workers: int, shuffle_buffer: int,
                            rank: int) -> "StreamState":
        """Rank ``rank``'s state for a run that continues the streams of another layout (its ranks'
        state dicts, its ``data.num_workers`` and ``data.shuffle_buffer``): the old slots' positions
        become the origin of a transition epoch; rank 0 carries the skip counts so far."""
        old = [cls.from_state_dict(s) for s in streams]
        readers = max(num_workers, 1)
        slots = len(old) * readers
        consumed = {r * readers + w: c for r, st in enumerate(old) for w, c in st.raw_consumed.items()}
        sources = None
        if any(st.mix for st in old):  # weighted sources: each source's own positions, its own transition
            per_source = {r * readers + w: m.consumed for r, st in enumerate(old) for w, m in st.mix.items()}
            n_sources = len(next(iter(per_source.values())))
            parents = (old[0].origin.sources if old[0].origin else None) or (None,) * n_sources
            sources = tuple(LayoutOrigin(slots, {s: c[i] for s, c in per_source.items()}, shuffle_buffer, parents[i])
                            for i in range(n_sources))
        state = cls(origin=LayoutOrigin(slots, consumed, shuffle_buffer, old[0].origin, sources))
        for st in old:
            state.shard_sizes.update(st.shard_sizes)
            if rank == 0:
                state.skipped[0] = dict(Counter(state.skipped.get(0, {})) + st.skipped_total())
        return state
