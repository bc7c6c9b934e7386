"""Evaluation: liveness scores from one forward pass per image, then HTER/AUC/EER per test set.

Inside training (``evaluate_engine``) every rank scores its share of the held-out shards
(sample i goes to rank i % world) and rank 0 gathers the scores. Ranks may hold unequal shares,
so each round all ranks agree whether anyone still has data and the ones without run a dummy
batch: ZeRO-3 gathers parameters collectively, so every rank must run the same forwards.

Standalone (console script ``ifas-eval``): score an exported model directory on shard sets.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from trainer.config import EvalConfig
from trainer.data import ImageTransform, ShardSetError, ShardStream, make_loader, resolve_shards
from trainer.dist import WorldInfo, all_reduce_sum, device
from trainer.metrics import FASMetrics, fas_metrics, format_table
from trainer.prompt import PromptBuilder

log = logging.getLogger("ifas.eval")
PROMPT_ONLY_MAX_LENGTH = 4096  # prompts carry no answer, so only the prompt itself must fit


def _eval_batches(urls: list[str], builder: PromptBuilder, transform: ImageTransform, rank: int, world: int,
                  batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    stream = ShardStream(urls, builder, transform, rank=rank, world_size=world, batch_size=batch_size,
                         train=False, with_answers=False, num_workers=0)
    return iter(make_loader(stream, pad_id))


def _score_batch(model_call, batch: dict[str, Any], dev: torch.device) -> torch.Tensor:
    out = model_call(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                     pixel_values=batch["pixel_values"].to(dev), score_positions=batch["score_positions"].to(dev))
    return out.scores.float().cpu()


@torch.no_grad()
def collect_scores(model_call, urls: list[str], builder: PromptBuilder, transform: ImageTransform, info: WorldInfo,
                   batch_size: int, pad_id: int, max_samples: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(scores, live labels, keys) of this rank's share, every rank running the same number of forwards."""
    dev = device()
    batches = _eval_batches(urls, builder, transform, info.rank, info.world_size, batch_size, pad_id)
    scores, live, keys = [], [], []
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
        dummy = dummy or batch
        scores.append(_score_batch(model_call, batch, dev))
        live.append(batch["live"])
        keys.extend(batch["keys"])
        seen += len(batch["keys"]) * info.world_size
    if dummy is None and info.world_size > 1:
        raise ShardSetError(f"rank {info.rank} received no evaluation samples from {urls[:2]}...: use more samples "
                            "than ranks")
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return cat(scores), cat(live), keys


def gather_to_main(arrays: list[np.ndarray], info: WorldInfo) -> list[np.ndarray]:
    """Concatenate each array over ranks (on every rank; eval sets are small)."""
    import torch.distributed as dist

    if info.world_size == 1:
        return arrays
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def evaluate_engine(engine, urls: list[str], builder: PromptBuilder, transform: ImageTransform, info: WorldInfo,
                    cfg: EvalConfig, pad_id: int) -> tuple[FASMetrics, dict[str, float]]:
    """Metrics over all ranks' scores, plus the score of every sample by key."""
    engine.eval()
    scores, live, keys = collect_scores(engine, urls, builder, transform, info, cfg.batch_size, pad_id,
                                        cfg.max_samples)
    engine.train()
    scores, live, keys = gather_to_main([scores, live, np.asarray(keys, dtype=object)], info)
    return fas_metrics(scores, live), dict(zip(keys.tolist(), scores.tolist()))


def report(results: dict[str, FASMetrics], out_dir: Path, writer=None, step: int = 0,
           scores: dict[str, dict[str, float]] | None = None) -> str:
    """Print the table, write eval_metrics.json/.md (+ per-sample eval_scores.json), log to TensorBoard."""
    table = format_table(results)
    print(table, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        (out_dir / "eval_scores.json").write_text(json.dumps(scores, indent=1))
    (out_dir / "eval_metrics.json").write_text(json.dumps({k: m.as_dict() for k, m in results.items()}, indent=2))
    (out_dir / "eval_metrics.md").write_text(table + "\n")
    if writer is not None:
        for name, m in results.items():
            for key in ("hter", "auc", "eer", "apcer", "bpcer"):
                writer.add_scalar(f"eval/{name}/{key}", getattr(m, key), step)
        writer.flush()
    return table


def main(argv: list[str] | None = None) -> int:
    from trainer.model import IFASModel, ModelLoadError

    parser = argparse.ArgumentParser(prog="ifas-eval", description="Evaluate an exported I-FAS model on shard sets.")
    parser.add_argument("--model", required=True, help="exported model directory (ifas-export / <run>/export)")
    parser.add_argument("--out", default=None, help="where to write eval_metrics.json/.md (default: --model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=0)
    parser.add_argument("shards", nargs="+", help="test shard sets (directories, globs or brace patterns)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer = IFASModel.from_pretrained(args.model)
        model.to(device()).eval()
        builder = PromptBuilder(tokenizer, model.num_image_tokens, max_length=PROMPT_ONLY_MAX_LENGTH)
        transform = ImageTransform(model.arch.image_size, model.arch.image_mean, model.arch.image_std)
        info = WorldInfo(0, 0, 1)  # one process; distributed evaluation runs inside training
        results, per_sample = {}, {}
        for spec in args.shards:
            name = Path(spec).name or spec
            urls = resolve_shards([spec], "shards")
            scores, live, keys = collect_scores(model, urls, builder, transform, info, args.batch_size,
                                                tokenizer.pad_token_id, args.max_samples)
            results[name] = fas_metrics(scores, live)
            per_sample[name] = dict(zip(keys, scores.tolist()))
    except (ModelLoadError, ShardSetError, ValueError) as exc:
        print(f"ifas-eval: error: {exc}", file=sys.stderr)
        return 2
    report(results, Path(args.out or args.model), scores=per_sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
