"""Benchmark of the fused kernels against the unfused torch paths, in one run.

    python -m kernels.bench [--out FILE.json] [--quick] [--markdown BENCHMARKS.md | --no-markdown]

- Fused lopsided linear CE vs the unfused path (full logits + fp32 cross entropy, as
  transformers computes it): time and peak extra memory of forward+backward, at an I-FAS-like
  sequence (10% of positions supervised) and at fully supervised text; on a GPU also at a
  GPU-sized shape in bf16, and Liger's fused linear CE side by side when it is installed.
- GAC multi-layer pooling vs eager per-layer torch (time; on a GPU also achieved bandwidth).

Writes a JSON file and replaces the ``## Kernels`` section of BENCHMARKS.md (between marker
comments). Exits 1 if a fused result differs from its reference (targets missed do not fail the
run; they are reported pass/fail).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import LossParts, fused_linear_lopsided_ce, multi_layer_pool_layernorm
from .benchmarks_md import update_section
from .gac_pool import multi_layer_pool_layernorm_reference
from .lopsided_ce import INTERPRETATION, JUDGMENT, default_chunk_size, lopsided_ce_reference, weighted_ce_reference

logger = logging.getLogger("kernels.bench")

NO_GPU = "not measured (no GPU in this session)"
ALPHA = 0.7
SAMPLE_LEN = 512  # positions per packed sample in the synthetic batches
GB = 1e9
MiB = 2**20


# ----------------------------------------------------------------------------------------------
# cases


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
    Target("gpu-ifas", "time_ratio", 1.00, "cuda", "time <= unfused torch"),
    Target("gpu-ifas", "fused_peak_gb", 1.50, "cuda", "peak extra memory <= 1.5 GB"),
    Target("gpu-text", "time_ratio", 1.00, "cuda", "time <= unfused torch"),
    Target("gpu-text", "fused_peak_gb", 1.50, "cuda", "peak extra memory <= 1.5 GB"),
]


@dataclass(frozen=True)
class GACCase:
    name: str
    layers: int
    batch: int
    tokens: int
    dim: int
    mode: str
    dtype: str


def gac_cases(device: str) -> list[GACCase]:
    # ViT-L/14 at 336 px: 24 layers, 577 tokens (1 class + 576 patches), width 1024.
    batch, dtype = (64, "bfloat16") if device == "cuda" else (8, "float32")
    return [GACCase(f"vitl-{m}", 24, batch, 577, 1024, m, dtype) for m in ("cls", "mean")]


# ----------------------------------------------------------------------------------------------
# measurement


class CudaMeter:
    method = "torch.cuda.max_memory_allocated() above the allocation before the call"

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


class RssMeter:
    """Peak resident memory above the resident memory before the call (Linux).

    glibc's mmap threshold is pinned to 128 KiB, so every tensor buffer is its own mapping,
    returned to the OS when freed: RSS then follows the live tensors instead of a heap that
    keeps (and silently reuses) freed memory.
    """

    method = (
        "peak RSS (VmHWM, reset through /proc/self/clear_refs) above RSS before the call; glibc mmap threshold 128 KiB"
    )

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        except OSError:
            logger.warning("could not pin glibc's mmap threshold; CPU memory figures may be low")

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def start(self) -> None:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.base = self._status_kb("VmRSS")

    def stop(self) -> int:
        return (self._status_kb("VmHWM") - self.base) * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], device: str, meter, repeats: int, time_cap: float, warmup: int) -> dict:
    """Min time and max peak memory of ``fn`` over up to ``repeats`` calls (stops after ``time_cap`` s)."""
    for _ in range(warmup):
        fn()
        _sync(device)
    times, peaks, spent = [], [], 0.0
    while len(times) < repeats and (not times or spent < time_cap):
        gc.collect()
        meter.start()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        peaks.append(meter.stop())
        times.append(elapsed)
        spent += elapsed
    return {"time_s": min(times), "times_s": times, "peak_bytes": max(peaks)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# fused CE


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

    if device == "cuda":
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
    return res


# ----------------------------------------------------------------------------------------------
# GAC pooling


def bench_gac(case: GACCase, device: str, meter, repeats: int, time_cap: float, warmup: int) -> dict:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.layers, case.batch, case.tokens, case.dim)
    hs = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(case.layers, case.dim, generator=gen, device=device)).requires_grad_(True)
    b = (0.1 * torch.randn(case.layers, case.dim, generator=gen, device=device)).requires_grad_(True)
    dout = torch.randn(case.batch, case.layers, case.dim, generator=gen, device=device).to(dtype)
    leaves = (hs, w, b)

    def steps(fn):
        def fwd() -> None:
            with torch.no_grad():
                fn(hs, w, b, case.mode)

        def fwd_bwd() -> None:
            for t in leaves:
                t.grad = None
            out = fn(hs, w, b, case.mode)
            out.backward(dout)
            fwd_bwd.out = out.detach()  # type: ignore[attr-defined]

        return fwd, fwd_bwd

    impls = {"eager": multi_layer_pool_layernorm_reference, "fused": multi_layer_pool_layernorm}
    res: dict[str, Any] = {**asdict(case), "device": device}
    res["fused_backend"] = "triton" if device == "cuda" else "torch"
    outputs = {}
    for name, fn in impls.items():
        fwd, fwd_bwd = steps(fn)
        res[name] = {
            "fwd": measure(fwd, device, meter, repeats, time_cap, warmup),
            "fwd_bwd": measure(fwd_bwd, device, meter, repeats, time_cap, warmup),
        }
        outputs[name] = [fwd_bwd.out] + [t.grad.clone() for t in leaves]  # type: ignore[attr-defined]
        for t in leaves:
            t.grad = None
    tol = 1e-4 if case.dtype == "float32" else 3e-2
    res["rel_err"] = {
        name: rel_err(g, e)
        for name, g, e in zip(("out", "grad_hidden", "grad_w", "grad_b"), outputs["fused"], outputs["eager"])
    }
    res["tolerance"] = tol
    res["correct"] = all(e <= tol for e in res["rel_err"].values())
    res["speedup_fwd_bwd"] = res["eager"]["fwd_bwd"]["time_s"] / res["fused"]["fwd_bwd"]["time_s"]
    res["speedup_fwd"] = res["eager"]["fwd"]["time_s"] / res["fused"]["fwd"]["time_s"]
    if device == "cuda":
        # bytes that must move: forward reads the pooled tokens and writes [B, L, D]; backward
        # writes the full [L, B, N, D] gradient (zeros beyond the class token in cls mode).
        esize = dtype.itemsize
        read_tokens = 1 if case.mode == "cls" else case.tokens
        fwd_bytes = case.layers * case.batch * case.dim * esize * (read_tokens + 1)
        bwd_bytes = case.layers * case.batch * case.dim * esize * (case.tokens + 1)
        res["fused_fwd_gbps"] = fwd_bytes / res["fused"]["fwd"]["time_s"] / GB
        res["fused_fwd_bwd_gbps"] = (fwd_bytes + bwd_bytes) / res["fused"]["fwd_bwd"]["time_s"] / GB
    return res


# ----------------------------------------------------------------------------------------------
# report


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str, meter) -> dict:
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor() or "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "device": device,
        "memory_method": meter.method,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "deepspeed": _version("deepspeed"),
            "transformers": _version("transformers"),
            "liger-kernel": _version("liger-kernel"),
        },
    }
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    return env


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


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    v = env["versions"]
    lines = [
        f"Generated by `{report['command']}` on {env['date']}; whole run {report['wall_s']:.0f} s.",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_cores']} cores ({env['cpu_cores_usable']} usable, torch threads "
        f"{env['torch_threads']}, load average at start {', '.join(f'{x:.1f}' for x in env['load_average'] or [])}); "
        f"GPU: {env['gpu'] or 'none'}.",
        f"- Versions: Python {v['python']}, torch {v['torch']}, triton {v['triton']}, deepspeed {v['deepspeed']}, "
        f"transformers {v['transformers']}, liger-kernel {v['liger-kernel']}.",
        f'- Memory: {env["memory_method"]}. "Peak extra" counts everything the loss adds, the gradients of '
        "hidden and weight included (both paths must produce them; the targets use this figure); "
        '"workspace" is peak extra minus those gradients.',
        f"- Timing: forward+backward, minimum over up to {report['repeats']} calls (fewer when one call exceeds "
        f"{report['time_cap_s']:.0f} s); the machine is shared, so CPU times are noisy.",
        "- Unfused = transformers' path with per-token weights: full `[T, V]` logits from the head, held "
        "(as the model output is) through backward, fp32 upcast, `F.cross_entropy(reduction='none')` * weights. "
        "Fused = `kernels.fused_linear_lopsided_ce` "
        '(torch chunked path on CPU, Triton on CUDA). "Unfused, logits not kept" is the leanest unfused '
        "variant (the logits die with the loss), shown for memory (one call). Ratios are against the first "
        "row. Correctness = relative L2 error of the three losses and both gradients vs unfused.",
        "- GAC: eager = one layer at a time, `F.layer_norm` per layer (what a GAC does without the op); "
        "fused = `kernels.multi_layer_pool_layernorm` (all layers at once: batched torch ops on CPU, one "
        "Triton launch per direction on CUDA).",
        "",
        "### Fused lopsided linear cross entropy",
        "",
        "| case | T x H x V, dtype | supervised | path | time (s) | peak extra (MiB) | workspace (MiB) | "
        "time vs unfused | memory vs unfused | workspace vs unfused | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["ce"]:
        shape = f"{r['tokens']} x {r['hidden']} x {r['vocab']}, {r['dtype']}"
        sup = f"{r['supervised_positions']} ({r['supervised']:.0%})"
        err = max(r["rel_err"].values())
        uf = r["unfused"]
        paths = [
            ("unfused", uf, ""),
            ("unfused, logits not kept", r["unfused_lean"], ""),
            ("fused", r["fused"], f"{err:.1e} ({'ok' if r['correct'] else 'FAIL'})"),
        ]
        if isinstance(r.get("liger"), dict):
            paths.append(("liger (unweighted mean CE)", r["liger"], "n/a"))
        for path, m, e in paths:
            work = m["peak_bytes"] - r["grad_bytes"]
            lines.append(
                f"| {r['name']} | {shape} | {sup} | {path} | {m['time_s']:.3f} | {m['peak_bytes'] / MiB:.0f} | "
                f"{work / MiB:.0f} | {m['time_s'] / uf['time_s']:.3f} | "
                f"{m['peak_bytes'] / max(uf['peak_bytes'], 1):.3f} | "
                f"{work / max(uf['peak_bytes'] - r['grad_bytes'], 1):.3f} | {e} |"
            )
        if isinstance(r.get("liger"), str):
            lines.append(f"| {r['name']} | {shape} | {sup} | liger | {r['liger']} | | | | | | |")
    for case in CE_CASES:
        if case.name not in {r["name"] for r in report["ce"]}:
            shape = f"{case.tokens} x {case.hidden} x {case.vocab}, {case.dtype}"
            lines.append(
                f"| {case.name} | {shape} | {case.supervised:.0%} | Triton / unfused / liger | {NO_GPU} | | | | | | |"
            )
    lines += ["", "Targets:", "", "| case | device | target | value | pass |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        value = "" if t["value"] is None else f"{t['value']:.3f}"
        verdict = t.get("note") if t["passed"] is None else ("pass" if t["passed"] else "FAIL")
        lines.append(f"| {t['case']} | {t['device']} | {t['target']} | {value} | {verdict} |")
    lines += [
        "",
        "### GAC multi-layer pooling + LayerNorm",
        "",
        "| case | L x B x N x D, dtype | mode | eager fwd (ms) | fused fwd (ms) | eager fwd+bwd (ms) | "
        "fused fwd+bwd (ms) | speed-up fwd+bwd | fused GB/s fwd / fwd+bwd | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["gac"]:
        shape = f"{r['layers']} x {r['batch']} x {r['tokens']} x {r['dim']}, {r['dtype']}"
        bw = f"{r['fused_fwd_gbps']:.0f} / {r['fused_fwd_bwd_gbps']:.0f}" if "fused_fwd_gbps" in r else "n/a on CPU"
        err = max(r["rel_err"].values())
        lines.append(
            f"| {r['name']} | {shape} | {r['mode']} | {_fmt_ms(r['eager']['fwd']['time_s'])} | "
            f"{_fmt_ms(r['fused']['fwd']['time_s'])} | "
            f"{_fmt_ms(r['eager']['fwd_bwd']['time_s'])} | {_fmt_ms(r['fused']['fwd_bwd']['time_s'])} | "
            f"{r['speedup_fwd_bwd']:.2f}x | {bw} | {err:.1e} ({'ok' if r['correct'] else 'FAIL'}) |"
        )
    if report["environment"]["device"] != "cuda":
        for case in gac_cases("cuda"):
            shape = f"{case.layers} x {case.batch} x {case.tokens} x {case.dim}, {case.dtype}"
            lines.append(f"| {case.name} (GPU, Triton) | {shape} | {case.mode} | {NO_GPU} | | | | | | |")
    lines += ["", f"Fused results match their references: **{'yes' if report['ok'] else 'NO'}**."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/kernels_bench.json"), help="JSON result file")
    parser.add_argument(
        "--markdown", type=Path, default=Path("BENCHMARKS.md"), help="file whose '## Kernels' section is replaced"
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not touch the markdown file")
    parser.add_argument("--quick", action="store_true", help="one call per measurement, no warm-up beyond compilation")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=None, help="max calls per measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    meter = CudaMeter() if device == "cuda" else RssMeter()
    if device == "cuda":
        repeats, time_cap, warmup = (args.repeats or (2 if args.quick else 5)), 20.0, 1
    else:
        # CPU: the unfused path alone takes tens of seconds at the shapes; cap repeats by time.
        repeats, time_cap, warmup = (args.repeats or (1 if args.quick else 3)), 8.0, 0
    command = "python -m kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "command": command.strip(),
        "environment": environment(device, meter),
        "repeats": repeats,
        "time_cap_s": time_cap,
    }
    ce_results = []
    for case in CE_CASES:
        if case.gpu_only and device != "cuda":
            continue
        logger.info("fused CE %s on %s", case.name, device)
        ce_results.append(bench_ce(case, device, meter, repeats, time_cap, warmup))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    report["ce"] = ce_results
    report["targets"] = check_targets(ce_results, device)
    gac_results = []
    for gcase in gac_cases(device):
        logger.info("GAC pooling %s on %s", gcase.name, device)
        gac_results.append(bench_gac(gcase, device, meter, repeats, time_cap, max(warmup, 1)))
    report["gac"] = gac_results
    if device != "cuda":
        report["gpu"] = NO_GPU
    report["ok"] = all(r["correct"] for r in ce_results + gac_results)
    report["wall_s"] = time.perf_counter() - t_start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    body = markdown(report)
    print(body)
    if not args.no_markdown:
        update_section(args.markdown, "kernels", "Kernels", body)
        logger.info("updated %s", args.markdown)
    logger.info("wrote %s", args.out)
    if not report["ok"]:
        logger.error("a fused result differs from its reference")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
