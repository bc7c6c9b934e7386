"""Atomic, resumable DeepSpeed checkpoints.

Layout under ``<output_dir>/checkpoints`` (names in trainer/run_dir.py): one directory per save,
``step_<N>``, written by DeepSpeed on every rank; once every rank has finished (a barrier), rank 0 drops a ``COMPLETE``
marker into it and only then moves the ``latest`` pointer (write to a temp file + rename). A
kill at any moment therefore leaves ``latest`` naming a complete checkpoint; half-written
directories have no marker and are pruned at the next save. The last ``keep_last`` complete
checkpoints are kept, plus any ``protected`` one (the best step by held-out HTER).

A checkpoint written by another world size is converted once, by rank 0 before the process group exists,
into DeepSpeed's universal format (``step_<N>/universal``, with its own ``COMPLETE``), which any world size
loads (trainer/training/universal.py); the data streams continue through a transition epoch
(trainer/data/stream.py).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from shards.io import atomic_write_text
from trainer.dist import WorldInfo, barrier, rank0_before_group
from trainer.run_dir import COMPLETE, LATEST, LAYOUT, UNIVERSAL, latest_tag, tag_for
from trainer.training import universal

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, is_main: bool) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.is_main = is_main
        self.protected: set[str] = set()  # e.g. the best step by held-out HTER: never pruned

    def save(self, engine, step: int, client_state: dict[str, Any], layout: dict[str, int]) -> Path:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        barrier()  # every rank's shards are on disk before the checkpoint counts as written
        if self.is_main:
            atomic_write_text(self.dir / tag / LAYOUT, json.dumps(layout))
            atomic_write_text(self.dir / tag / COMPLETE, f"{step}\n")
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=tag)
        barrier()
        log.info("saved checkpoint %s", self.dir / tag)
        return self.dir / tag

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if (p / COMPLETE).is_file())
        stale = [p for p in self.dir.glob("step_*") if p.is_dir() and not (p / COMPLETE).is_file()]
        if self.keep_last > 0:
            stale += complete[:-self.keep_last]
        for path in stale:
            if path.name != keep and path.name not in self.protected:
                try:
                    shutil.rmtree(path)
                except OSError as exc:  # e.g. a file still held open on a network filesystem
                    log.warning("could not prune checkpoint %s (%s); the next save tries again", path, exc)

    def saved_layout(self) -> dict[str, int] | None:
        """The layout (world_size, num_workers) of the latest complete checkpoint, None if there is none."""
        tag = latest_tag(self.dir)
        return json.loads((self.dir / tag / LAYOUT).read_text()) if tag is not None else None

    def needs_universal(self, layout: dict[str, int]) -> bool:
        """The latest checkpoint was written by another world size (model states are per rank)."""
        saved = self.saved_layout()
        return saved is not None and saved["world_size"] != layout["world_size"]

    def prepare(self, layout: dict[str, int], info: WorldInfo) -> None:
        """Call on every rank before the process group exists: where the latest checkpoint was written by another
        world size, rank 0 converts it to universal form while the others wait on the filesystem, holding no
        collective open however long it takes (minutes at 7B)."""
        if not self.needs_universal(layout):
            return
        tag_dir = self.dir / latest_tag(self.dir)
        rank0_before_group(tag_dir / UNIVERSAL / COMPLETE, lambda: universal.convert(tag_dir, tag_dir / UNIVERSAL),
                           f"converting {tag_dir} for another world size", info)

    def load(self, engine, layout: dict[str, int]) -> dict[str, Any] | None:
        """Load the latest complete checkpoint into ``engine``; return its client state (None if none).
        From another world size (``prepare`` converted it; the engine must be built with ``load_universal``)
        through the universal checkpoint; the client state's ``data`` still describes the old streams."""
        tag = latest_tag(self.dir)
        if tag is None:
            return None
        saved = json.loads((self.dir / tag / LAYOUT).read_text())
        if not self.needs_universal(layout):  # (other loader workers: the streams alone differ)
            path, client = engine.load_checkpoint(str(self.dir), tag=tag)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
            return client
        if not (self.dir / tag / UNIVERSAL / COMPLETE).is_file():
            raise RuntimeError(f"{self.dir / tag} was written by {saved['world_size']} rank(s) and has no universal "
                               "form: call Checkpointer.prepare before the process group starts")
        log.info("checkpoint %s was written by %d rank(s) x %d loader worker(s), this run has %d x %d: loading its "
                 "universal form", tag, saved["world_size"], max(saved["num_workers"], 1), layout["world_size"],
                 max(layout["num_workers"], 1))
        built_groups = universal.group_names(engine)
        path, client = engine.load_checkpoint(str(self.dir / tag), tag=UNIVERSAL)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag / UNIVERSAL}")
        universal.repair_optimizer(engine, self.dir / tag / UNIVERSAL, built_groups)
        return client
