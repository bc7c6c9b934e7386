"""Every process-wide setting the trainer makes, in one place (docs/architecture.md, "Process-wide settings").

- ``keep_host_heap_small``: glibc's malloc hands large freed blocks back to the OS (here, at training start);
- ``skip_deepspeed_jit_ops``: DeepSpeed's shared-memory communication op is marked unusable on CPU, so it is not
  JIT-compiled (here, called by ``trainer.dist.init_distributed``);
- ``dump_stacks_on_signal``: ``kill -USR2 <pid>`` prints every thread's Python stack (here, by every rank in
  ``trainer.dist.init_distributed`` and by every loader worker as it starts);
- loader workers start from a fork server, never as a fork of a rank (``trainer.data.batching``);
- torch's default dtype is only changed inside ``trainer.model.arch.default_dtype`` (a context manager: restored);
- a rank of a multi-rank run installs an excepthook that names the failing rank and ends the process at once, and
  a console script ends a process that held a process group with ``os._exit`` (``trainer.dist``, both documented
  there: why a finished rank must not run the interpreter's finalisation).
"""
from __future__ import annotations

import faulthandler
import signal

HOST_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
STACK_DUMP_SIGNAL = signal.SIGUSR2
# Stop at the next step boundary (trainer.training.stop): SLURM's --signal=USR1@T, a preempting scheduler's SIGTERM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def keep_host_heap_small() -> None:
    """Host tensors of 1 MiB and more get their own memory map, returned to the OS when freed. glibc's
    default raises that threshold up to 32 MiB as large blocks are freed, and then keeps the freed
    memory of the build's transient tensors, DeepSpeed's copies into its flat buffers and ZeRO-3's
    gather buffers and gradients in its heap: at 2 CPU ranks of the scale rehearsal (BENCHMARKS.md)
    2.5 GiB of RSS per rank that nothing used. Called once per process, at the start of training; a
    no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)


def dump_stacks_on_signal() -> None:
    """``kill -USR2 <pid>`` prints every thread's Python stack to the process's stderr and the process goes on: a
    rank or loader worker that hangs shows where it waits (SIGTERM and SIGUSR1 stay the stop signals)."""
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)


def skip_deepspeed_jit_ops() -> None:
    """The shared-memory comm op JIT-compiles C++ (~30 s) on first use; gloo on CPU needs none of it."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
