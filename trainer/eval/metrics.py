"""Face anti-spoofing metrics on liveness scores (higher = more likely live).

APCER: spoofs accepted as live; BPCER: lives rejected; HTER = (APCER + BPCER) / 2 at a
threshold (score >= threshold means live, the convention of scikit-learn's ``roc_curve``).
ACER follows ISO/IEC 30107-3: APCER is taken per attack type (presentation attack instrument)
and the worst one counts, ACER = (max APCER + BPCER) / 2; without attack types it equals HTER.
The EER threshold is where APCER and BPCER cross on the ROC curve; AUC is ``roc_auc_score``;
TPR@FPR=1% is the best live acceptance with at most 1% of spoofs accepted. All curve maths is
scikit-learn's; this module only picks points off its curves.

A set with one class only (e.g. a live-only test set) has no ROC curve: AUC, EER and the EER
threshold are NaN, and at a fixed threshold only the rate of the present class is defined.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

NAN = float("nan")


@dataclass
class AttackMetrics:
    """One attack type against all live samples of its test set."""

    num: int
    apcer: float  # at the test set's EER threshold
    auc: float  # live vs this attack type
    eer: float
    apcer_fixed: float | None = None  # at the fixed (held-out) threshold


@dataclass
class FASMetrics:
    num_live: int
    num_spoof: int
    auc: float
    eer: float
    eer_threshold: float
    hter: float  # at the EER threshold of this set
    apcer: float
    bpcer: float
    acer: float = NAN  # ISO/IEC 30107-3, at the EER threshold
    tpr_at_fpr1: float = NAN  # TPR (live accepted) at FPR (spoof accepted) <= 1%
    # At a threshold fixed beforehand on held-out training data (None: no such threshold given).
    fixed_threshold: float | None = None
    hter_fixed: float | None = None
    apcer_fixed: float | None = None
    bpcer_fixed: float | None = None
    acer_fixed: float | None = None
    per_attack: dict[str, AttackMetrics] = field(default_factory=dict)
    video: "FASMetrics | None" = None  # the same on mean scores per video (None: no video ids)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None (JSON has no NaN)."""
        return jsonable(self)


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN floats as None, recursively through dicts, lists and dataclasses."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    return obj


def _one_class(live: np.ndarray) -> bool:
    return bool(live.all() or not live.any())


def error_rates(scores: np.ndarray, live: np.ndarray, threshold: float) -> tuple[float, float]:
    """(APCER, BPCER) at ``threshold``; a rate whose class is absent is NaN."""
    scores, live = np.asarray(scores, dtype=np.float64), np.asarray(live).astype(bool)
    accepted = scores >= threshold
    apcer = float(accepted[~live].mean()) if (~live).any() else NAN
    bpcer = float((~accepted[live]).mean()) if live.any() else NAN
    return apcer, bpcer


def eer_threshold(scores: np.ndarray, live: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) from the ROC curve: the point where APCER (fpr) and BPCER (1 - tpr) meet."""
    live = np.asarray(live).astype(bool)
    if _one_class(live):
        return NAN, NAN
    fpr, tpr, thresholds = roc_curve(live.astype(int), np.asarray(scores, dtype=np.float64))
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    threshold = float(min(thresholds[i], np.finfo(np.float64).max))  # roc_curve's first threshold is inf
    return float((fpr[i] + fnr[i]) / 2.0), threshold


def tpr_at_fpr(scores: np.ndarray, live: np.ndarray, max_fpr: float = 0.01) -> float:
    """Highest TPR on the ROC curve with FPR <= ``max_fpr`` (NaN for a one-class set)."""
    live = np.asarray(live).astype(bool)
    if _one_class(live):
        return NAN
    fpr, tpr, _ = roc_curve(live.astype(int), np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # fpr[0] == 0, so the set is never empty


def auc(scores: np.ndarray, live: np.ndarray) -> float:
    live = np.asarray(live).astype(bool)
    return NAN if _one_class(live) else float(roc_auc_score(live.astype(int), np.asarray(scores, dtype=np.float64)))


def video_level(
    scores: np.ndarray, live: np.ndarray, videos: Sequence[str], attacks: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Mean score per video (in order of first appearance), its label and attack type.
    A video's frames share one label; mixed labels mean broken video ids and are refused."""
    scores, live = np.asarray(scores, dtype=np.float64), np.asarray(live).astype(bool)
    order: dict[str, list[int]] = {}
    for i, v in enumerate(videos):
        order.setdefault(str(v), []).append(i)
    v_scores, v_live, v_att = [], [], []
    for vid, idx in order.items():
        labels = set(live[idx].tolist())
        if len(labels) > 1:
            raise ValueError(f"video {vid!r} holds both live and spoof frames; video ids must be unique per recording")
        v_scores.append(float(scores[idx].mean()))
        v_live.append(labels.pop())
        if attacks is not None:
            v_att.append(str(attacks[idx[0]]))
    return np.asarray(v_scores), np.asarray(v_live, dtype=bool), (v_att if attacks is not None else None)


