"""Samples into batches: right-padded token tensors, stacked images, and the DataLoader that carries them
from the stream's reader workers to the training process."""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data import DataLoader

from shards.io import setup_logging
from trainer.data.samples import Sample
from trainer.process import STOP_SIGNALS, dump_stacks_on_signal
from trainer.sample import IGNORE_INDEX, UNSUPERVISED
from trainer.sample.positions import supervised_rows

if TYPE_CHECKING:
    from trainer.data.stream import ShardStream


def collate(samples: list[Sample], pad_id: int) -> dict[str, Any]:
    """Right-pad token lists into tensors; keep keys/metadata as lists. The positions the model step needs
    (image tokens ``[B, K]``, supervised rows ``[R]``) are computed here, on the host, once per batch."""
    length = max(len(s["input_ids"]) for s in samples)

    def pad(name: str, value: int) -> torch.Tensor:
        return torch.tensor([s[name] + [value] * (length - len(s[name])) for s in samples], dtype=torch.long)

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"]))
                                        for s in samples], dtype=torch.long),
        "labels": pad("labels", IGNORE_INDEX),
        "label_groups": pad("label_groups", UNSUPERVISED),
        "score_positions": torch.tensor([s["score_position"] for s in samples], dtype=torch.long),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "live": torch.tensor([s["live"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    batch["supervised_rows"] = supervised_rows(batch["labels"], batch["label_groups"])
    if all("image_positions" in s for s in samples):
        batch["image_positions"] = torch.tensor([s["image_positions"] for s in samples], dtype=torch.long)
    if "stream_pos" in samples[-1]:  # training streams: where the producing reader stands (a ReaderPosition)
        batch["stream_pos"] = samples[-1]["stream_pos"]
    return batch


def batch_rows(batch: dict[str, Any], keep: list[int] | slice) -> dict[str, Any]:
    """The samples ``keep`` of a collated batch (tensors and lists alike), its flat supervised rows recomputed
    (they index the whole batch's positions, so they cannot be sliced like the per-sample fields)."""
    picked = range(len(batch["keys"]))[keep] if isinstance(keep, slice) else keep
    out = {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in picked]) for k, v in batch.items()
           if k not in ("supervised_rows", "stream_pos")}
    out["supervised_rows"] = supervised_rows(out["labels"], out["label_groups"])
    return out


# Worker -> training process: every tensor crosses as its own shared-memory handle, and receiving
# one costs a socket handshake (~0.4 ms, measured). The integer tensors travel as one.
_TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "label_groups")  # [B, S] each
_SAMPLE_FIELDS = ("score_positions", "live")  # [B] each
_PACKED = _TOKEN_FIELDS + _SAMPLE_FIELDS + ("image_positions", "supervised_rows")


def _collate_packed(samples: list[Sample], pad_id: int) -> dict[str, Any]:
    batch = collate(samples, pad_id)
    fields = [k for k in _PACKED if k in batch]
    batch["packed_shape"] = [(k, tuple(batch[k].shape)) for k in fields]
    batch["packed_ints"] = torch.cat([batch.pop(k).reshape(-1) for k in fields])
    return batch


def _unpack(batch: dict[str, Any]) -> dict[str, Any]:
    ints = batch.pop("packed_ints")
    start = 0
    for name, shape in batch.pop("packed_shape"):
        n = torch.Size(shape).numel()
        batch[name] = ints[start:start + n].view(shape)
        start += n
    return batch


# Loader workers are forked from a fork server, never from the rank (worker_start_method); "fork" remains for the
# loader benchmark's before/after comparison. The server imports WORKER_PRELOAD once and each worker is forked from it.
WORKER_START_METHOD = "forkserver"
WORKER_PRELOAD = ["__main__", "trainer.data", "trainer.sample.prompt"]


def worker_start_method(name: str = WORKER_START_METHOD) -> multiprocessing.context.BaseContext:
    """The multiprocessing context loader workers start from. The fork server is one per rank, started with the
    first loader (about 2 s on CPU). A rank runs gloo/NCCL and DeepSpeed threads, and a fork of it taken while one
    of them holds a lock leaves that lock held for ever in the worker, which hangs the first time it needs it (the
    hazard Python 3.12 warns of and 3.14 avoids by default; docs/architecture.md, "Known traps"). As with any
    non-fork start, a script that starts training keeps its top level under ``if __name__ == "__main__":``."""
    context = multiprocessing.get_context(name)
    if name == "forkserver":
        context.set_forkserver_preload(WORKER_PRELOAD)
        _start_fork_server()
    return context


def _start_fork_server() -> None:
    """SLURM's --signal and a preemption's SIGTERM reach every process of the job step, and a process that does not
    handle them dies of them; the rank stops at a step boundary and needs its workers until then. So the server
    starts with the stop signals blocked, which exec and fork pass on to it and its workers; the rank's own mask
    comes back at once (a signal that arrived meanwhile is delivered then). No-op while the server runs."""
    from multiprocessing import forkserver

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(rank: int, worker_id: int) -> None:
    """A worker is a fresh process: the rank's logging format, the stack dump on SIGUSR2, and an end when the rank
    ends. torch's worker loop watches its parent process, which for a fork server's worker is the server, and the
    server lives on while its workers do: a worker of a killed rank would wait for ever."""
    setup_logging(rank=rank)
    dump_stacks_on_signal()
    requester = multiprocessing.parent_process()  # the rank that asked for this worker
    if requester is not None and requester.pid != os.getppid():
        threading.Thread(target=_end_with, args=(requester,), name="end-with-rank", daemon=True).start()


def _end_with(process: multiprocessing.process.BaseProcess) -> None:
    process.join()  # returns when the process has ended (multiprocessing's sentinel pipe is closed)
    os._exit(1)


class BatchLoader:
    """The stream's DataLoader, yielding ``collate``'s batches (unpacked after the transfer)."""

    def __init__(self, stream: ShardStream, pad_id: int, start_method: str = WORKER_START_METHOD) -> None:
        workers = stream.layout.num_workers
        # Pinned host memory lets the copy to the GPU overlap compute (model_inputs uses non_blocking).
        self.loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers,
                                 collate_fn=functools.partial(_collate_packed, pad_id=pad_id), drop_last=stream.train,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None,
                                 multiprocessing_context=worker_start_method(start_method) if workers > 0 else None,
                                 worker_init_fn=functools.partial(_start_worker, stream.layout.rank))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches. Closing the generator stops the workers at once, not when the cyclic GC meets torch's
        iterator: the console scripts end with os._exit (trainer.dist.finish_process), which skips the GC."""
        iterator = iter(self.loader)
        try:
            yield from map(_unpack, iterator)
        finally:
            stop = getattr(iterator, "_shutdown_workers", None)  # torch's own teardown; none without workers
            if stop is not None:
                stop()


def make_loader(stream: ShardStream, pad_id: int, start_method: str = WORKER_START_METHOD) -> BatchLoader:
    return BatchLoader(stream, pad_id, start_method)
