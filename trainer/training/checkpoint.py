"""Atomic, resumable DeepSpeed checkpoints.

Layout under ``<output_dir>/checkpoints`` (names in trainer/run_dir.py): one directory per save,
``step_<N>``, written by DeepSpeed on every rank; once every rank has finished (a barrier), rank 0 drops a ``COMPLETE``
marker into it and only then moves the ``latest`` pointer (write to a temp file + rename). A
kill at any moment therefore leaves ``latest`` naming a complete checkpoint; half-written
directories have no marker and are pruned at the next save. The last ``keep_last`` complete
checkpoints are kept, plus any ``protected`` one (the best step by held-out HTER).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from shards.io import atomic_write_text
from trainer.run_dir import COMPLETE, LATEST, LAYOUT, latest_tag, tag_for

log = logging.getLogger(__name__)


class LayoutMismatch(ValueError):
    """The checkpoint was written by another number of ranks or loader workers."""


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, is_main: bool) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.is_main = is_main
        self.protected: set[str] = set()  # e.g. the best step by held-out HTER: never pruned

    def save(self, engine, step: int, client_state: dict[str, Any], layout: dict[str, int]) -> Path:
        import torch.distributed as dist

        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()  # every rank's shards are on disk before the checkpoint counts as written
        if self.is_main:
            atomic_write_text(self.dir / tag / LAYOUT, json.dumps(layout))
            atomic_write_text(self.dir / tag / COMPLETE, f"{step}\n")
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=tag)
        dist.barrier()
        log.info("saved checkpoint %s", self.dir / tag)
        return self.dir / tag

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.dir.glob("step_*") if (p / COMPLETE).is_file())
        stale = [p for p in self.dir.glob("step_*") if p.is_dir() and not (p / COMPLETE).is_file()]
        if self.keep_last > 0:
            stale += complete[:-self.keep_last]
        for path in stale:
            if path.name != keep and path.name not in self.protected:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, engine, layout: dict[str, int]) -> dict[str, Any] | None:
        """Load the latest complete checkpoint into ``engine``; return its client state (None if none).
        ``layout`` (world_size, num_workers) must match the one the checkpoint was written with."""
        tag = latest_tag(self.dir)
        if tag is None:
            return None
        saved = json.loads((self.dir / tag / LAYOUT).read_text())
        if saved != layout:
            raise LayoutMismatch(
                f"the checkpoint {self.dir / tag} was written by {saved['world_size']} ranks with "
                f"data.num_workers={saved['num_workers']}, this run has {layout['world_size']} ranks and "
                f"data.num_workers={layout['num_workers']}; resume with the same, or convert the checkpoint for "
                f"another world size with DeepSpeed's ds_to_universal.py and start a new train.output_dir from it")
        path, client = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        return client
