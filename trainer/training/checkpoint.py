"""Atomic, resumable DeepSpeed checkpoints.

Layout under ``<output_dir>/checkpoints`` (names in trainer/run_dir.py): one directory per save,
``step_<N>``, written by DeepSpeed on every rank; once every rank has finished (a barrier), rank 0 drops a ``COMPLETE``
marker into it and only then moves the ``latest`` pointer (write to a temp file + rename). A
kill at any moment therefore leaves ``latest`` naming a complete checkpoint; half-written
directories have no marker and are pruned at the next save. The last ``keep_last`` complete
checkpoints are kept, plus any ``protected`` one (the best step by held-out HTER).

A checkpoint written by another layout (world size or loader workers) is converted once, by rank
0, into DeepSpeed's universal format (``step_<N>/universal``, with its own ``COMPLETE``), which any
world size loads; the data streams continue through a transition epoch (trainer/data/stream.py).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from shards.io import atomic_write_text
from trainer.dist import barrier
from trainer.run_dir import COMPLETE, LATEST, LAYOUT, UNIVERSAL, latest_tag, tag_for

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

    def load(self, engine, layout: dict[str, int]) -> dict[str, Any] | None:
        """Load the latest complete checkpoint into ``engine``; return its client state (None if none).
        From another world size (the engine must then be built with ``load_universal``) through the
        universal checkpoint; the client state's ``data`` still describes the old streams."""
        tag = latest_tag(self.dir)
        if tag is None:
            return None
        saved = json.loads((self.dir / tag / LAYOUT).read_text())
        load_dir, load_tag = self.dir, tag
        if self.needs_universal(layout):  # (other loader workers: the streams alone differ)
            self._convert_to_universal(self.dir / tag)
            log.info("checkpoint %s was written by %d rank(s) x %d loader worker(s), this run has %d x %d: loading "
                     "its universal form", tag, saved["world_size"], max(saved["num_workers"], 1),
                     layout["world_size"], max(layout["num_workers"], 1))
            load_dir, load_tag = self.dir / tag, UNIVERSAL
        path, client = engine.load_checkpoint(str(load_dir), tag=load_tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
        return client

    def _convert_to_universal(self, tag_dir: Path) -> None:
        """Rank 0 converts (once, atomically by marker) while the other ranks wait."""
        import torch.distributed as dist

        out = tag_dir / UNIVERSAL
        failure = [None]  # rank 0's error, sent to every rank so that none waits for a conversion that failed
        if self.is_main and not (out / COMPLETE).is_file():
            if out.exists():  # a conversion killed half way
                shutil.rmtree(out)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                   "--output_folder", str(out)]
            log.info("converting %s for another world size: %s", tag_dir, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                atomic_write_text(out / COMPLETE, tag_dir.name + "\n")
            else:
                failure[0] = f"converting {tag_dir} to a universal checkpoint failed:\n{proc.stderr[-2000:]}"
        dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise RuntimeError(failure[0])
