"""Self-checks of the synthetic data: is it hard for the right reason, and can a small ViT learn it?

A classifier on global statistics trained on three domains does not transfer to the fourth
(tests/shards/test_synth_difficulty.py), while a linear model on local texture does, and so
does a small ViT trained from scratch: ``python -m shards.synth`` runs that timed check (``main``).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from shards.io import setup_logging
from shards.synth.domains import ALL_DOMAINS, generate_demo

log = logging.getLogger("shards.synth")  # the package's logger, as before the split into modules


def global_stats(rgb: np.ndarray) -> np.ndarray:
    """Per-channel mean/std, mean saturation, Laplacian variance, high-frequency energy ratio."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    grey = x.mean(-1)
    lap = ndimage.laplace(grey)
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    f = np.fft.fftfreq(grey.shape[0])
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    hf = power[radius > 0.25].sum() / max(power.sum(), 1e-12)
    return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [sat.mean(), lap.var(), hf]]).astype(np.float64)


def hter_at_eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """HTER = (APCER + BPCER) / 2 at the EER threshold of this set. labels: 1 = live; scores: higher = live."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)  # keep every threshold
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fpr - fnr)))
    return float((fpr[i] + fnr[i]) / 2)


def load_arrays(shard_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, H, W, 3 uint8) and live labels (N,) of a shard set, read with webdataset."""
    import webdataset as wds

    from shards.manifest import shard_paths

    ds = wds.WebDataset(shard_paths(shard_dir), shardshuffle=False, empty_check=False)
    ds = ds.decode("rgb8").to_tuple("jpg", "json")
    images, labels = [], []
    for img, meta in ds:
        images.append(img)
        labels.append(1 if meta["label"] == "live" else 0)
    return np.stack(images), np.asarray(labels)


def local_texture_stats(rgb: np.ndarray, patch: int = 16) -> np.ndarray:
    """Positive control: log of the median (over patches) normalised power spectrum of grey patches.

    The spectrum's shape, not its energy, per ViT-sized patch; the median ignores the clutter
    blotches. A linear model on this transfers across domains, showing the labels live in local
    texture rather than in global statistics.
    """
    grey = rgb.astype(np.float32).mean(-1) / 255.0
    n = grey.shape[0] // patch
    p = grey[: n * patch, : n * patch].reshape(n, patch, n, patch).transpose(0, 2, 1, 3).reshape(-1, patch, patch)
    power = np.abs(np.fft.rfft2(p - p.mean((1, 2), keepdims=True))) ** 2
    power /= power.sum((1, 2), keepdims=True) + 1e-9
    return np.log(np.median(power, 0).ravel() + 1e-6).astype(np.float64)


def leave_one_domain_out_hter(data: dict[str, tuple[np.ndarray, np.ndarray]],
                              featurize: Callable[[np.ndarray], np.ndarray] = global_stats,
                              c: float = 1.0) -> dict[str, float]:
    """HTER on each held-out domain of a standardised logistic regression fit on the others."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = {d: np.stack([featurize(im) for im in imgs]) for d, (imgs, _) in data.items()}
    result = {}
    for held in data:
        train = [d for d in data if d != held]
        x = np.concatenate([feats[d] for d in train])
        y = np.concatenate([data[d][1] for d in train])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, y)
        result[held] = hter_at_eer(data[held][1], clf.predict_proba(feats[held])[:, 1])
    return result


def global_stats_hter(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Leave-one-domain-out HTER of a logistic regression on :func:`global_stats`."""
    return leave_one_domain_out_hter(data, global_stats)


def _tiny_vit(image_size: int, patch: int = 16, dim: int = 96, depth: int = 4, heads: int = 4):
    import torch
    from torch import nn

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            n = (image_size // patch) ** 2
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
            return self.head(self.norm(self.blocks(t))[:, 0]).squeeze(-1)

    return TinyViT()


def learnability_hter(train: Sequence[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray],
                      budget_s: float = 180.0, batch_size: int = 32, lr: float = 3e-4,
                      seed: int = 0) -> tuple[float, int]:
    """Train a tiny ViT (patch 16) from scratch for ``budget_s`` seconds; return (test HTER, steps)."""
    import torch

    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([t[0] for t in train])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.concatenate([t[1] for t in train])).float()
    xt = torch.from_numpy(test[0]).permute(0, 3, 1, 2).contiguous()
    model = _tiny_vit(x.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)  # 1e-3 stalls at chance
    gen = torch.Generator().manual_seed(seed)

    def prep(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255.0 - 0.5) / 0.25

    t0, step = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - t0 < budget_s:
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        xb = prep(x[idx])
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log.info("step %d loss %.3f (%.0fs)", step, loss.item(), time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(prep(xt[i:i + 256])) for i in range(0, len(xt), 256)]).numpy()
    return hter_at_eer(test[1], scores), step


def main(argv: Sequence[str] | None = None) -> None:
    """Self-check: generate data, report leave-one-out global-stats HTER and tiny-ViT HTER."""
    ap = argparse.ArgumentParser(prog="python -m shards.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/ifas_synth_check")
    ap.add_argument("--samples-per-domain", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--held-out", default=ALL_DOMAINS[-1])
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    setup_logging()
    dirs = generate_demo(args.out, args.samples_per_domain, seed=args.seed, overwrite=True, workers=args.workers)
    data = {d.name: load_arrays(d) for d in dirs}
    lr = global_stats_hter(data)
    log.info("global-stats LR leave-one-out HTER: %s (mean %.3f)", {k: round(v, 3) for k, v in lr.items()},
             float(np.mean(list(lr.values()))))
    local = leave_one_domain_out_hter(data, local_texture_stats, c=0.1)
    log.info("local-texture LR leave-one-out HTER: %s", {k: round(v, 3) for k, v in local.items()})
    if not args.skip_vit:
        hter, steps = learnability_hter([v for k, v in data.items() if k != args.held_out], data[args.held_out],
                                        budget_s=args.budget_s, seed=args.seed)
        log.info("tiny ViT held-out %s HTER: %.3f after %d steps", args.held_out, hter, steps)
