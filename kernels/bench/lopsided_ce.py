"""The fused lopsided linear cross entropy in the kernel benchmark: cases, targets, baselines.

Baselines: the unfused path (full ``[T, V]`` logits + fp32 cross entropy, as transformers computes
it; also its leanest variant, the logits not kept past the loss), torch's own chunked
``F.linear_cross_entropy`` (torch >= 2.13, with ``LinearCrossEntropyOptions``: one ``reduction="none"`` call on
the supervised rows, then the same token weights), and Liger's fused linear CE where it imports. The fused op
is :func:`kernels.fused_linear_lopsided_ce`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import LossParts, fused_linear_lopsided_ce
from ..lopsided_ce import INTERPRETATION, JUDGMENT, default_chunk_size, lopsided_ce_reference, weighted_ce_reference
from .common import GB, NO_GPU, measure, rel_err

ALPHA = 0.7
SAMPLE_LEN = 512  # positions per packed sample in the synthetic batches


@dataclass(frozen=True)
class CECase:
    name: str
    tokens: int
    hidden: int
    vocab: int
    supervised: float  # fraction of positions with a label
    dtype: str
    gpu_only: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


CE_CASES = [
    CECase("ifas", 4096, 1024, 32000, 0.10, "float32"),
    CECase("text", 4096, 1024, 32000, 1.00, "float32"),
    CECase("gpu-ifas", 32768, 4096, 128256, 0.10, "bfloat16", gpu_only=True),
    CECase("gpu-text", 32768, 4096, 128256, 1.00, "bfloat16", gpu_only=True),
]


@dataclass(frozen=True)
class Target:
    case: str
    metric: str  # key of the case result
    limit: float
    device: str
    text: str


TARGETS = [
    Target("ifas", "mem_ratio", 0.10, "cpu", "peak extra memory <= 1/10 of unfused"),
    Target("ifas", "time_ratio", 0.50, "cpu", "time <= 0.5x unfused"),
    Target("text", "mem_ratio", 0.25, "cpu", "peak extra memory <= 1/4 of unfused"),
    Target("text", "time_ratio", 1.20, "cpu", "time <= 1.2x unfused"),
    Target("ifas", "time_vs_best", 1.00, "cpu", "time <= best baseline"),
    Target("ifas", "mem_vs_best", 1.00, "cpu", "peak extra memory <= best baseline"),
    Target("text", "time_vs_best", 1.00, "cpu", "time <= best baseline"),
    Target("text", "mem_vs_best", 1.00, "cpu", "peak extra memory <= best baseline"),
    Target("gpu-ifas", "time_ratio", 1.00, "cuda", "time <= unfused torch"),
    Target("gpu-ifas", "time_vs_best", 1.00, "cuda", "time <= best baseline"),
    Target("gpu-ifas", "mem_vs_best", 1.00, "cuda", "peak extra memory <= best baseline"),
    Target("gpu-ifas", "fused_peak_gb", 1.50, "cuda", "peak extra memory <= 1.5 GB"),
    Target("gpu-text", "time_ratio", 1.00, "cuda", "time <= unfused torch"),
    Target("gpu-text", "fused_peak_gb", 1.50, "cuda", "peak extra memory <= 1.5 GB"),
]


def ce_inputs(case: CECase, device: str, seed: int = 0) -> dict:
    """Packed samples of SAMPLE_LEN positions; the supervised positions close each sample (the
    answer after image and prompt tokens): one judgment token, then interpretation tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, per_sample = case.tokens, max(1, round(case.supervised * SAMPLE_LEN))
    pos = torch.arange(n, device=device) % SAMPLE_LEN
    first = SAMPLE_LEN - per_sample
    groups = torch.where(pos > first, INTERPRETATION, 0)
    groups = torch.where(pos == first, JUDGMENT, groups)
    targets = torch.randint(0, case.vocab, (n,), generator=gen, device=device)
    targets = torch.where(groups > 0, targets, -100)
    n_j, n_i = int((groups == JUDGMENT).sum()), int((groups == INTERPRETATION).sum())
    weights = torch.where(groups == JUDGMENT, ALPHA / max(n_j, 1), 0.0)
    weights = torch.where(groups == INTERPRETATION, (1 - ALPHA) / max(n_i, 1), weights).float()
    dtype = case.torch_dtype
    hidden = torch.randn(n, case.hidden, generator=gen, device=device).to(dtype)
    weight = torch.randn(case.vocab, case.hidden, generator=gen, device=device)
    weight = (weight * (2.0 / case.hidden**0.5)).to(dtype)  # logits std ~2
    return {
        "hidden": hidden.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "targets": targets,
        "token_weights": weights,
        "groups": groups,
    }


def _ce_step(op: Callable[..., LossParts], inp: dict) -> Callable[[], None]:
    def step() -> None:
        inp["hidden"].grad = inp["weight"].grad = None
        parts = op(inp["hidden"], inp["weight"], inp["targets"], inp["token_weights"], inp["groups"])
        parts.total.backward()
        step.parts = [p.detach() for p in parts]  # type: ignore[attr-defined]

    return step


def _unfused_step(inp: dict) -> Callable[[], None]:
    """transformers' path: the head's logits are part of the model output, which the training
    loop holds through ``loss.backward()``; the loss upcasts them to fp32 for the cross entropy."""

    def step() -> None:
        inp["hidden"].grad = inp["weight"].grad = None
        logits = F.linear(inp["hidden"], inp["weight"])
        parts = weighted_ce_reference(logits, inp["targets"], inp["token_weights"], inp["groups"])
        parts.total.backward()
        step.parts = [p.detach() for p in parts]  # type: ignore[attr-defined]
        del logits  # the output is dropped after backward

    return step


