"""System scalars for TensorBoard during training: memory per rank, data-loader wait, skipped
samples, learning rate per module group.

``log_system_scalars`` is collective (one ``all_gather_object`` of a small dict): call it on every
rank at the same steps; only rank 0 (the one with a writer) writes.
"""
from __future__ import annotations

import resource
from typing import Mapping

import torch

from trainer.dist import WorldInfo, gather_objects


def rank_memory_mb(dev: torch.device) -> dict[str, float]:
    """This process's memory: resident set (now and peak) and, on CUDA, allocated/peak/reserved."""
    mem: dict[str, float] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    try:
        with open("/proc/self/statm") as f:
            mem["rss_mb"] = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        pass
    if dev.type == "cuda":
        mem["cuda_allocated_mb"] = torch.cuda.memory_allocated(dev) / 2**20
        mem["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        mem["cuda_reserved_mb"] = torch.cuda.memory_reserved(dev) / 2**20
    return mem


def log_system_scalars(writer, step: int, info: WorldInfo, dev: torch.device, *, data_wait_s: float | None = None,
                       step_time_s: float | None = None, skipped: Mapping[str, int] | None = None,
                       lrs: Mapping[str, float] | None = None) -> dict[str, float]:
    """Gather every rank's memory, data wait and skip counts; rank 0 writes
    ``memory/<kind>/rank<r>``, ``data/wait_s/rank<r>`` (+ ``data/wait_frac``), ``data/skipped/<reason>``
    (summed over ranks; pass cumulative counts) and ``lr/<group>``. Returns the scalars written."""
    local = {"memory": rank_memory_mb(dev), "wait": data_wait_s, "time": step_time_s, "skipped": dict(skipped or {})}
    ranks = gather_objects(local, info)
    scalars: dict[str, float] = {}
    for r, entry in enumerate(ranks):
        for kind, value in entry["memory"].items():
            scalars[f"memory/{kind}/rank{r}"] = value
        if entry["wait"] is not None:
            scalars[f"data/wait_s/rank{r}"] = entry["wait"]
    waits = [(e["wait"], e["time"]) for e in ranks if e["wait"] is not None and e["time"]]
    if waits:
        scalars["data/wait_frac"] = max(w / t for w, t in waits)  # the slowest rank holds the others back
    reasons = sorted({k for e in ranks for k in e["skipped"]})
    for reason in reasons:
        scalars[f"data/skipped/{reason}"] = float(sum(e["skipped"].get(reason, 0) for e in ranks))
    for group, lr in (lrs or {}).items():
        scalars[f"lr/{group}"] = lr
    if writer is not None:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        writer.flush()
    return scalars
