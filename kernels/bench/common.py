"""Measurement shared by the kernel benchmarks: memory meters, timing, relative error, the machine.

Used by :mod:`kernels.bench.lopsided_ce` and :mod:`kernels.bench.gac_pool`; the report is written by
``python -m kernels.bench`` (:mod:`kernels.bench.__main__`).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import importlib.metadata
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("kernels.bench")

NO_GPU = "not measured (no GPU in this session)"
GB = 1e9
MiB = 2**20


class CudaMeter:
    method = "torch.cuda.max_memory_allocated() above the allocation before the call"

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


class RssMeter:
    """Peak resident memory above the resident memory before the call (Linux).

    glibc's mmap threshold is pinned to 128 KiB, so every tensor buffer is its own mapping,
    returned to the OS when freed: RSS then follows the live tensors instead of a heap that
    keeps (and silently reuses) freed memory.
    """

    method = (
        "peak RSS (VmHWM, reset through /proc/self/clear_refs) above RSS before the call; glibc mmap threshold 128 KiB"
    )

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        except OSError:
            logger.warning("could not pin glibc's mmap threshold; CPU memory figures may be low")

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def start(self) -> None:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.base = self._status_kb("VmRSS")

    def stop(self) -> int:
        return (self._status_kb("VmHWM") - self.base) * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], device: str, meter, repeats: int, time_cap: float, warmup: int) -> dict:
    """Min time and max peak memory of ``fn`` over up to ``repeats`` calls (stops after ``time_cap`` s)."""
    for _ in range(warmup):
        fn()
        _sync(device)
    times, peaks, spent = [], [], 0.0
    while len(times) < repeats and (not times or spent < time_cap):
        gc.collect()
        meter.start()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        peaks.append(meter.stop())
        times.append(elapsed)
        spent += elapsed
    return {"time_s": min(times), "times_s": times, "peak_bytes": max(peaks)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str, meter) -> dict:
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor() or "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "device": device,
        "memory_method": meter.method,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "deepspeed": _version("deepspeed"),
            "transformers": _version("transformers"),
            "liger-kernel": _version("liger-kernel"),
        },
    }
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"