def _torch_chunked_op():
    """torch's chunked linear CE on the supervised rows, weighted as the L-LM loss: a correct baseline."""
    options = torch.nn.LinearCrossEntropyOptions()

    def op(hidden, weight, targets, token_weights, groups):
        rows = ((targets != -100) & (groups > 0)).nonzero().squeeze(1)
        ce = F.linear_cross_entropy(hidden.index_select(0, rows), weight, targets[rows], reduction="none",
                                    options=options).float()
        weighted, g = ce * token_weights[rows], groups[rows]
        judgment = torch.where(g == JUDGMENT, weighted, 0.0).sum()
        interpretation = torch.where(g == INTERPRETATION, weighted, 0.0).sum()
        return LossParts(judgment + interpretation, judgment, interpretation)

    return op


def _liger_op():
    """Liger's fused linear CE as ``op(h, W, targets, ...)`` (unweighted mean: timing only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

    def op(hidden, weight, targets, token_weights, groups):
        total = loss(weight, hidden, targets)
        if isinstance(total, tuple):  # some versions return (loss, z_loss)
            total = total[0]
        return LossParts(total, total.detach(), total.detach())

    return op


def bench_ce(case: CECase, device: str, meter, repeats: int, time_cap: float, warmup: int) -> dict:
    tol = 1e-4 if case.dtype == "float32" else 3e-2
    inp = ce_inputs(case, device)
    grad_bytes = sum(t.numel() * t.element_size() for t in (inp["hidden"], inp["weight"]))
    res: dict[str, Any] = {**asdict(case), "device": device, "supervised_positions": int((inp["groups"] > 0).sum())}
    res["grad_bytes"] = grad_bytes
    backend = "triton" if device == "cuda" else "torch"
    res["fused_backend"] = backend
    res["chunk_rows"] = default_chunk_size(backend, case.vocab, case.torch_dtype)

    ref_step = _unfused_step(inp)
    res["unfused"] = measure(ref_step, device, meter, repeats, time_cap, warmup)
    ref_parts, ref_grads = ref_step.parts, (inp["hidden"].grad, inp["weight"].grad)  # type: ignore[attr-defined]
    inp["hidden"].grad = inp["weight"].grad = None
    # The leanest unfused variant, for reference: logits not kept past the loss (one call).
    res["unfused_lean"] = measure(_ce_step(lopsided_ce_reference, inp), device, meter, 1, 0.0, 0)
    inp["hidden"].grad = inp["weight"].grad = None

    fused_step = _ce_step(lambda *a: fused_linear_lopsided_ce(*a, backend=backend), inp)
    res["fused"] = measure(fused_step, device, meter, repeats, time_cap, warmup)
    errors = {
        name: rel_err(got, want)
        for name, got, want in zip(("total", "judgment", "interpretation"), fused_step.parts, ref_parts)  # type: ignore[attr-defined]
    }
    errors["grad_hidden"] = rel_err(inp["hidden"].grad, ref_grads[0])
    errors["grad_weight"] = rel_err(inp["weight"].grad, ref_grads[1])
    res["rel_err"] = errors
    res["tolerance"] = tol
    res["correct"] = all(e <= tol for e in errors.values())
    del ref_grads
    inp["hidden"].grad = inp["weight"].grad = None

    if hasattr(F, "linear_cross_entropy"):
        chunked_step = _ce_step(_torch_chunked_op(), inp)
        res["torch_chunked"] = measure(chunked_step, device, meter, repeats, time_cap, warmup)
        res["torch_chunked"]["rel_err"] = max(
            rel_err(got, want) for got, want in zip(chunked_step.parts, ref_parts))  # type: ignore[attr-defined]
        inp["hidden"].grad = inp["weight"].grad = None
    else:
        res["torch_chunked"] = f"torch {torch.__version__} has no F.linear_cross_entropy"
    try:
        res["liger"] = measure(_ce_step(_liger_op(), inp), device, meter, repeats, time_cap, warmup)
    except ImportError:
        res["liger"] = "liger-kernel not installed"
    except Exception as exc:  # report, do not fail the benchmark on a third-party API change
        res["liger"] = f"failed: {exc!r}"[:200]
    uf, fu = res["unfused"], res["fused"]
    res["time_ratio"] = fu["time_s"] / uf["time_s"]
    res["mem_ratio"] = fu["peak_bytes"] / max(uf["peak_bytes"], 1)
    res["mem_ratio_vs_lean"] = fu["peak_bytes"] / max(res["unfused_lean"]["peak_bytes"], 1)
    res["workspace_ratio"] = (fu["peak_bytes"] - grad_bytes) / max(uf["peak_bytes"] - grad_bytes, 1)
    res["fused_peak_gb"] = fu["peak_bytes"] / GB
    baselines = [uf] + [res[k] for k in ("torch_chunked", "liger") if isinstance(res.get(k), dict)]
    res["time_vs_best"] = fu["time_s"] / min(m["time_s"] for m in baselines)
    res["mem_vs_best"] = fu["peak_bytes"] / max(min(m["peak_bytes"] for m in baselines), 1)
    return res


def check_targets(ce_results: list[dict], device: str) -> list[dict]:
    by_name = {r["name"]: r for r in ce_results}
    out = []
    for t in TARGETS:
        row = {"case": t.case, "target": t.text, "device": t.device, "limit": t.limit}
        if t.device != device or t.case not in by_name:
            row.update(value=None, passed=None, note=NO_GPU if t.device == "cuda" else "not run on this device")
        else:
            value = by_name[t.case][t.metric]
            row.update(value=value, passed=value <= t.limit)
        out.append(row)
    return out
