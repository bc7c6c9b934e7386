"""The GAC multi-layer pooling + LayerNorm in the kernel benchmark: cases and the bench function.

Eager = one layer at a time (:func:`kernels.multi_layer_pool_layernorm_reference`); fused =
:func:`kernels.multi_layer_pool_layernorm` (torch ops on CPU, Triton on CUDA). Both take the layers as the
model has them, L separate ``[B, N, D]`` tensors (transformers' ``hidden_states``), and the peak memory each
adds is reported against the pooled output's size (``[B, L, D]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import multi_layer_pool_layernorm
from ..gac_pool import multi_layer_pool_layernorm_reference
from .common import GB, measure, rel_err


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
    # ViT-L/14 at 336 px: 24 layers, 577 tokens (1 class + 576 patches), width 1024. Qwen2-VL's tower at
    # 448 px: 32 blocks of width 1280 over 32 x 32 patches, no class token (mean pooling).
    batch, dtype = (64, "bfloat16") if device == "cuda" else (8, "float32")
    return [GACCase(f"vitl-{m}", 24, batch, 577, 1024, m, dtype) for m in ("cls", "mean")] + [
        GACCase("qwen2vl-mean", 32, batch, 1024, 1280, "mean", dtype)]


def bench_gac(case: GACCase, device: str, meter, repeats: int, time_cap: float, warmup: int) -> dict:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.tokens, case.dim)
    hs = [torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True) for _ in range(case.layers)]
    w = (1 + 0.1 * torch.randn(case.layers, case.dim, generator=gen, device=device)).requires_grad_(True)
    b = (0.1 * torch.randn(case.layers, case.dim, generator=gen, device=device)).requires_grad_(True)
    dout = torch.randn(case.batch, case.layers, case.dim, generator=gen, device=device).to(dtype)
    leaves = (*hs, w, b)

    def steps(fn):
        def fwd() -> None:
            with torch.no_grad():
                fn(hs, w, b, case.mode)

        def fwd_bwd() -> None:
            out = fn(hs, w, b, case.mode)
            # gradients returned, not accumulated into .grad: the peak counts what the op itself allocates (a
            # broadcast view costs nothing; a stacked [L, B, N, D] gradient is counted)
            fwd_bwd.out = (out.detach(), torch.autograd.grad(out, leaves, dout))  # type: ignore[attr-defined]

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
        out, grads = fwd_bwd.out  # type: ignore[attr-defined]
        outputs[name] = [out, torch.stack(grads[:-2]), *grads[-2:]]
        del fwd_bwd.out  # type: ignore[attr-defined]
    tol = 1e-4 if case.dtype == "float32" else 3e-2
    res["rel_err"] = {
        name: rel_err(g, e)
        for name, g, e in zip(("out", "grad_hidden", "grad_w", "grad_b"), outputs["fused"], outputs["eager"])
    }
    del outputs
    # peak extra memory of the forward, in units of the pooled output [B, L, D] (the target: <= 4)
    # and of forward+backward, the gradients it returns included
    res["out_bytes"] = case.batch * case.layers * case.dim * dtype.itemsize
    for name in impls:
        for step in ("fwd", "fwd_bwd"):
            res[name][f"{step}_peak_x_out"] = res[name][step]["peak_bytes"] / res["out_bytes"]
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
