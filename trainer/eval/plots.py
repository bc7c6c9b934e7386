"""Evaluation plots a user looks at rather than reads: ROC curves per test set and liveness score
histograms (live vs spoof) with the decision thresholds, saved as PNG and logged to TensorBoard.

matplotlib (a pinned requirement) draws off-screen: Agg, no pyplot state.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np
from sklearn.metrics import roc_curve

from trainer.logs import MetricsWriter, Tags


def _figure(width: float = 5.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def roc_figure(sets: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """One ROC curve (scikit-learn's) per test set: TPR (live accepted) vs FPR (spoof accepted), log FPR axis
    so the low-APCER region that matters in deployment is visible."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, (scores, live) in sets.items():
        live = np.asarray(live).astype(int)
        if live.min() == live.max():
            continue  # one class: no curve
        fpr, tpr, _ = roc_curve(live, scores)
        ax.plot(np.maximum(fpr, 1e-4), tpr, label=name, lw=1.5)
    chance = np.logspace(-4, 0, 50)
    ax.plot(chance, chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.axvline(0.01, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FPR (APCER: spoofs accepted)")
    ax.set_ylabel("TPR (1 - BPCER: lives accepted)")
    ax.set_title("ROC")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def histogram_figure(name: str, scores: np.ndarray, live: np.ndarray, thresholds: Mapping[str, float]):
    """Score histograms of live and spoof samples with each threshold as a vertical line."""
    fig = _figure()
    ax = fig.add_subplot()
    scores, live = np.asarray(scores, dtype=np.float64), np.asarray(live).astype(bool)
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist(scores[live], bins=bins, alpha=0.6, color="tab:green", label=f"live ({int(live.sum())})")
    ax.hist(scores[~live], bins=bins, alpha=0.6, color="tab:red", label=f"spoof ({int((~live).sum())})")
    for (label, thr), style in zip(thresholds.items(), ("--", ":", "-.")):
        if thr is not None and np.isfinite(thr):
            ax.axvline(thr, color="black", ls=style, lw=1.0, label=f"{label} {thr:.3f}")
    ax.set_xlabel("liveness score P(Yes)")
    ax.set_ylabel("samples")
    ax.set_title(f"{name}: scores")
    ax.legend(fontsize=8)
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_and_log(fig, path: Path, writer: MetricsWriter | None = None, tag: str = "", step: int = 0) -> None:
    """Write ``fig`` as PNG at ``path`` and, with a writer, as an image under ``tag``."""
    from PIL import Image

    png = figure_png(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    if writer is not None and writer.active:
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        writer.image(tag, image, step)


def plot_sets(sets: Mapping[str, tuple[np.ndarray, np.ndarray, Mapping[str, float]]], out_dir: Path,
              writer: MetricsWriter | None = None, step: int = 0) -> list[Path]:
    """ROC of every set in one figure plus a histogram per set; returns the PNG paths written."""
    paths = [out_dir / "roc.png"]
    save_and_log(roc_figure({n: (s, live) for n, (s, live, _) in sets.items()}), paths[0], writer, Tags.ROC_PLOT, step)
    for name, (scores, live, thresholds) in sets.items():
        path = out_dir / f"hist_{_safe(name)}.png"
        save_and_log(histogram_figure(name, scores, live, thresholds), path, writer,
                     Tags.histogram(name), step)
        paths.append(path)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
