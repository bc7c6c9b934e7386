"""Everything a trainer process logs: the ``logging`` setup of every command, and the one
TensorBoard writer (``MetricsWriter``) with every tag the project writes named below.

Tags (docs/architecture.md "TensorBoard"):
  train/<field>                  the training loop's window averages (loss, lr, samples_per_s, ...)
  data/skipped/<reason>          bad samples skipped so far, summed over ranks
  data/source/<i>_<set>          share of the samples drawn from each weighted source so far
  data/wait_s/rank<r>, data/wait_frac  loader wait per rank (the slowest rank's fraction)
  memory/<kind>/rank<r>          resident set and CUDA memory per rank
  lr/<group>                     learning rate of each module group
  eval/<set>/<metric>, eval/<set>/video/<metric>, eval/best/<hter_fixed|auc>   held-out evaluation
  eval_plots/roc, eval_plots/<set>/histogram                         ROC and score histograms
  explain/<set>/<n> (image + text), explain/<set>/<mode>/<metric>    explanations
"""
from __future__ import annotations

import math
import resource
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from shards.io import setup_logging as _setup_logging
from trainer.dist import WorldInfo, gather_objects

# FAS metrics written as eval scalars (attributes of trainer.eval.metrics.FASMetrics).
EVAL_SCALARS = ("hter", "auc", "eer", "apcer", "bpcer", "acer", "tpr_at_fpr1", "hter_fixed", "acer_fixed")


def setup_logging(rank: int = 0, force: bool = False) -> None:
    """INFO on rank 0, warnings only elsewhere; lines carry the rank (``force``: replace an earlier setup)."""
    _setup_logging(rank=rank, force=force)


class Tags:
    """The TensorBoard tag of each quantity (one place, so writers and readers agree)."""

    @staticmethod
    def train(field: str) -> str:
        return f"train/{field}"

    @staticmethod
    def skipped(reason: str) -> str:
        return f"data/skipped/{reason}"

    @staticmethod
    def source(name: str) -> str:
        return f"data/source/{name}"

    @staticmethod
    def data_wait(rank: int) -> str:
        return f"data/wait_s/rank{rank}"

    DATA_WAIT_FRAC = "data/wait_frac"

    @staticmethod
    def memory(kind: str, rank: int) -> str:
        return f"memory/{kind}/rank{rank}"

    @staticmethod
    def lr(group: str) -> str:
        return f"lr/{group}"

    @staticmethod
    def eval(set_name: str, metric: str, video: bool = False) -> str:
        return f"eval/{set_name}/video/{metric}" if video else f"eval/{set_name}/{metric}"

    @staticmethod
    def eval_best(criterion: str) -> str:
        """The best step's value of the metric it was chosen by (trainer/eval/periodic.py: hter_fixed or auc)."""
        return f"eval/best/{criterion}"

    ROC_PLOT = "eval_plots/roc"

    @staticmethod
    def histogram(set_name: str) -> str:
        return f"eval_plots/{set_name}/histogram"

    @staticmethod
    def example(set_name: str, n: int) -> str:
        return f"explain/{set_name}/{n:02d}"

    @staticmethod
    def explanation(set_name: str, mode: str, metric: str) -> str:
        return f"explain/{set_name}/{mode}/{metric}"


class MetricsWriter:
    """TensorBoard events under ``log_dir`` on the main rank; every method is a no-op elsewhere
    (``log_dir=None``), so callers need no rank checks. Scalars that are None or NaN are not written."""

    def __init__(self, log_dir: str | Path | None) -> None:
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(log_dir))

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None and not math.isnan(value):
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def image(self, tag: str, hwc: np.ndarray, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, hwc, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    # ----- the project's scalar groups -----

    def train_window(self, record: Mapping[str, Any], step: int) -> None:
        """A training-loop log record: numbers as train/<field>, the skip counts as data/skipped/<reason>."""
        values: dict[str, float] = {}
        for field, value in record.items():
            if field == "skipped_samples":
                values.update({Tags.skipped(reason): count for reason, count in value.items()})
            elif field == "source_fractions":
                values.update({Tags.source(name): share for name, share in value.items()})
            elif field != "step":
                values[Tags.train(field)] = value
        self.scalars(values, step)

    def eval_metrics(self, results: Mapping[str, Any], step: int) -> None:
        """FASMetrics per set: eval/<set>/<metric> (frame level) and eval/<set>/video/<metric>."""
        values: dict[str, float] = {}
        for name, m in results.items():
            for video, x in ((False, m), (True, m.video)):
                if x is not None:
                    values.update({Tags.eval(name, key, video): getattr(x, key) for key in EVAL_SCALARS})
        self.scalars(values, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# ----- system scalars (memory per rank, loader wait, skips, learning rates) -----

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


def log_system_scalars(writer: MetricsWriter, step: int, info: WorldInfo, dev: torch.device, *,
                       data_wait_s: float | None = None, step_time_s: float | None = None,
                       skipped: Mapping[str, int] | None = None,
                       lrs: Mapping[str, float] | None = None) -> dict[str, float]:
    """Collective (one ``all_gather_object`` of a small dict): call on every rank at the same steps.
    Gathers every rank's memory, data wait and cumulative skip counts; the main rank's writer writes
    them with the learning rate per group. Returns the scalars."""
    local = {"memory": rank_memory_mb(dev), "wait": data_wait_s, "time": step_time_s, "skipped": dict(skipped or {})}
    ranks = gather_objects(local, info)
    scalars: dict[str, float] = {}
    for r, entry in enumerate(ranks):
        for kind, value in entry["memory"].items():
            scalars[Tags.memory(kind, r)] = value
        if entry["wait"] is not None:
            scalars[Tags.data_wait(r)] = entry["wait"]
    waits = [(e["wait"], e["time"]) for e in ranks if e["wait"] is not None and e["time"]]
    if waits:
        scalars[Tags.DATA_WAIT_FRAC] = max(w / t for w, t in waits)  # the slowest rank holds the others back
    for reason in sorted({k for e in ranks for k in e["skipped"]}):
        scalars[Tags.skipped(reason)] = float(sum(e["skipped"].get(reason, 0) for e in ranks))
    for group, lr in (lrs or {}).items():
        scalars[Tags.lr(group)] = lr
    writer.scalars(scalars, step)
    return scalars
