"""Face anti-spoofing metrics on liveness scores (higher = more likely live).

APCER: spoofs accepted as live; BPCER: lives rejected; HTER = (APCER + BPCER) / 2 at a
threshold (score >= threshold means live). The EER threshold is where APCER and BPCER cross on
the ROC curve (scikit-learn's ``roc_curve``); AUC is scikit-learn's ``roc_auc_score``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def error_rates(scores: np.ndarray, live: np.ndarray, threshold: float) -> tuple[float, float]:
    """(APCER, BPCER) at ``threshold``."""
    scores, live = np.asarray(scores, dtype=np.float64), np.asarray(live).astype(bool)
    accepted = scores >= threshold
    apcer = float(accepted[~live].mean()) if (~live).any() else 0.0
    bpcer = float((~accepted[live]).mean()) if live.any() else 0.0
    return apcer, bpcer


def eer_threshold(scores: np.ndarray, live: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) from the ROC curve: the point where APCER (fpr) and BPCER (1 - tpr) meet."""
    fpr, tpr, thresholds = roc_curve(np.asarray(live).astype(int), np.asarray(scores, dtype=np.float64))
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    threshold = float(min(thresholds[i], np.finfo(np.float64).max))  # roc_curve's first threshold is inf
    return float((fpr[i] + fnr[i]) / 2.0), threshold


def fas_metrics(scores: np.ndarray, live: np.ndarray) -> FASMetrics:
    """All metrics of one test set; needs both live and spoof samples."""
    live = np.asarray(live).astype(bool)
    if live.all() or not live.any():
        raise ValueError(f"metrics need live and spoof samples; got {int(live.sum())} live, {int((~live).sum())} spoof")
    eer, threshold = eer_threshold(scores, live)
    apcer, bpcer = error_rates(scores, live, threshold)
    return FASMetrics(
        num_live=int(live.sum()), num_spoof=int((~live).sum()), auc=float(roc_auc_score(live.astype(int), scores)),
        eer=eer, eer_threshold=threshold, hter=(apcer + bpcer) / 2.0, apcer=apcer, bpcer=bpcer,
    )


def format_table(rows: dict[str, FASMetrics]) -> str:
    """A Markdown table of HTER/AUC/EER (percent) per test set."""
    lines = ["| test set | live | spoof | HTER % | AUC % | EER % | APCER % | BPCER % |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m.num_live} | {m.num_spoof} | {100 * m.hter:.2f} | {100 * m.auc:.2f} | "
                     f"{100 * m.eer:.2f} | {100 * m.apcer:.2f} | {100 * m.bpcer:.2f} |")
    return "\n".join(lines)
