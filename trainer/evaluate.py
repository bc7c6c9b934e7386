"""Evaluation: liveness scores from one forward pass per image, then the paper's metrics per test set.

Every rank scores its share of a shard set (sample i goes to rank i % world) and the scores are
gathered. Ranks may hold unequal shares, so each round all ranks agree whether anyone still has
data and the ones without run a dummy batch: ZeRO-3 gathers parameters collectively, so every rank
must run the same forwards. The same code serves training (``PeriodicEvaluator``) and the
standalone command.

Standalone (console script ``ifas-eval``), one process or several (``deepspeed --num_gpus N
--module trainer.evaluate ...`` / ``torchrun``):

    ifas-eval --model runs/demo/export --dev-shards data/demo/domain_a data/demo/domain_b data/demo/domain_c \
        data/demo/domain_d
    ifas-eval --merge ocim_m/eval_metrics.json ocim_c/eval_metrics.json --protocol ocim --out tables/

writes eval_metrics.json/.md (frame and video level, per attack type, at the test EER threshold
and at a threshold fixed on held-out training data), eval_tables.md/.json (the paper's layouts
with its figures beside ours), ROC and score-histogram PNGs, explanations with their
interpretability metrics, and TensorBoard events (scalars, images, text) under OUT/tb.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from trainer.config import RunConfig
from trainer.data import ImageTransform, ShardSetError, ShardStream, make_loader, resolve_shards
from trainer.dist import WorldInfo, all_reduce_sum, device, finish_process, gather_objects, shutdown_distributed
from trainer.metrics import FASMetrics, eer_threshold, fas_metrics, format_attack_table, format_table, jsonable
from trainer.prompt import PromptBuilder

log = logging.getLogger("ifas.eval")
PROMPT_ONLY_MAX_LENGTH = 4096  # prompts carry no answer, so only the prompt itself must fit
SCALARS = ("hter", "auc", "eer", "apcer", "bpcer", "acer", "tpr_at_fpr1", "hter_fixed", "acer_fixed")


# ----- scoring -----

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
        return cls(np.concatenate([p.scores for p in parts]) if parts else np.zeros(0),
                   np.concatenate([p.live for p in parts]) if parts else np.zeros(0, dtype=bool),
                   *([x for p in parts for x in getattr(p, name)]
                     for name in ("keys", "attacks", "videos", "datasets")))


def _score_batch(model_call, batch: dict[str, Any], dev: torch.device) -> torch.Tensor:
    out = model_call(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                     pixel_values=batch["pixel_values"].to(dev), score_positions=batch["score_positions"].to(dev))
    return out.scores.float().cpu()


def _rows(batch: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """The rows ``keep`` of a collated batch (tensors and lists alike)."""
    return {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]) for k, v in batch.items()}


def _eval_batches(urls: list[str], builder: PromptBuilder, transform: ImageTransform, rank: int, world: int,
                  batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    stream = ShardStream(urls, builder, transform, rank=rank, world_size=world, batch_size=batch_size,
                         train=False, with_answers=False, num_workers=0)
    return iter(make_loader(stream, pad_id))


@torch.no_grad()
def collect_scores(model_call, urls: list[str], builder: PromptBuilder, transform: ImageTransform, info: WorldInfo,
                   batch_size: int, pad_id: int, max_samples: int = 0,
                   select: Callable[[dict[str, Any]], bool] | None = None,
                   on_batch: Callable[[dict[str, Any]], None] | None = None) -> ScoredSet:
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
        dummy = dummy or _rows(batch, [0])
        seen += len(batch["keys"]) * info.world_size
        if select is not None:
            batch = _rows(batch, [i for i, m in enumerate(batch["meta"]) if select(m)])
            if not batch["keys"]:
                _score_batch(model_call, dummy, dev)
                continue
        if on_batch is not None:
            on_batch(batch)
        metas = batch["meta"]
        parts.append(ScoredSet(
            _score_batch(model_call, batch, dev).numpy(), batch["live"].numpy().astype(bool), list(batch["keys"]),
            [str(m.get("attack", "")) for m in metas], [str(m.get("video", "")) for m in metas],
            [str(m.get("dataset", "")) for m in metas]))
    if dummy is None and info.world_size > 1:
        raise ShardSetError(f"rank {info.rank} received no evaluation samples from {urls[:2]}...: use more samples "
                            "than ranks")
    return ScoredSet.concat(parts)


def gather_scored(part: ScoredSet, info: WorldInfo) -> ScoredSet:
    return ScoredSet.concat(gather_objects(part, info))


def split_selector(split: str) -> Callable[[dict[str, Any]], bool] | None:
    """Keep samples whose ``split`` metadata is ``split`` ("" keeps all)."""
    return (lambda meta: meta.get("split") == split) if split else None


def dev_threshold(model_call, dev_urls: list[str], split: str, builder: PromptBuilder, transform: ImageTransform,
                  info: WorldInfo, batch_size: int, pad_id: int, max_samples: int = 0) -> dict[str, Any]:
    """The EER threshold of the held-out training data (``split`` samples of ``dev_urls``):
    {"threshold", "eer", "samples", "source"}. Refuses a dev set without both classes."""
    part = collect_scores(model_call, dev_urls, builder, transform, info, batch_size, pad_id, max_samples,
                          select=split_selector(split))
    dev = gather_scored(part, info)
    eer, threshold = eer_threshold(dev.scores, dev.live)
    if math.isnan(threshold):  # one class only
        raise ShardSetError(f"dev shards {dev_urls[:2]}... give {int(dev.live.sum())} live and {int((~dev.live).sum())} "
                            f"spoof samples with split={split!r}: a threshold needs both; set --dev-split/eval.dev_split "
                            "(\"\" = every sample)")
    return {"threshold": threshold, "eer": eer, "samples": len(dev),
            "source": f"EER threshold of {len(dev)} split={split or '*'} samples of {len(dev_urls)} dev shard(s)"}


# ----- reporting -----

def log_metrics(writer, results: dict[str, FASMetrics], step: int) -> None:
    """Scalars eval/<set>/<metric> (frame level) and eval/<set>/video/<metric>."""
    for name, m in results.items():
        for prefix, x in ((f"eval/{name}", m), (f"eval/{name}/video", m.video)):
            if x is None:
                continue
            for key in SCALARS:
                value = getattr(x, key)
                if value is not None and not math.isnan(value):
                    writer.add_scalar(f"{prefix}/{key}", value, step)
    writer.flush()


def report(results: dict[str, FASMetrics], out_dir: Path, writer=None, step: int = 0,
           scored: dict[str, ScoredSet] | None = None,
           protocol: str = "auto", calibration: dict[str, Any] | None = None) -> str:
    """Print the tables and write eval_metrics.json/.md, eval_tables.json/.md (paper layouts, when a
    test set maps to a protocol column), eval_scores.json (per sample), ROC/histogram PNGs (with
    ``scored``) and TensorBoard scalars and images."""
    from trainer.plots import plot_sets
    from trainer.tables import paper_tables

    out_dir.mkdir(parents=True, exist_ok=True)
    as_json = {k: m.as_dict() for k, m in results.items()}
    for name, s in (scored or {}).items():
        as_json[name]["dataset"] = s.dataset
    paper_md, paper_json = paper_tables(as_json, protocol)
    sections = [format_table(results)]
    if any(m.per_attack for m in results.values()):
        sections.append(format_attack_table(results))
    if calibration:
        sections.append(f"Fixed threshold {calibration['threshold']:.4f}: {calibration['source']}.")
    if paper_md:
        sections.append(paper_md)
    table = "\n\n".join(sections)
    print(table, flush=True)
    if scored is not None:
        (out_dir / "eval_scores.json").write_text(json.dumps({name: s.by_key() for name, s in scored.items()}, indent=1))
    (out_dir / "eval_metrics.json").write_text(json.dumps(as_json, indent=2))
    (out_dir / "eval_metrics.md").write_text(table + "\n")
    if paper_json:
        (out_dir / "eval_tables.md").write_text(paper_md + "\n")
        (out_dir / "eval_tables.json").write_text(json.dumps(paper_json, indent=2))
    if calibration:
        (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2))
    if scored:
        plot_sets({name: (s.scores, s.live, {"test EER thr": results[name].eer_threshold,
                                             "fixed thr": results[name].fixed_threshold})
                   for name, s in scored.items()}, out_dir / "plots", writer, step)
    if writer is not None:
        log_metrics(writer, results, step)
    return table


# ----- periodic evaluation during training -----

class PeriodicEvaluator:
    """Held-out evaluation every ``cfg.eval.every`` steps inside the training loop, with best-step
    tracking by held-out HTER (mean over the sets, at each set's EER threshold).

    Call ``maybe_run(engine, step)`` on EVERY rank after each step (the forwards and the gather are
    collective); ``writer`` is None except on rank 0, which alone writes TensorBoard scalars,
    ``eval_history.jsonl`` and ``best.json``. Every rank gets the same metrics back, and
    ``last_was_best`` is the same on every rank, so a collective "save the best checkpoint" can
    follow it. ``run(engine, step, final=True)`` is the end-of-training evaluation: the full report
    (tables, per-sample scores, plots) in ``out_dir``; call it instead of ``maybe_run`` at the last
    step. A resumed run continues the ``best.json`` already in ``out_dir``.
    """

    def __init__(self, cfg: RunConfig, sets: dict[str, list[str]] | list[str], builder: PromptBuilder,
                 transform: ImageTransform, info: WorldInfo, pad_id: int, writer=None,
                 out_dir: str | Path = ".") -> None:
        self.cfg, self.builder, self.transform, self.info, self.pad_id = cfg.eval, builder, transform, info, pad_id
        self.sets = {"held-out": list(sets)} if isinstance(sets, list) else dict(sets)
        self.dev_urls = resolve_shards(cfg.eval.dev_shards, "eval.dev_shards") if cfg.eval.dev_shards else []
        self.writer, self.out_dir = writer, Path(out_dir)
        self.best: dict[str, Any] | None = None
        self.last_was_best = False
        self._restored = False

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def maybe_run(self, engine, step: int) -> dict[str, FASMetrics] | None:
        return self.run(engine, step) if self.due(step) else None

    def run(self, engine, step: int, final: bool = False) -> dict[str, FASMetrics]:
        c = self.cfg
        engine.eval()
        try:
            calibration = (dev_threshold(engine, self.dev_urls, c.dev_split, self.builder, self.transform, self.info,
                                         c.batch_size, self.pad_id, c.max_samples) if self.dev_urls else None)
            scored = {name: gather_scored(collect_scores(engine, urls, self.builder, self.transform, self.info,
                                                         c.batch_size, self.pad_id, c.max_samples), self.info)
                      for name, urls in self.sets.items()}
        finally:
            engine.train()
        threshold = calibration["threshold"] if calibration else None
        results = {name: s.metrics(threshold) for name, s in scored.items()}
        if not self._restored:  # a resumed run keeps the best of the steps before the resume
            best_file = self.out_dir / "best.json"
            mine = json.loads(best_file.read_text()) if self.info.is_main and best_file.is_file() else None
            self.best = gather_objects(mine, self.info)[0]  # rank 0's view on every rank (no shared FS needed)
            self._restored = True
        hter = float(np.mean([m.hter for m in results.values()]))
        self.last_was_best = self.best is None or hter < self.best["hter"]
        if self.last_was_best:
            self.best = {"step": step, "hter": hter, "tag": f"step_{step:08d}",
                         "sets": {k: m.hter for k, m in results.items()}}
        if self.info.is_main:
            self._write(step, results, calibration, scored if final else None)
        return results

    def _write(self, step: int, results: dict[str, FASMetrics], calibration: dict[str, Any] | None,
               scored: dict[str, ScoredSet] | None) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "eval_history.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "threshold_fixed": calibration["threshold"] if calibration else None,
                                "sets": {k: m.as_dict() for k, m in results.items()}}) + "\n")
        (self.out_dir / "best.json").write_text(json.dumps(self.best, indent=2))
        if scored is not None:
            report(results, self.out_dir, self.writer, step, scored=scored, calibration=calibration)
        elif self.writer is not None:
            log_metrics(self.writer, results, step)
        if self.writer is not None:
            self.writer.add_scalar("eval/best_hter", self.best["hter"], step)
            self.writer.flush()
        log.info("eval at step %d: %s (best %.4f at step %d)", step,
                 ", ".join(f"{k} HTER {m.hter:.4f} AUC {m.auc:.4f}" for k, m in results.items()),
                 self.best["hter"], self.best["step"])


# ----- the standalone command -----

def parse_set(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its directory) -> (name, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return (Path(spec.rstrip("/")).name or spec), spec


def load_model_dir(path: str, tag: str | None, out_dir: Path, info: WorldInfo):
    """An exported model directory, or a training run directory whose checkpoint (latest, or
    ``tag``) is consolidated into OUT/export first (by rank 0; the others wait)."""
    from trainer.model import CONFIG_NAME, IFASModel, ModelLoadError

    p = Path(path)
    if not (p / CONFIG_NAME).is_file():
        from trainer.export import export_run
        from trainer.train import MODEL_CONFIG_DIR

        if not (p / MODEL_CONFIG_DIR / CONFIG_NAME).is_file():
            raise ModelLoadError(f"--model {p} is neither an exported model (no {CONFIG_NAME}) nor a training run "
                                 f"(no {MODEL_CONFIG_DIR}/{CONFIG_NAME}); pass <run>/export or the run directory")
        target = out_dir / f"export_{tag or 'latest'}"
        if info.is_main:
            export_run(p, target, tag)
        _barrier(info)
        p = target
    return IFASModel.from_pretrained(p)


def _barrier(info: WorldInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def explain_set(model, tokenizer, keeper, scored: ScoredSet, threshold: float, modes: list[str],
                max_new_tokens: int, batch_size: int, info: WorldInfo, seed: int = 0):
    """Explain this rank's kept samples (judgment = score >= threshold) in each decoding mode;
    every rank's records and images gathered."""
    from trainer.explain import Explained, generate_explanations, to_uint8_image

    dev = device()
    score_of = scored.by_key()
    chosen = keeper.select(keeper.per_type)  # this rank's share of the samples to explain
    records, images = [], {}
    for start in range(0, len(chosen), batch_size):
        group = chosen[start:start + batch_size]
        ids = torch.stack([g["input_ids"] for g in group]).to(dev)
        pixels = torch.stack([g["pixel_values"] for g in group]).to(dev)
        live = [score_of[g["key"]] >= threshold for g in group]
        for mode in modes:
            texts = generate_explanations(model, tokenizer, ids, pixels, live, mode, max_new_tokens,
                                          seed=seed + info.rank * 1000 + start)
            records += [Explained(g["key"], g["attack"], score_of[g["key"]], "Yes" if lv else "No", mode, t)
                        for g, lv, t in zip(group, live, texts)]
        for g in group:
            images[g["key"]] = to_uint8_image(g["pixel_values"], model.arch.image_mean, model.arch.image_std)
    gathered = gather_objects((records, images), info)
    return [r for rs, _ in gathered for r in rs], {k: v for _, im in gathered for k, v in im.items()}


def threshold_from_file(path: str | Path) -> tuple[float, str]:
    """A decision threshold from a calibration.json ({"threshold": t}) or an eval_metrics.json
    (the fixed held-out threshold; else the EER threshold of its only test set)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--threshold-from {p} does not exist; pass calibration.json or eval_metrics.json "
                                "written by ifas-eval")
    data = json.loads(p.read_text())
    if isinstance(data.get("threshold"), (int, float)):
        return float(data["threshold"]), f"{p} ({data.get('source', 'calibration')})"
    fixed = {v.get("fixed_threshold") for v in data.values() if isinstance(v, dict)} - {None}
    if len(fixed) == 1:
        return float(fixed.pop()), f"{p} (threshold fixed on held-out training data)"
    sets = [k for k, v in data.items() if isinstance(v, dict) and v.get("eer_threshold") is not None]
    if len(sets) == 1:
        log.warning("%s has no fixed threshold: using the EER threshold of test set %r, which was chosen on that "
                    "test set's own labels", p, sets[0])
        return float(data[sets[0]]["eer_threshold"]), f"{p} (EER threshold of test set {sets[0]})"
    raise ValueError(f"--threshold-from {p} holds no single threshold (no fixed threshold and {len(sets)} test sets); "
                     "evaluate with --dev-shards to fix one, or pass --threshold")


def merge_results(paths: list[str]) -> dict[str, dict[str, Any]]:
    """Test-set entries of several eval_metrics.json files (e.g. the four OCIM runs)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--merge {p} does not exist; pass eval_metrics.json files written by ifas-eval")
        for name, entry in json.loads(p.read_text()).items():
            if name in merged:
                name = f"{name}@{p.parent.name}"
            merged[name] = entry
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ifas-eval", description="Evaluate an I-FAS model on test shard sets.")
    parser.add_argument("--model", help="exported model directory, or a training run directory (its checkpoint is "
                                        "consolidated first)")
    parser.add_argument("--tag", default=None, help="checkpoint tag of a run directory (default: latest)")
    parser.add_argument("--out", default=None, help="output directory (default: --model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=0, help="cap per test set (0 = all)")
    parser.add_argument("--dev-shards", nargs="+", default=[], help="held-out training shard sets that fix the "
                                                                    "decision threshold (EER threshold there)")
    parser.add_argument("--dev-split", default="val", help='dev samples used: this "split" value ("" = all)')
    parser.add_argument("--threshold-from", default=None, help="fixed threshold from calibration.json/eval_metrics.json")
    parser.add_argument("--protocol", default="auto", help="paper table layout: auto, ocim or one_to_eleven")
    parser.add_argument("--explain-samples", type=int, default=16, help="explained samples per test set (0 = none)")
    parser.add_argument("--explain-modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    parser.add_argument("--max-new-tokens", type=int, default=48, help="explanation length cap (tokens)")
    parser.add_argument("--tb", default=None, help="TensorBoard log dir (default: OUT/tb)")
    parser.add_argument("--merge", nargs="+", default=None, help="render the tables from these eval_metrics.json "
                                                                 "files (no model needed)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("shards", nargs="*", help="test shard sets: PATH or NAME=PATH (directory, glob, brace pattern)")
    return parser


def _merge_main(args: argparse.Namespace) -> int:
    from trainer.tables import paper_tables

    merged = merge_results(args.merge)
    md, data = paper_tables(merged, args.protocol)
    if not md:
        raise ValueError("no test set in the merged files maps to a protocol column; name the sets NAME=PATH "
                         "(e.g. M=..., CASIA-MFSD=...) or pass --protocol")
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_tables.md").write_text(md + "\n")
    (out / "eval_tables.json").write_text(json.dumps(data, indent=2))
    print(md)
    return 0


def run_eval(args: argparse.Namespace, info: WorldInfo) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from shards.keywords import load_keywords
    from trainer.explain import SampleKeeper, explanation_metrics, log_examples, records_as_dicts

    if not args.model:
        raise ValueError("--model is required (or --merge to render tables from existing results)")
    if not args.shards:
        raise ValueError("give at least one test shard set (PATH or NAME=PATH)")
    out = Path(args.out or args.model)
    keywords = load_keywords() if args.explain_samples > 0 else {}
    model, tokenizer = load_model_dir(args.model, args.tag, out, info)
    model.to(device()).eval()
    builder = PromptBuilder(tokenizer, model.num_image_tokens, max_length=PROMPT_ONLY_MAX_LENGTH)
    transform = ImageTransform(model.arch.image_size, model.arch.image_mean, model.arch.image_std)
    sets = [parse_set(s) for s in args.shards]
    if len({n for n, _ in sets}) != len(sets):
        raise ValueError(f"test set names repeat ({[n for n, _ in sets]}); name them NAME=PATH")
    urls = {name: resolve_shards([path], f"test set {name}") for name, path in sets}
    if args.dev_shards and args.threshold_from:
        raise ValueError("give --dev-shards or --threshold-from, not both: each fixes the threshold")
    calibration = None
    if args.dev_shards:
        calibration = dev_threshold(model, resolve_shards(args.dev_shards, "--dev-shards"), args.dev_split, builder,
                                    transform, info, args.batch_size, tokenizer.pad_token_id)
    elif args.threshold_from:
        t, source = threshold_from_file(args.threshold_from)
        calibration = {"threshold": t, "source": source}
    threshold = calibration["threshold"] if calibration else None
    writer = SummaryWriter(str(args.tb or out / "tb")) if info.is_main else None
    results, scored, explained = {}, {}, {}
    for name, set_urls in urls.items():
        keeper = SampleKeeper(max(1, math.ceil(args.explain_samples / info.world_size)))
        part = collect_scores(model, set_urls, builder, transform, info, args.batch_size, tokenizer.pad_token_id,
                              args.max_samples, on_batch=keeper.offer if args.explain_samples > 0 else None)
        scored[name] = gather_scored(part, info)
        results[name] = scored[name].metrics(threshold)
        if args.explain_samples > 0:
            decide = threshold if threshold is not None else results[name].eer_threshold
            records, images = explain_set(model, tokenizer, keeper, scored[name], decide,
                                          args.explain_modes, args.max_new_tokens, args.batch_size, info)
            explained[name] = {"threshold": decide, "metrics": {m: explanation_metrics(
                [r for r in records if r.mode == m], keywords) for m in args.explain_modes},
                "examples": records_as_dicts(records)}
            if writer is not None:
                log_examples(writer, name, records, images)
                for mode, em in explained[name]["metrics"].items():
                    for key in ("cue_hit_rate", "wrong_cue_rate", "live_cue_rate", "contradiction_rate"):
                        if not math.isnan(em[key]):
                            writer.add_scalar(f"explain/{name}/{mode}/{key}", em[key], 0)
    if info.is_main:
        report(results, out, writer, scored=scored, protocol=args.protocol, calibration=calibration)
        if explained:
            (out / "eval_explanations.json").write_text(json.dumps(jsonable(explained), indent=2))
            explanation_table = format_explanation_table(explained)
            print("\n" + explanation_table, flush=True)
            with open(out / "eval_metrics.md", "a") as f:
                f.write("\n" + explanation_table + "\n")
        writer.close()


def format_explanation_table(explained: dict[str, dict[str, Any]]) -> str:
    def pct(x: float, scale: float = 100.0) -> str:
        return "-" if x is None or math.isnan(x) else f"{scale * x:.1f}"

    lines = ["| test set | decoding | samples | names true attack cue % | only other attack cues % | live cue on live % "
             "| contradicts judgment % | mean words |", "|---" * 8 + "|"]
    for name, e in explained.items():
        for mode, m in e["metrics"].items():
            lines.append(f"| {name} | {mode} | {m['samples']} | {pct(m['cue_hit_rate'])} | {pct(m['wrong_cue_rate'])} | "
                         f"{pct(m['live_cue_rate'])} | {pct(m['contradiction_rate'])} | {pct(m['mean_words'], 1.0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return finish_process(_main(argv))


def _main(argv: list[str] | None) -> int:
    from trainer.model import ModelLoadError

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            return _merge_main(args)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            from trainer.dist import init_distributed

            info = init_distributed()
        else:
            info = WorldInfo(0, 0, 1)
        try:
            run_eval(args, info)
        finally:
            shutdown_distributed()
    except (ModelLoadError, ShardSetError, ValueError, FileNotFoundError) as exc:
        print(f"ifas-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