def fas_metrics(
    scores: np.ndarray,
    live: np.ndarray,
    attacks: Sequence[str] | None = None,
    videos: Sequence[str] | None = None,
    threshold: float | None = None,
) -> FASMetrics:
    """All metrics of one test set: at its own EER threshold, at ``threshold`` (fixed on held-out
    training data) when given, per attack type when ``attacks`` are given, and at video level
    (mean score per video) when ``videos`` are given and some video has several frames."""
    scores, live = np.asarray(scores, dtype=np.float64), np.asarray(live).astype(bool)
    if len(scores) != len(live) or len(scores) == 0:
        raise ValueError(
            f"metrics need as many scores as labels, and some: got {len(scores)} scores, {len(live)} labels"
        )
    if _one_class(live):
        warnings.warn(
            f"test set has {int(live.sum())} live and {int((~live).sum())} spoof samples: AUC/EER are "
            "undefined (NaN); only the present class's error rate at a fixed threshold is",
            stacklevel=2,
        )
    eer, thr = eer_threshold(scores, live)
    apcer, bpcer = error_rates(scores, live, thr) if not math.isnan(thr) else (NAN, NAN)
    m = FASMetrics(
        num_live=int(live.sum()),
        num_spoof=int((~live).sum()),
        auc=auc(scores, live),
        eer=eer,
        eer_threshold=thr,
        hter=(apcer + bpcer) / 2.0,
        apcer=apcer,
        bpcer=bpcer,
        tpr_at_fpr1=tpr_at_fpr(scores, live),
    )
    if threshold is not None:
        a, b = error_rates(scores, live, threshold)
        m.fixed_threshold, m.apcer_fixed, m.bpcer_fixed = float(threshold), a, b
        m.hter_fixed = (a + b) / 2.0
    if attacks is not None:
        att = np.asarray(attacks, dtype=object)
        for a in sorted(set(att[~live].tolist())):
            sel = live | (att == a)
            m.per_attack[a] = AttackMetrics(
                num=int((att[~live] == a).sum()),
                apcer=error_rates(scores[sel], live[sel], thr)[0] if not math.isnan(thr) else NAN,
                auc=auc(scores[sel], live[sel]),
                eer=eer_threshold(scores[sel], live[sel])[0],
                apcer_fixed=error_rates(scores[sel], live[sel], threshold)[0] if threshold is not None else None,
            )
    # ACER (ISO/IEC 30107-3): the worst attack type's APCER with BPCER; HTER without attack types
    worst = m.per_attack.values()
    m.acer = (max(x.apcer for x in worst) + m.bpcer) / 2.0 if m.per_attack else m.hter
    if threshold is not None:
        m.acer_fixed = (max(x.apcer_fixed for x in worst) + m.bpcer_fixed) / 2.0 if m.per_attack else m.hter_fixed
    if videos is not None and len(set(map(str, videos))) < len(scores):
        v_scores, v_live, v_att = video_level(scores, live, videos, attacks)
        m.video = fas_metrics(v_scores, v_live, v_att, None, threshold)
    return m


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def format_table(rows: dict[str, FASMetrics]) -> str:
    """A Markdown table per test set and level (frame; video when known), in percent.
    "@fixed" columns are at the threshold fixed on held-out training data ("-" when none)."""
    lines = [
        "| test set | level | live | spoof | HTER % | AUC % | EER % | TPR@FPR1% % | APCER % | BPCER % | ACER % "
        "| HTER@fixed % | ACER@fixed % |",
        "|---" * 13 + "|",
    ]
    for name, m in rows.items():
        for level, x in (("frame", m), ("video", m.video)):
            if x is None:
                continue
            lines.append(
                f"| {name} | {level} | {x.num_live} | {x.num_spoof} | {_pct(x.hter)} | {_pct(x.auc)} | "
                f"{_pct(x.eer)} | {_pct(x.tpr_at_fpr1)} | {_pct(x.apcer)} | {_pct(x.bpcer)} | {_pct(x.acer)} | "
                f"{_pct(x.hter_fixed)} | {_pct(x.acer_fixed)} |"
            )
    return "\n".join(lines)


def format_attack_table(rows: dict[str, FASMetrics]) -> str:
    """Frame-level breakdown per attack type (each against all live samples of its set)."""
    lines = ["| test set | attack | spoof samples | APCER % | APCER@fixed % | AUC % | EER % |", "|---" * 7 + "|"]
    for name, m in rows.items():
        for attack, a in m.per_attack.items():
            lines.append(
                f"| {name} | {attack} | {a.num} | {_pct(a.apcer)} | {_pct(a.apcer_fixed)} | {_pct(a.auc)} | "
                f"{_pct(a.eer)} |"
            )
    return "\n".join(lines)
