"""The ablation grid's results (console script ``ifas-ablation``, ``trainer/cli/ablation.py``): one
variant of the grid, one run's outcome, the metrics a finished run reports, and the table over variants and
seeds (markdown and JSON) in the layout of the paper's ablation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.eval.paper_tables import ONE_TO_ELEVEN
from trainer.run_dir import EVAL_EXPLANATIONS, EVAL_METRICS

CAPTION_LABELS = {"shards": None, "none": "judgment only", "template": "template", "spoof_aware": "SCF"}


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
            label: [x for x in (_optional_value(o.metrics.get(s), key) for o in ok) if x is not None]
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
