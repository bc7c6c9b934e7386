"""The evaluation report: tables printed and written (eval_metrics.json/.md, the paper's layouts in
eval_tables.json/.md, per-sample eval_scores.json, calibration.json), ROC and histogram PNGs and
TensorBoard scalars and images; and tables merged from several runs' eval_metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.eval.metrics import FASMetrics, format_attack_table, format_table, jsonable
from trainer.eval.paper_tables import paper_tables
from trainer.eval.plots import plot_sets
from trainer.eval.scoring import ScoredSet
from trainer.logs import MetricsWriter
from trainer.run_dir import CALIBRATION, EVAL_EXPLANATIONS, EVAL_METRICS


def report(
    results: dict[str, FASMetrics],
    out_dir: Path,
    writer: MetricsWriter | None = None,
    step: int = 0,
    scored: dict[str, ScoredSet] | None = None,
    protocol: str = "auto",
    calibration: dict[str, Any] | None = None,
    note: str | None = None,
) -> str:
    """Print the tables and write eval_metrics.json/.md, eval_tables.json/.md (paper layouts, when a
    test set maps to a protocol column), eval_scores.json (per sample), ROC/histogram PNGs (with
    ``scored``) and TensorBoard scalars and images. ``note`` heads the printed and written report
    (e.g. that the model was trained only on synthetic shards)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    as_json = {k: m.as_dict() for k, m in results.items()}
    for name, s in (scored or {}).items():
        as_json[name]["dataset"] = s.dataset
    paper_md, paper_json = paper_tables(as_json, protocol)
    sections = ([f"Note: {note}"] if note else []) + [format_table(results)]
    if any(m.per_attack for m in results.values()):
        sections.append(format_attack_table(results))
    if calibration:
        sections.append(f"Fixed threshold {calibration['threshold']:.4f}: {calibration['source']}.")
    if paper_md:
        sections.append(paper_md)
    table = "\n\n".join(sections)
    print(table, flush=True)
    if scored is not None:
        (out_dir / "eval_scores.json").write_text(
            json.dumps({name: s.by_key() for name, s in scored.items()}, indent=1)
        )
    (out_dir / EVAL_METRICS).write_text(json.dumps(as_json, indent=2))
    (out_dir / "eval_metrics.md").write_text(table + "\n")
    if paper_json:
        (out_dir / "eval_tables.md").write_text(paper_md + "\n")
        (out_dir / "eval_tables.json").write_text(json.dumps(paper_json, indent=2))
    if calibration:
        (out_dir / CALIBRATION).write_text(json.dumps(calibration, indent=2))
    if scored:
        plot_sets(
            {
                name: (
                    s.scores,
                    s.live,
                    {"test EER thr": results[name].eer_threshold, "fixed thr": results[name].fixed_threshold},
                )
                for name, s in scored.items()
            },
            out_dir / "plots",
            writer,
            step,
        )
    if writer is not None:
        writer.eval_metrics(results, step)
    return table


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


def report_explanations(explained: dict[str, dict[str, Any]], out_dir: Path) -> str:
    """Print the explanation table, append it to eval_metrics.md and write EVAL_EXPLANATIONS."""
    table = format_explanation_table(explained)
    (out_dir / EVAL_EXPLANATIONS).write_text(json.dumps(jsonable(explained), indent=2))
    print("\n" + table, flush=True)
    with open(out_dir / "eval_metrics.md", "a") as f:
        f.write("\n" + table + "\n")
    return table


def format_explanation_table(explained: dict[str, dict[str, Any]]) -> str:
    def pct(x: float, scale: float = 100.0) -> str:
        return "-" if x is None or math.isnan(x) else f"{scale * x:.1f}"

    lines = [
        "| test set | decoding | samples | names true attack cue % | only other attack cues % | live cue on live % "
        "| contradicts judgment % | mean words |",
        "|---" * 8 + "|",
    ]
    for name, e in explained.items():
        for mode, m in e["metrics"].items():
            lines.append(
                f"| {name} | {mode} | {m['samples']} | {pct(m['cue_hit_rate'])} | {pct(m['wrong_cue_rate'])} | "
                f"{pct(m['live_cue_rate'])} | {pct(m['contradiction_rate'])} | {pct(m['mean_words'], 1.0)} |"
            )
    return "\n".join(lines)
