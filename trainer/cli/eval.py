"""``ifas-eval``: evaluate a model on test shard sets, in one process or several
(``deepspeed --num_gpus N --module trainer.cli.eval ...`` / ``torchrun``).

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
import math
import os
import sys
from pathlib import Path

from shards.keywords import load_keywords
from trainer.config import size_arg
from trainer.data import ImageTransform, ShardSetError, resolve_shards
from trainer.data.provenance import synthetic_only_note
from trainer.dist import (
    WorldInfo,
    device,
    finish_process,
    init_distributed,
    shutdown_distributed,
    world_info_from_env,
)
from trainer.eval.explain import SampleKeeper, explain_set, explanation_metrics, log_examples, records_as_dicts
from trainer.eval.paper_tables import paper_tables
from trainer.eval.report import merge_results, report, report_explanations
from trainer.eval.scoring import (
    PROMPT_ONLY_MAX_LENGTH,
    collect_scores,
    dev_threshold,
    gather_scored,
    threshold_from_file,
)
from trainer.logs import MetricsWriter, Tags, setup_logging
from trainer.model.arch import ModelLoadError
from trainer.model.export import inference_dtype, model_dir
from trainer.model.ifas import IFASModel
from trainer.sample.prompt import PromptBuilder


def parse_set(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its directory) -> (name, path)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return (Path(spec.rstrip("/")).name or spec), spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ifas-eval", description="Evaluate an I-FAS model on test shard sets.")
    parser.add_argument(
        "--model", help="exported model directory, or a training run directory (its checkpoint is consolidated first)"
    )
    parser.add_argument("--tag", default=None, help="checkpoint tag of a run directory (default: latest)")
    parser.add_argument("--out", default=None, help="output directory (default: --model)")
    parser.add_argument("--batch-size", type=size_arg(1), default=32)
    parser.add_argument("--max-samples", type=size_arg(0), default=0, help="cap per test set (0 = all)")
    parser.add_argument(
        "--dev-shards",
        nargs="+",
        default=[],
        help="held-out training shard sets that fix the decision threshold (EER threshold there)",
    )
    parser.add_argument("--dev-split", default="val", help='dev samples used: this "split" value ("" = all)')
    parser.add_argument(
        "--threshold-from", default=None, help="fixed threshold from calibration.json/eval_metrics.json"
    )
    parser.add_argument("--protocol", default="auto", help="paper table layout: auto, ocim or one_to_eleven")
    parser.add_argument("--explain-samples", type=size_arg(0), default=16,
                        help="explained samples per test set (0 = none)")
    parser.add_argument("--explain-modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    parser.add_argument("--max-new-tokens", type=size_arg(1), default=48, help="explanation length cap (tokens)")
    parser.add_argument("--tb", default=None, help="TensorBoard log dir (default: OUT/tb)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="render the tables from these eval_metrics.json files (no model needed)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("shards", nargs="*", help="test shard sets: PATH or NAME=PATH (directory, glob, brace pattern)")
    return parser


def _merge_main(args: argparse.Namespace) -> int:
    merged = merge_results(args.merge)
    md, data = paper_tables(merged, args.protocol)
    if not md:
        raise ValueError(
            "no test set in the merged files maps to a protocol column; name the sets NAME=PATH "
            "(e.g. M=..., CASIA-MFSD=...) or pass --protocol"
        )
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_tables.md").write_text(md + "\n")
    (out / "eval_tables.json").write_text(json.dumps(data, indent=2))
    print(md)
    return 0


def run_eval(args: argparse.Namespace, info: WorldInfo, model_path: Path) -> None:
    """Evaluate the model directory ``model_path`` (``model_dir``'s, resolved before the process group)."""
    out = Path(args.out or args.model)
    keywords = load_keywords() if args.explain_samples > 0 else {}
    model, tokenizer = IFASModel.from_pretrained(model_path, dtype=inference_dtype(device()))
    model.to(device()).eval()
    builder = PromptBuilder(tokenizer, model.num_image_tokens, max_length=PROMPT_ONLY_MAX_LENGTH,
                            image_span=model.arch.image_span)
    transform = ImageTransform.for_model(model.arch)
    sets = [parse_set(s) for s in args.shards]
    if len({n for n, _ in sets}) != len(sets):
        raise ValueError(f"test set names repeat ({[n for n, _ in sets]}); name them NAME=PATH")
    urls = {name: resolve_shards([path], f"test set {name}") for name, path in sets}
    if args.dev_shards and args.threshold_from:
        raise ValueError("give --dev-shards or --threshold-from, not both: each fixes the threshold")
    calibration = None
    if args.dev_shards:
        calibration = dev_threshold(
            model,
            resolve_shards(args.dev_shards, "--dev-shards"),
            args.dev_split,
            builder,
            transform,
            info,
            args.batch_size,
            tokenizer.pad_token_id,
        )
    elif args.threshold_from:
        t, source = threshold_from_file(args.threshold_from)
        calibration = {"threshold": t, "source": source}
    threshold = calibration["threshold"] if calibration else None
    writer = MetricsWriter((args.tb or out / "tb") if info.is_main else None)
    results, scored, explained = {}, {}, {}
    for name, set_urls in urls.items():
        keeper = SampleKeeper(max(1, math.ceil(args.explain_samples / info.world_size)))
        part = collect_scores(
            model,
            set_urls,
            builder,
            transform,
            info,
            args.batch_size,
            tokenizer.pad_token_id,
            args.max_samples,
            on_batch=keeper.offer if args.explain_samples > 0 else None,
        )
        scored[name] = gather_scored(part, info)
        results[name] = scored[name].metrics(threshold)
        if args.explain_samples > 0:
            decide = threshold if threshold is not None else results[name].eer_threshold
            records, images = explain_set(
                model,
                tokenizer,
                keeper,
                scored[name],
                decide,
                args.explain_modes,
                args.max_new_tokens,
                args.batch_size,
                info,
            )
            explained[name] = {
                "threshold": decide,
                "metrics": {
                    m: explanation_metrics([r for r in records if r.mode == m], keywords) for m in args.explain_modes
                },
                "examples": records_as_dicts(records),
            }
            log_examples(writer, name, records, images)
            writer.scalars(
                {
                    Tags.explanation(name, mode, key): em[key]
                    for mode, em in explained[name]["metrics"].items()
                    for key in ("cue_hit_rate", "wrong_cue_rate", "live_cue_rate", "contradiction_rate")
                },
                0,
            )
    if info.is_main:
        note = synthetic_only_note(model_path)
        if note:
            print(f"ifas-eval: warning: {note}", file=sys.stderr, flush=True)
        report(results, out, writer, scored=scored, protocol=args.protocol, calibration=calibration, note=note)
        if explained:
            report_explanations(explained, out)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    return finish_process(_main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        if args.merge:
            return _merge_main(args)
        if not args.model:
            raise ValueError("--model is required (or --merge to render tables from existing results)")
        if not args.shards:
            raise ValueError("give at least one test shard set (PATH or NAME=PATH)")
        # a run directory is exported first, before any collective is open (minutes at 7B)
        model_path = model_dir(args.model, args.tag, Path(args.out or args.model), world_info_from_env())
        info = init_distributed() if int(os.environ.get("WORLD_SIZE", 1)) > 1 else WorldInfo(0, 0, 1)
        try:
            run_eval(args, info, model_path)
        finally:
            shutdown_distributed()
    except (ModelLoadError, ShardSetError, ValueError, FileNotFoundError) as exc:
        print(f"ifas-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
