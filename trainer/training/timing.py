"""Wall-clock phases of a training step, for the step-time benchmark (trainer.bench).

The training loop passes ``None`` and pays nothing. The benchmark passes a PhaseTimer, which
synchronises the device at phase boundaries so each phase is charged its own GPU work.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start


def phase(timer: PhaseTimer | None, name: str) -> contextlib.AbstractContextManager:
    """``timer.phase(name)``, or a no-op when there is no timer."""
    return timer.phase(name) if timer is not None else contextlib.nullcontext()
