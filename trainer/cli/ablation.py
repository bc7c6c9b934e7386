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
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from trainer.config import PROJECT_ROOT as ROOT
from trainer.config import ConfigError, load_config
from trainer.dist import free_port
from trainer.eval.ablation_table import CAPTION_LABELS, RunOutcome, Variant, ablation_table, read_metrics
from trainer.logs import setup_logging

log = logging.getLogger("ifas.ablation")

DEFAULT_GRID = ROOT / "launch" / "configs" / "ablation.yaml"


class AblationError(ValueError):
    """The grid or protocol cannot be run; the message names the file/flag and the fix."""


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
