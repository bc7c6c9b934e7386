"""Ablation grid (console script ``ifas-ablation``): train one model per variant, each with one part
of the method turned off, then tabulate held-out HTER/AUC in the layout of the paper's ablation.

    ifas-ablation --protocol launch/configs/demo.yaml --steps 300 --out runs/ablation

Each variant is a separate training run (``deepspeed launch/train.sh --config PROTOCOL
train.output_dir=OUT/VARIANT/seedS ... overrides``), evaluated on the protocol's ``eval_shards``
at the end; its ``eval_metrics.json`` feeds the table. Variants and their overrides live in
``launch/configs/ablation.yaml``. A run whose ``eval_metrics.json`` already exists is reused
(delete it to rerun), so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import PROJECT_ROOT as ROOT
from trainer.config import ConfigError, load_config
from trainer.dist import free_port
from trainer.eval.paper_tables import ONE_TO_ELEVEN
from trainer.logs import setup_logging
from trainer.run_dir import EVAL_EXPLANATIONS, EVAL_METRICS

log = logging.getLogger("ifas.ablation")

DEFAULT_GRID = ROOT / "launch" / "configs" / "ablation.yaml"
CAPTION_LABELS = {"shards": None, "none": "judgment only", "template": "template", "spoof_aware": "SCF"}


class AblationError(ValueError):
    """The grid or protocol cannot be run; the message names the file/flag and the fix."""


@dataclass(frozen=True)
class Variant:
    name: str
    gac: bool
    llm: bool  # lopsided LM loss on (False = plain LM loss)
    captions: str  # shards | none | template | spoof_aware
    overrides: tuple[str, ...] = ()
    requires_caption_source: str | None = None  # run only when the training shards hold such captions
    requires_augment: bool = False  # run only when the protocol trains with data.augment on
    after: str | None = None  # a second stage (GRPO): starts from this variant's run of the same seed


@dataclass
class RunOutcome:
    variant: str
    seed: int
    status: str  # done | reused | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval set -> eval_metrics.json entry


def load_grid(path: str | Path) -> list[Variant]:
    p = Path(path)
    if not p.is_file():
        raise AblationError(f"ablation grid {p} does not exist; pass --grid launch/configs/ablation.yaml or a copy")
    try:
        data = yaml.safe_load(p.read_text()) or {}
        variants = [
            Variant(
                name=v["name"],
                gac=bool(v["gac"]),
                llm=bool(v["llm"]),
                captions=str(v["captions"]),
                overrides=tuple(v.get("overrides") or ()),
                requires_caption_source=v.get("requires_caption_source"),
                requires_augment=bool(v.get("requires_augment", False)),
                after=v.get("after"),
            )
            for v in data["variants"]
        ]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise AblationError(
            f"ablation grid {p} is malformed ({type(exc).__name__}: {exc}); every variant needs "
            "name, gac, llm, captions and overrides"
        ) from exc
    bad = [v.captions for v in variants if v.captions not in CAPTION_LABELS]
    if bad:
        raise AblationError(f"ablation grid {p}: captions {bad[0]!r} is not one of {sorted(CAPTION_LABELS)}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise AblationError(f"ablation grid {p}: variant names repeat ({names})")
    for i, v in enumerate(variants):
        if v.after is not None and v.after not in names[:i]:
            raise AblationError(f"ablation grid {p}: {v.name} starts after {v.after!r}, which must be a variant "
                                "listed before it")
    return variants


def caption_sources(specs: list[str], per_set: int = 200) -> Counter:
    """Counts of ``caption_source`` in the first ``per_set`` samples of each training shard set."""
    import webdataset as wds

    from trainer.data import resolve_shards

    counts: Counter = Counter()
    for spec in specs:
        urls = resolve_shards([spec], "data.train_shards")
        ds = wds.WebDataset(
            urls,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
            select_files=lambda name: name.endswith(".json"),
            handler=wds.warn_and_continue,
        )
        for i, raw in enumerate(ds):
            if i >= per_set:
                break
            counts[json.loads(raw["json"]).get("caption_source", "none")] += 1
    return counts


def skip_reason(variant: Variant, sources: Counter, protocol: Path, base: list[str]) -> str:
    """Why ``variant`` cannot run on this protocol ("" when it can)."""
    need = variant.requires_caption_source
    if need and sources.get(need, 0) == 0:
        held = ", ".join(f"{k}: {v}" for k, v in sorted(sources.items())) or "none"
        return (
            f"not comparable here: the training shards hold no {need} captions (caption_source {held}), "
            f"so the full variant already trains on what this variant would substitute"
        )
    try:
        load_config(protocol, base + list(variant.overrides))
        if variant.requires_augment and not load_config(protocol, base).data.augment.enabled:
            return ("not comparable here: the protocol trains without augmentation (data.augment.enabled false), "
                    "so the full variant already is this one")
    except ConfigError as exc:
        return f"not runnable: {exc}"
    return ""


def _venv_path() -> str:
    """PATH with this interpreter's bin first (the deepspeed launcher of the same install)."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def train_command(protocol: Path, out: Path, overrides: list[str], ranks: int) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=_venv_path())
    if deepspeed is None:
        raise AblationError(
            "the deepspeed launcher is not on PATH; install the project (make install) or activate its venv"
        )
    return [
        deepspeed,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(ROOT / "launch" / "train.sh"),
        "--config",
        str(protocol),
        f"train.output_dir={out}",
        *overrides,
    ]


