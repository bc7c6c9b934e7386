"""Held-out evaluation inside the training loop, with best-step tracking (``PeriodicEvaluator``)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from shards.keywords import load_keywords
from trainer.config import RunConfig
from trainer.data import ImageTransform, resolve_shards
from trainer.data.provenance import synthetic_only_note
from trainer.dist import WorldInfo, gather_objects
from trainer.eval.explain import SampleKeeper, explain_set, explanation_metrics
from trainer.eval.metrics import FASMetrics, jsonable
from trainer.eval.report import report, report_explanations
from trainer.eval.scoring import ScoredSet, collect_scores, dev_threshold, gather_scored
from trainer.logs import MetricsWriter, Tags
from trainer.model.generation import model_for_generation
from trainer.run_dir import RunDir, tag_for
from trainer.sample.prompt import PromptBuilder

log = logging.getLogger("ifas.eval")


# How the best step is chosen, never by a threshold fitted on the test labels (docs/architecture.md, "Thresholds"):
# with dev samples, the held-out HTER at the threshold they fix (lower is better); without, the AUC (higher).
BEST_BY_DEV_HTER, BEST_BY_AUC = "hter_fixed", "auc"


def best_criterion(has_dev_set: bool) -> str:
    return BEST_BY_DEV_HTER if has_dev_set else BEST_BY_AUC


def _better(value: float, than: float, criterion: str) -> bool:
    return value < than if criterion == BEST_BY_DEV_HTER else value > than


class PeriodicEvaluator:
    """Held-out evaluation every ``cfg.eval.every`` steps inside the training loop, with best-step
    tracking (the mean over the held-out sets of ``best_criterion``'s metric, recorded in ``best.json``).

    Call ``maybe_run(engine, step)`` on EVERY rank after each step (the forwards and the gather are
    collective); ``writer`` writes on rank 0 only (trainer.logs.MetricsWriter), which alone writes
    ``eval_history.jsonl`` and ``best.json``. Every rank gets the same metrics back, and
    ``last_was_best`` is the same on every rank, so a collective "save the best checkpoint" can
    follow it. ``run(engine, step, final=True)`` is the end-of-training evaluation: the full report
    (tables, per-sample scores, plots) in ``out_dir``; call it instead of ``maybe_run`` at the last
    step. A resumed run continues the ``best.json`` already in ``out_dir``.
    """

    def __init__(self, cfg: RunConfig, sets: dict[str, list[str]] | list[str], builder: PromptBuilder,
                 transform: ImageTransform, info: WorldInfo, pad_id: int, writer: MetricsWriter | None = None,
                 out_dir: str | Path = ".", tokenizer=None) -> None:
        """``tokenizer``: with eval.explain_samples > 0, the one to decode the explanations with."""
        self.cfg, self.builder, self.transform, self.info, self.pad_id = cfg.eval, builder, transform, info, pad_id
        self.sets = {"held-out": list(sets)} if isinstance(sets, list) else dict(sets)
        self.dev_urls = resolve_shards(cfg.eval.dev_shards, "eval.dev_shards") if cfg.eval.dev_shards else []
        self.writer = writer if writer is not None else MetricsWriter(None)
        self.run_dir = RunDir(out_dir)
        self.criterion = best_criterion(bool(self.dev_urls))
        self.best: dict[str, Any] | None = None
        self.last_was_best = False
        self._restored = False
        self.tokenizer = tokenizer
        self.keywords = load_keywords() if cfg.eval.explain_samples > 0 else {}
        self.explained: dict[str, dict[str, Any]] = {}  # the last run's explanation metrics per set

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
            keepers = {name: SampleKeeper(max(1, math.ceil(c.explain_samples / self.info.world_size)))
                       for name in self.sets}
            scored = {name: gather_scored(collect_scores(engine, urls, self.builder, self.transform, self.info,
                                                         c.batch_size, self.pad_id, c.max_samples,
                                                         on_batch=keepers[name].offer if self.keywords else None),
                                          self.info)
                      for name, urls in self.sets.items()}
            threshold = calibration["threshold"] if calibration else None
            results = {name: s.metrics(threshold) for name, s in scored.items()}
            if self.keywords:
                self._explain(engine, keepers, scored, results, threshold)
        finally:
            engine.train()
        if not self._restored:  # a resumed run keeps the best of the steps before the resume
            self.best = gather_objects(self._saved_best() if self.info.is_main else None, self.info)[0]
            self._restored = True
        value = float(np.mean([getattr(m, self.criterion) for m in results.values()]))
        self.last_was_best = self.best is None or _better(value, self.best["value"], self.criterion)
        if self.last_was_best:
            self.best = {"step": step, "criterion": self.criterion, "value": value, "tag": tag_for(step),
                         "sets": {k: getattr(m, self.criterion) for k, m in results.items()},
                         "chosen_by": "held-out HTER at the threshold the dev samples fix" if self.dev_urls
                         else "held-out AUC (no dev set: no threshold that is not fitted on the test labels)"}
        if self.info.is_main:
            self._write(step, results, calibration, scored if final else None)
        return results

    def _explain(self, engine, keepers: dict[str, SampleKeeper], scored: dict[str, ScoredSet],
                 results: dict[str, FASMetrics], threshold: float | None) -> None:
        """Greedy explanations of eval.explain_samples held-out samples per set, after the judgment the fixed
        threshold decides (the set's EER threshold without a dev set), scored with the keyword metrics."""
        self.explained = {}
        for name, keeper in keepers.items():
            decide = threshold if threshold is not None else results[name].eer_threshold
            with model_for_generation(engine) as model:
                records, _ = explain_set(model, self.tokenizer, keeper, scored[name], decide, ["greedy"],
                                         self.cfg.explain_max_new_tokens, self.cfg.batch_size, self.info,
                                         synced=self.info.world_size > 1)
            self.explained[name] = {"threshold": decide,
                                    "metrics": {"greedy": explanation_metrics(records, self.keywords)},
                                    "examples": [r.__dict__ for r in records]}

    def _saved_best(self) -> dict[str, Any] | None:
        """best.json of the steps before a resume, if it was chosen by this run's criterion."""
        if not self.run_dir.best.is_file():
            return None
        saved = json.loads(self.run_dir.best.read_text())
        if saved.get("criterion") != self.criterion:
            log.warning("%s chose its best step by %s, this run by %s: the earlier best is not carried over",
                        self.run_dir.best, saved.get("criterion", "the test EER HTER"), self.criterion)
            return None
        return saved

    def _write(self, step: int, results: dict[str, FASMetrics], calibration: dict[str, Any] | None,
               scored: dict[str, ScoredSet] | None) -> None:
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir.eval_history, "a") as f:
            f.write(json.dumps({"step": step, "threshold_fixed": calibration["threshold"] if calibration else None,
                                "sets": {k: m.as_dict() for k, m in results.items()},
                                "explanations": {k: jsonable(e["metrics"]["greedy"])
                                                 for k, e in self.explained.items()}}) + "\n")
        self.run_dir.best.write_text(json.dumps(self.best, indent=2))
        if scored is not None:
            report(results, self.run_dir.root, self.writer, step, scored=scored, calibration=calibration,
                   note=synthetic_only_note(self.run_dir.model_config))
        else:
            self.writer.eval_metrics(results, step)
        self.writer.scalars({Tags.eval_best(self.criterion): self.best["value"]}, step)
        self.writer.scalars({Tags.explanation(name, "greedy", key): e["metrics"]["greedy"][key]
                             for name, e in self.explained.items()
                             for key in ("cue_hit_rate", "wrong_cue_rate", "live_cue_rate", "contradiction_rate",
                                         "mean_words")}, step)
        if scored is not None and self.explained:
            report_explanations(self.explained, self.run_dir.root)
        log.info("eval at step %d: %s (best %s %.4f at step %d)", step,
                 ", ".join(f"{k} HTER {m.hter:.4f} AUC {m.auc:.4f}" for k, m in results.items()),
                 self.criterion, self.best["value"], self.best["step"])
