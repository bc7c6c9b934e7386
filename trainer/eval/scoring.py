"""Liveness scores of shard sets from one forward pass per image, and decision thresholds.

Every rank scores its share of a shard set (sample i goes to rank i % world) and the scores are
gathered. Ranks may hold unequal shares, so each round all ranks agree whether anyone still has
data and the ones without run a dummy batch: ZeRO-3 gathers parameters collectively, so every rank
must run the same forwards. The same code serves training (trainer/eval/periodic.py) and the
standalone ``ifas-eval`` (trainer/cli/eval.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from trainer.data import (
    ImageTransform,
    SampleMaker,
    ShardSetError,
    ShardStream,
    StreamLayout,
    batch_rows,
    make_loader,
)
from trainer.dist import WorldInfo, all_reduce_sum, device, gather_objects
from trainer.eval.metrics import FASMetrics, eer_threshold, fas_metrics
from trainer.sample.prompt import PromptBuilder

log = logging.getLogger("ifas.eval")
PROMPT_ONLY_MAX_LENGTH = 4096  # prompts carry no answer, so only the prompt itself must fit


@dataclass
class ScoredSet:
    """Scores of one shard set with the sample metadata the metrics break down by."""

    scores: np.ndarray
    live: np.ndarray
    keys: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def dataset(self) -> str:
        """The most common ``dataset`` field (what the paper tables match columns on)."""
        return Counter(self.datasets).most_common(1)[0][0] if self.datasets else ""

    def metrics(self, threshold: float | None = None) -> FASMetrics:
        """Breakdowns by attack type and video only when every sample carries that metadata."""
        attacks = self.attacks if self.attacks and all(self.attacks) else None
        videos = self.videos if self.videos and all(self.videos) else None
        return fas_metrics(self.scores, self.live, attacks, videos, threshold)

    def by_key(self) -> dict[str, float]:
        return dict(zip(self.keys, self.scores.tolist()))

    @classmethod
    def concat(cls, parts: list["ScoredSet"]) -> "ScoredSet":
        return cls(
            np.concatenate([p.scores for p in parts]) if parts else np.zeros(0),
            np.concatenate([p.live for p in parts]) if parts else np.zeros(0, dtype=bool),
            *([x for p in parts for x in getattr(p, name)] for name in ("keys", "attacks", "videos", "datasets")),
        )


def _score_batch(model_call, batch: dict[str, Any], dev: torch.device) -> torch.Tensor:
    out = model_call(
        input_ids=batch["input_ids"].to(dev),
        attention_mask=batch["attention_mask"].to(dev),
        pixel_values=batch["pixel_values"].to(dev),
        score_positions=batch["score_positions"].to(dev),
        image_positions=batch["image_positions"].to(dev),  # the collate's: no sync in the forward
    )
    return out.scores.float().cpu()


def _eval_batches(
    urls: list[str],
    builder: PromptBuilder,
    transform: ImageTransform,
    rank: int,
    world: int,
    batch_size: int,
    pad_id: int,
) -> Iterator[dict[str, Any]]:
    stream = ShardStream(urls, SampleMaker(builder, transform, with_answers=False), StreamLayout(rank, world),
                         batch_size=batch_size, train=False)
    return iter(make_loader(stream, pad_id))


@torch.no_grad()
def collect_scores(
    model_call,
    urls: list[str],
    builder: PromptBuilder,
    transform: ImageTransform,
    info: WorldInfo,
    batch_size: int,
    pad_id: int,
    max_samples: int = 0,
    select: Callable[[dict[str, Any]], bool] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> ScoredSet:
    """This rank's share of ``urls`` scored, every rank running the same number of forwards.

    ``select(meta)`` keeps only some samples (e.g. the "val" split of training shards); a batch
    left empty still runs its forward on one row, to stay in step. ``on_batch`` sees every kept
    batch (e.g. to hold a few samples for explanations). ``max_samples`` caps the whole set.
    """
    dev = device()
    batches = _eval_batches(urls, builder, transform, info.rank, info.world_size, batch_size, pad_id)
    parts: list[ScoredSet] = []
    dummy = None
    seen = 0
    while True:
        batch = next(batches, None) if (max_samples <= 0 or seen < max_samples) else None
        has = all_reduce_sum(torch.tensor([0.0 if batch is None else 1.0]))
        if has.item() == 0:
            break
        if batch is None:
            _score_batch(model_call, dummy, dev)  # keep the collectives in step with the other ranks
            continue
        dummy = dummy or batch_rows(batch, [0])
        seen += len(batch["keys"]) * info.world_size
        if select is not None:
            batch = batch_rows(batch, [i for i, m in enumerate(batch["meta"]) if select(m)])
            if not batch["keys"]:
                _score_batch(model_call, dummy, dev)
                continue
        if on_batch is not None:
            on_batch(batch)
        metas = batch["meta"]
        parts.append(
            ScoredSet(
                _score_batch(model_call, batch, dev).numpy(),
                batch["live"].numpy().astype(bool),
                list(batch["keys"]),
                [str(m.get("attack", "")) for m in metas],
                [str(m.get("video", "")) for m in metas],
                [str(m.get("dataset", "")) for m in metas],
            )
        )
    if dummy is None and info.world_size > 1:
        raise ShardSetError(
            f"rank {info.rank} received no evaluation samples from {urls[:2]}...: use more samples than ranks"
        )
    return ScoredSet.concat(parts)


def gather_scored(part: ScoredSet, info: WorldInfo) -> ScoredSet:
    return ScoredSet.concat(gather_objects(part, info))


def split_selector(split: str) -> Callable[[dict[str, Any]], bool] | None:
    """Keep samples whose ``split`` metadata is ``split`` ("" keeps all)."""
    return (lambda meta: meta.get("split") == split) if split else None


def dev_threshold(
    model_call,
    dev_urls: list[str],
    split: str,
    builder: PromptBuilder,
    transform: ImageTransform,
    info: WorldInfo,
    batch_size: int,
    pad_id: int,
    max_samples: int = 0,
) -> dict[str, Any]:
    """The EER threshold of the held-out training data (``split`` samples of ``dev_urls``):
    {"threshold", "eer", "samples", "source"}. Refuses a dev set without both classes."""
    part = collect_scores(
        model_call, dev_urls, builder, transform, info, batch_size, pad_id, max_samples, select=split_selector(split)
    )
    dev = gather_scored(part, info)
    eer, threshold = eer_threshold(dev.scores, dev.live)
    if math.isnan(threshold):  # one class only
        raise ShardSetError(
            f"dev shards {dev_urls[:2]}... give {int(dev.live.sum())} live and {int((~dev.live).sum())} "
            f"spoof samples with split={split!r}: a threshold needs both; set --dev-split/eval.dev_split "
            '("" = every sample)'
        )
    return {
        "threshold": threshold,
        "eer": eer,
        "samples": len(dev),
        "source": f"EER threshold of {len(dev)} split={split or '*'} samples of {len(dev_urls)} dev shard(s)",
    }


def threshold_from_file(path: str | Path) -> tuple[float, str]:
    """A decision threshold from a calibration.json ({"threshold": t}) or an eval_metrics.json
    (the fixed held-out threshold; else the EER threshold of its only test set)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"--threshold-from {p} does not exist; pass calibration.json or eval_metrics.json written by ifas-eval"
        )
    data = json.loads(p.read_text())
    if isinstance(data.get("threshold"), (int, float)):
        return float(data["threshold"]), f"{p} ({data.get('source', 'calibration')})"
    fixed = {v.get("fixed_threshold") for v in data.values() if isinstance(v, dict)} - {None}
    if len(fixed) == 1:
        return float(fixed.pop()), f"{p} (threshold fixed on held-out training data)"
    sets = [k for k, v in data.items() if isinstance(v, dict) and v.get("eer_threshold") is not None]
    if len(sets) == 1:
        log.warning(
            "%s has no fixed threshold: using the EER threshold of test set %r, which was chosen on that "
            "test set's own labels",
            p,
            sets[0],
        )
        return float(data[sets[0]]["eer_threshold"]), f"{p} (EER threshold of test set {sets[0]})"
    raise ValueError(
        f"--threshold-from {p} holds no single threshold (no fixed threshold and {len(sets)} test sets); "
        "evaluate with --dev-shards to fix one, or pass --threshold"
    )