def read_metrics(run_dir: Path) -> dict[str, dict[str, Any]]:
    """eval_metrics.json's entry per test set, with the greedy explanation metrics of that set under
    ``"explain"`` where the run explained samples (``eval.explain_samples``; the GRPO row does)."""
    path = run_dir / EVAL_METRICS
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    explained = run_dir / EVAL_EXPLANATIONS
    if metrics and explained.is_file():
        for name, entry in json.loads(explained.read_text()).items():
            greedy = entry.get("metrics", {}).get("greedy")
            if name in metrics and greedy:
                metrics[name]["explain"] = greedy
    return metrics


def run_grid(
    variants: list[Variant],
    protocol: Path,
    out: Path,
    steps: int | None,
    seeds: list[int],
    ranks: int,
    extra: list[str],
    sources: Counter,
    dry_run: bool = False,
) -> list[RunOutcome]:
    """Train (or reuse) every variant x seed; a failed run is recorded, not fatal, so the grid goes on.
    ``sources``: caption_source counts of the training shards (decides the caption variants)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PATH=_venv_path())
    outcomes = []
    for variant in variants:
        for seed in seeds:
            base = (
                list(extra)
                + [f"train.seed={seed}", "eval.at_end=true"]
                + ([f"train.max_steps={steps}"] if steps else [])
                + ([f"model.init_from={out / variant.after / f'seed{seed}'}"] if variant.after else [])
            )
            reason = skip_reason(variant, sources, protocol, base)
            run_dir = out / variant.name / f"seed{seed}"
            if reason:
                log.info("%s: skipped (%s)", variant.name, reason)
                outcomes.append(RunOutcome(variant.name, seed, "skipped", reason))
                continue
            finished = read_metrics(run_dir)
            if finished:
                outcomes.append(RunOutcome(variant.name, seed, "reused", metrics=finished))
                continue
            cmd = train_command(protocol, run_dir, base + list(variant.overrides), ranks)
            if dry_run:
                print(" ".join(cmd))
                outcomes.append(RunOutcome(variant.name, seed, "skipped", "dry run"))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            log.info("%s seed %d: training (log: %s)", variant.name, seed, run_dir / "train.log")
            t0 = time.perf_counter()
            with open(run_dir / "train.log", "w") as logf:
                proc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - t0
            metrics = read_metrics(run_dir)
            if proc.returncode != 0 or not metrics:
                outcomes.append(
                    RunOutcome(
                        variant.name, seed, "failed", f"exit {proc.returncode}; see {run_dir / 'train.log'}", seconds
                    )
                )
                log.error(
                    "%s seed %d failed (exit %d); see %s", variant.name, seed, proc.returncode, run_dir / "train.log"
                )
                continue
            outcomes.append(RunOutcome(variant.name, seed, "done", seconds=seconds, metrics=metrics))
            (run_dir / "ablation_run.json").write_text(json.dumps({"seconds": seconds, "command": cmd}, indent=2))
    return outcomes


# (column label, metric) of the optional table columns; metric "explain.X" is explanation metric X.
OPTIONAL_COLUMNS = [
    ("HTER@fixed %", "hter_fixed"),
    ("true-attack cue %", "explain.cue_hit_rate"),
    ("contradictions %", "explain.contradiction_rate"),
]


def _optional_value(entry: dict[str, Any] | None, key: str) -> float | None:
    """100 x the metric ``key`` of one run's test-set entry, or None where the run did not report it."""
    value: Any = entry or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else 100 * float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    m, s = _mean_std(values)
    return f"{m:.2f}" + (f" ± {s:.2f}" if len(values) > 1 else "")


