"""Process-group setup that works under the deepspeed launcher, torchrun, SLURM's srun, or alone.

Rank, local rank and world size come from RANK/LOCAL_RANK/WORLD_SIZE (deepspeed, torchrun), else
from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (``srun python -u ...``), else a single process.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world_info_from_env().local_rank)
    return torch.device("cpu")


def init_distributed() -> WorldInfo:
    """Start the process group (gloo on CPU, nccl on CUDA) and return this process's place in it."""
    import deepspeed

    info = world_info_from_env()
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if info.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with deepspeed/torchrun "
                               "or set MASTER_ADDR and MASTER_PORT (launch/slurm.sbatch does)")
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    else:
        # The shared-memory comm op JIT-compiles C++ (~30 s) on first use; gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return info


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
