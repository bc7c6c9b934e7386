"""Stopping a run on a signal (preemption) at a step boundary, every rank at the same step."""
from __future__ import annotations

import signal
from typing import Any

import torch

from trainer.dist import collective_timeout
from trainer.process import STOP_SIGNALS


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's --signal, a scheduler's preemption) ask the run to stop at the next check.
    Ranks agree over a gloo group on the host, so checking costs no device sync; each step starts a check and
    reads the answer of the one the previous step started (long done by then), so no step waits on it and a
    signal stops the run within 2 steps (docs/architecture.md, "No host syncs in the step")."""


    def __init__(self) -> None:
        import torch.distributed as dist

        self.received: int | None = None
        self.group = dist.new_group(backend="gloo", timeout=collective_timeout())
        self.pending: tuple[Any, torch.Tensor] | None = None  # the check in flight: (work, flag)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Whether any rank had a signal when the previous check started (the same answer on every rank: every
        rank checks at the same steps); starts the next check."""
        import torch.distributed as dist

        answer = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            answer = flag.item() > 0  # a host tensor
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        self.pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return answer

    def close(self) -> None:
        """Wait for the check in flight (every rank started it)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
