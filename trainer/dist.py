"""Process-group setup that works under the deepspeed launcher, torchrun, SLURM's srun, or alone.

Rank, local rank and world size come from RANK/LOCAL_RANK/WORLD_SIZE (deepspeed, torchrun), else
from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (``srun python -u ...``, one task per GPU), else a
single process. Under srun nothing sets MASTER_ADDR/MASTER_PORT, so they are derived from the job:
the first host of SLURM_JOB_NODELIST and a port fixed by SLURM_JOB_ID (every task computes the same).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.process import dump_stacks_on_signal, skip_deepspeed_jit_ops

log = logging.getLogger("ifas.dist")

DEFAULT_COLLECTIVE_TIMEOUT_S = TrainConfig.collective_timeout_s  # a stalled collective fails after this
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # MASTER_PORT = base + SLURM_JOB_ID % span

_timeout = timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
_PEER_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|peer|watchdog", re.IGNORECASE)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env() -> WorldInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return WorldInfo(0, 0, 1)


# ----- SLURM rendezvous -----

_BRACKET = re.compile(r"\[([^\]]*)\]")


def _expand_range_list(body: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ['01', '02', '03', '07'] (zero padding kept, as SLURM does)."""
    out = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not sep:
            out.append(lo)
            continue
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise ValueError(f"cannot parse range {part!r} in SLURM nodelist {nodelist!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist (``node[01-04,07]``, ``a1,b[2-3]``, ``r[1-2]-n[1-2]``) in SLURM's order.

    The fallback for machines without ``scontrol`` (e.g. inside containers)."""
    hosts: list[str] = []
    depth, start = 0, 0
    items = []
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(nodelist[start:i].strip())
            start = i + 1
    for item in filter(None, items):
        expanded = [""]
        pos = 0
        for m in _BRACKET.finditer(item):
            prefix = item[pos:m.start()]
            expanded = [e + prefix + n for e in expanded for n in _expand_range_list(m.group(1), nodelist)]
            pos = m.end()
        hosts.extend(e + item[pos:] for e in expanded)
    if not hosts or any("[" in h or "]" in h for h in hosts):
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a SLURM nodelist: ``scontrol show hostnames`` when available, else parse_nodelist."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("scontrol show hostnames %s failed (%s); parsing the nodelist instead", nodelist, exc)
    return parse_nodelist(nodelist)


def slurm_rendezvous(env: dict[str, str] | os._Environ) -> tuple[str, int] | None:
    """(MASTER_ADDR, MASTER_PORT) for an srun-started job: first node of the job, port from the job id.
    None outside SLURM."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not nodelist or not job_id:
        return None
    return slurm_hostnames(nodelist)[0], SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


# ----- process group -----

def free_port() -> int:
    """A TCP port free on this host now (rendezvous of a launched run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_index(local_rank: int) -> int:
    # srun may bind one GPU per task (CUDA_VISIBLE_DEVICES holds one id): then every task uses device 0.
    return local_rank % max(1, torch.cuda.device_count())


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", _cuda_index(world_info_from_env().local_rank))
    return torch.device("cpu")


def collective_timeout() -> timedelta:
    """The timeout the process group was started with; pass it to any dist.new_group as well."""
    return _timeout


def _report_failure(info: WorldInfo) -> Callable[[type[BaseException], BaseException, TracebackType | None], None]:
    """An excepthook naming the failing rank; it exits at once, since a rank left in a broken process
    group can hang at interpreter shutdown (loader workers, comm threads) and keep the job alive."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(kind, exc, tb)
        first_line = (str(exc).splitlines() or [""])[0]
        peer = _PEER_FAILURE.search(first_line) is not None
        log.critical("rank %d of %d (host %s, local rank %d, pid %d) failed: %s: %s%s", info.rank, info.world_size,
                     socket.gethostname(), info.local_rank, os.getpid(), kind.__name__, first_line,
                     "; another rank probably died or hangs (its log, or the launcher/srun, names it)" if peer else "")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return hook


def init_distributed(timeout_s: float | None = None) -> WorldInfo:
    """Start the process group (gloo on CPU, nccl on CUDA) and return this process's place in it.

    ``timeout_s`` (default DEFAULT_COLLECTIVE_TIMEOUT_S) bounds every collective, so the ranks of a job
    in which one rank died or hangs fail instead of waiting forever."""
    import deepspeed

    global _timeout
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"collective timeout must be positive, got {timeout_s} s (train.collective_timeout_s)")
    info = world_info_from_env()
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        rendezvous = slurm_rendezvous(os.environ) if info.world_size > 1 else None
        if rendezvous is not None:
            os.environ.setdefault("MASTER_ADDR", rendezvous[0])
            os.environ.setdefault("MASTER_PORT", str(rendezvous[1]))
        elif info.world_size > 1 and "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with deepspeed/torchrun/srun "
                               "or set MASTER_ADDR and MASTER_PORT")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    _timeout = timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s)
    dump_stacks_on_signal()
    if torch.cuda.is_available():
        torch.cuda.set_device(_cuda_index(info.local_rank))
        backend = "nccl"
    else:
        skip_deepspeed_jit_ops()
        backend = "gloo"
    if info.world_size > 1:
        log.info("rank %d of %d (local rank %d): rendezvous %s:%s, collective timeout %.0f s", info.rank,
                 info.world_size, info.local_rank, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
                 _timeout.total_seconds())
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=_timeout)
    if info.world_size > 1:  # after init: torch's own hook (rank-prefixed traceback) runs inside ours
        sys.excepthook = _report_failure(info)
    return info


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place. Host tensors work under NCCL too (it reduces only device
    tensors): they go through the current GPU and back."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        on_device = t.to(torch.cuda.current_device())
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return t.copy_(on_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, info: WorldInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    import torch.distributed as dist

    if info.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process or without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank0_before_group(done: Path, work: Callable[[], None], what: str, info: WorldInfo,
                       poll_s: float = 2.0, log_every_s: float = 60.0) -> None:
    """Run ``work`` once on rank 0 while the other ranks wait on the filesystem, before any process group
    exists: a long job there (a checkpoint conversion, an export: minutes to an hour at 7B) holds no collective
    open, so no collective timeout or NCCL watchdog can end it. ``done`` marks the work finished (written by
    this function after ``work`` returns; a ``done`` already there means nothing to do). A failure on rank 0 is
    written beside it (``<done>.failed``) so every other rank stops with rank 0's message instead of waiting.
    The directory must be shared by the nodes, as checkpoints are."""
    from shards.io import atomic_write_text

    failed = done.with_name(done.name + ".failed")
    if info.is_main:
        if done.is_file():
            return
        failed.unlink(missing_ok=True)
        log.info("%s (the other ranks wait for %s)", what, done)
        try:
            work()
        except Exception as exc:
            atomic_write_text(failed, f"{type(exc).__name__}: {exc}")
            raise
        atomic_write_text(done, what + "\n")
        return
    started, last_log = time.time(), time.time()
    while not done.is_file():
        if failed.is_file() and failed.stat().st_mtime >= started - 1:  # this attempt's failure, not an old one
            raise RuntimeError(f"rank 0 failed {what}: {failed.read_text().strip()}")
        if info.local_rank == 0 and time.time() - last_log >= log_every_s:  # one line per node
            log.info("rank %d waits for rank 0 %s (%.0f s)", info.rank, what, time.time() - started)
            last_log = time.time()
        time.sleep(poll_s)


_collectives_ran = False  # set by shutdown_distributed: this process held a process group


def shutdown_distributed() -> None:
    """Tear the process groups down once the work is done (every rank calls it)."""
    import torch.distributed as dist

    global _collectives_ran
    if dist.is_available() and dist.is_initialized():
        _collectives_ran = True
        dist.destroy_process_group()


def finish_process(code: int) -> int:
    """A console script's last step: return ``code``; but in a process that ran collectives, flush
    everything and end the process here, skipping interpreter finalization.

    Why: finalization frees c10d/gloo objects in arbitrary order even after destroy_process_group,
    and now and then (once in 35 CPU runs here) a gloo worker thread ends up destroying its own
    owner, which aborts the process (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#179291) after all work is saved: the launcher then reports a finished run as
    failed. Every file the run writes is closed by now, so nothing is lost by skipping it.
    """
    if not _collectives_ran:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