def ablation_table(
    variants: list[Variant], outcomes: list[RunOutcome], shards_caption: str
) -> tuple[str, dict[str, Any]]:
    """Markdown + JSON: one row per variant (component check marks, HTER/AUC per held-out set and
    their average, mean ± std over seeds), the paper's figure beside the full method."""
    sets: list[str] = []
    for o in outcomes:
        sets += [s for s in o.metrics if s not in sets]
    mark = {True: "✓", False: "✗"}
    cols = [f"{s} HTER %" for s in sets] + [f"{s} AUC %" for s in sets]
    if len(sets) > 1:
        cols += ["avg HTER %", "avg AUC %"]
    # Columns only where some run reports them: the HTER at the dev-fixed threshold (the deployment
    # figure) and the explanation metrics of runs that explained samples.
    optional = [
        (f"{s} {label}", s, key)
        for s in sets
        for label, key in OPTIONAL_COLUMNS
        if any(_optional_value(o.metrics.get(s), key) is not None for o in outcomes)
    ]
    cols += [label for label, _, _ in optional]
    header = (
        "| variant | GAC | L-LM | captions | " + " | ".join(cols) + " | paper HTER/AUC (One to Eleven avg) | note |"
    )
    lines = [header, "|---" * (len(cols) + 6) + "|"]
    data: dict[str, Any] = {"test_sets": sets, "rows": {}}
    paper_full = ONE_TO_ELEVEN.paper["I-FAS (paper)"]["avg"]
    for v in variants:
        runs = [o for o in outcomes if o.variant == v.name]
        ok = [o for o in runs if o.status in ("done", "reused")]
        per_seed = {
            s: (
                [100 * o.metrics[s]["hter"] for o in ok if s in o.metrics],
                [100 * o.metrics[s]["auc"] for o in ok if s in o.metrics],
            )
            for s in sets
        }
        avg_h = [
            sum(100 * o.metrics[s]["hter"] for s in sets) / len(sets) for o in ok if all(s in o.metrics for s in sets)
        ]
        avg_a = [
            sum(100 * o.metrics[s]["auc"] for s in sets) / len(sets) for o in ok if all(s in o.metrics for s in sets)
        ]
        cells = [_cell(per_seed[s][0]) for s in sets] + [_cell(per_seed[s][1]) for s in sets]
        if len(sets) > 1:
            cells += [_cell(avg_h), _cell(avg_a)]
        extra = {
            label: [v for v in (_optional_value(o.metrics.get(s), key) for o in ok) if v is not None]
            for label, s, key in optional
        }
        cells += [_cell(values) for values in extra.values()]
        captions = CAPTION_LABELS[v.captions] or shards_caption
        note = "; ".join(sorted({o.reason for o in runs if o.reason})) or (f"{len(ok)} seed(s)" if ok else "")
        paper = f"{paper_full[0]:.2f}/{paper_full[1]:.2f}" if v.name == "full" else "-"
        lines.append(
            f"| {v.name} | {mark[v.gac]} | {mark[v.llm]} | {captions} | " + " | ".join(cells) + f" | {paper} | {note} |"
        )
        data["rows"][v.name] = {
            "gac": v.gac,
            "llm": v.llm,
            "captions": captions,
            "overrides": list(v.overrides),
            "status": sorted({o.status for o in runs}),
            "note": note,
            "hter": {s: per_seed[s][0] for s in sets},
            "auc": {s: per_seed[s][1] for s in sets},
            "avg_hter": avg_h,
            "avg_auc": avg_a,
            **({"more": extra} if extra else {}),
            "seconds": [o.seconds for o in runs if o.seconds],
            "paper": {"hter": paper_full[0], "auc": paper_full[1]} if v.name == "full" else None,
        }
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", required=True, help="run config of the protocol, e.g. launch/configs/demo.yaml")
    parser.add_argument("--grid", default=str(DEFAULT_GRID), help="variants and their overrides (YAML)")
    parser.add_argument("--variants", nargs="*", default=None, help="run only these variants (names in the grid)")
    parser.add_argument(
        "--steps", type=int, default=None, help="train.max_steps of every run (default: the protocol's)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values; >1 gives mean ± std")
    parser.add_argument("--ranks", type=int, default=None, help="ranks per run (default: every GPU, or 2 on CPU)")
    parser.add_argument("--out", default="runs/ablation", help="output directory (one sub-directory per variant)")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        variants = load_grid(args.grid)
        if args.variants:
            unknown = sorted(set(args.variants) - {v.name for v in variants})
            if unknown:
                raise AblationError(
                    f"--variants {unknown[0]!r} is not in {args.grid}; known: {[v.name for v in variants]}"
                )
            variants = [v for v in variants if v.name in args.variants]
        protocol = Path(args.protocol)
        if args.steps is not None and args.steps < 1:
            raise AblationError(f"--steps must be >= 1, got {args.steps}")
        ranks = args.ranks or (__import__("torch").cuda.device_count() or 2)
        out = Path(args.out)
        cfg = load_config(protocol, args.overrides)
        if not cfg.data.eval_shards:
            raise AblationError(
                f"--protocol {protocol} has no data.eval_shards: the ablation compares held-out "
                "metrics; set data.eval_shards"
            )
        sources = caption_sources([s.path for s in cfg.data.train_sources()])
        t0 = time.perf_counter()
        outcomes = run_grid(
            variants, protocol, out, args.steps, args.seeds, ranks, args.overrides, sources, args.dry_run
        )
        if args.dry_run:
            return 0
        shards_caption = "/".join(CAPTION_LABELS.get(s, s) for s, _ in sources.most_common()) or "none"
    except (AblationError, ConfigError, ValueError) as exc:
        print(f"ifas-ablation: error: {exc}", file=sys.stderr)
        return 2
    table, data = ablation_table(variants, outcomes, shards_caption)
    steps = args.steps or cfg.train.max_steps
    title = (
        f"Ablation on {protocol} ({steps} steps, {ranks} ranks, seeds {args.seeds}); HTER at each test set's "
        f"EER threshold; wall time {time.perf_counter() - t0:.0f} s"
    )
    print(title + "\n\n" + table, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(f"{title}\n\n{table}\n")
    data.update(
        protocol=str(protocol), steps=steps, ranks=ranks, seeds=args.seeds, wall_seconds=time.perf_counter() - t0
    )
    (out / "ablation.json").write_text(json.dumps(data, indent=2))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
