"""The Triton kernels compiled and run on the GPU, against the torch references, at real shapes.

bf16 cannot match a reference bit for bit, so every bf16 result is compared with the same
computation in fp32 on the same (bf16-rounded) inputs, and must be about as close to it as the
unfused bf16 path itself is (the error a user has today without the kernels).
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.gac_pool import multi_layer_pool_layernorm_reference
from tests.helpers import CUDA_ONLY
from trainer.model.loss import group_counts, lopsided_token_weights
from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT

pytestmark = [*CUDA_ONLY, pytest.mark.timeout(300)]
FP32_TOL = {"rtol": 2e-4, "atol": 2e-5}
# Relative L2 error accepted whatever the unfused bf16 path achieves: one bf16 step (2^-8), the most a
# result stored in bf16 can lose; rounding twice (e.g. before and after the LayerNorm affine) reaches ~3e-3.
BF16_FLOOR = 2.0**-8
DEVICE = "cuda"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def ce_case(tokens: int, hidden: int, vocab: int, supervised: float, dtype: torch.dtype, bias: bool, seed: int = 0):
    """I-FAS-like rows: a fraction supervised, one judgment token per 20 supervised, the rest interpretation."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    groups = torch.zeros(tokens, dtype=torch.long, device=DEVICE)
    chosen = torch.randperm(tokens, generator=gen, device=DEVICE)[: max(1, int(tokens * supervised))]
    groups[chosen] = INTERPRETATION
    groups[chosen[::20]] = JUDGMENT
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=DEVICE)
    targets[groups == 0] = IGNORE_INDEX
    targets[chosen[:3]] = vocab - 1  # the last vocabulary entry sits in the masked tail block
    n_j, n_i = group_counts(groups)
    return {
        "hidden": torch.randn(tokens, hidden, generator=gen, device=DEVICE).to(dtype),
        "weight": (torch.randn(vocab, hidden, generator=gen, device=DEVICE) / hidden**0.5).to(dtype),
        "bias": (0.1 * torch.randn(vocab, generator=gen, device=DEVICE)).to(dtype) if bias else None,
        "targets": targets,
        "token_weights": lopsided_token_weights(groups, 0.7, n_j, n_i),
        "groups": groups,
    }


def ce_run(fn, case: dict, dtype: torch.dtype | None = None, **kwargs):
    """Losses and gradients (hidden, weight, bias) of ``total``; inputs cast to ``dtype`` first if given."""
    leaves = {k: (case[k] if dtype is None else case[k].to(dtype)).detach().clone().requires_grad_(True)
              for k in ("hidden", "weight", "bias") if case[k] is not None}
    out = fn(leaves["hidden"], leaves["weight"], case["targets"], case["token_weights"], case["groups"],
             bias=leaves.get("bias"), **kwargs)
    out.total.backward()
    result = {"total": out.total, "judgment": out.judgment, "interpretation": out.interpretation}
    result.update({f"d{k}": v.grad for k, v in leaves.items()})
    result = {k: v.detach().float() for k, v in result.items()}
    del leaves, out
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


@pytest.mark.parametrize("tokens, hidden, vocab, supervised, dtype, bias", [
    (4096, 4096, 32000, 0.10, torch.float32, False),
    (4096, 4096, 32000, 1.00, torch.float32, True),
    (2048, 4096, 32003, 1.00, torch.float32, True),  # odd vocabulary: a masked tail block
    (32768, 4096, 32000, 0.10, torch.bfloat16, False),
    (32768, 4096, 128256, 0.10, torch.bfloat16, False),
    (32768, 4096, 128256, 1.00, torch.bfloat16, False),
    (4096, 4096, 128257, 1.00, torch.bfloat16, True),
])
def test_fused_lopsided_ce_on_gpu_matches_reference(tokens, hidden, vocab, supervised, dtype, bias):
    case = ce_case(tokens, hidden, vocab, supervised, dtype, bias)
    fused = ce_run(kernels.fused_linear_lopsided_ce, case, backend="triton")
    truth = ce_run(kernels.lopsided_ce_reference, case, dtype=torch.float32)  # fp32 on the same inputs
    if dtype == torch.float32:
        for name, want in truth.items():
            torch.testing.assert_close(fused[name], want, **FP32_TOL, msg=name)
        return
    unfused = ce_run(kernels.lopsided_ce_reference, case)  # the bf16 path without kernels
    for name, want in truth.items():
        err, baseline = rel_err(fused[name], want), rel_err(unfused[name], want)
        assert err <= max(2 * baseline, BF16_FLOOR), f"{name}: fused {err:.2e} vs unfused bf16 {baseline:.2e}"


def test_fused_lopsided_ce_with_nothing_supervised_gives_zero_gradients():
    case = ce_case(1024, 4096, 32000, 0.0, torch.bfloat16, bias=False)
    case["groups"].zero_()
    case["targets"].fill_(IGNORE_INDEX)
    got = ce_run(kernels.fused_linear_lopsided_ce, case, backend="triton")
    assert float(got["total"]) == 0.0 and not got["dhidden"].any() and not got["dweight"].any()


def gac_inputs(layers: int, batch: int, tokens: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    scales = torch.logspace(-1, 1, layers, device=DEVICE)[:, None, None, None]  # layers of different scale
    hs = (torch.randn(layers, batch, tokens, dim, generator=gen, device=DEVICE) * scales + 3.0).to(dtype)
    weight = (1 + 0.3 * torch.randn(layers, dim, generator=gen, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(layers, dim, generator=gen, device=DEVICE)).to(dtype)
    dout = torch.randn(batch, layers, dim, generator=gen, device=DEVICE).to(dtype)
    return hs, weight, bias, dout


def gac_run(fn, hs, weight, bias, dout, mode, dtype=None, **kwargs):
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_(True) for t in (hs, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[2], mode, **kwargs)
    (out.float() * dout.float()).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in leaves]


@pytest.mark.parametrize("mode", ["cls", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gac_pool_layernorm_on_gpu_matches_reference(mode, dtype):
    # ViT-L/14 at 336 px: 24 layers, 577 tokens of width 1024
    hs, weight, bias, dout = gac_inputs(24, 16, 577, 1024, dtype)
    fused = gac_run(kernels.multi_layer_pool_layernorm, hs, weight, bias, dout, mode, backend="triton")
    truth = gac_run(multi_layer_pool_layernorm_reference, hs, weight, bias, dout, mode, dtype=torch.float32)
    names = ("out", "dhidden", "dweight", "dbias")
    if dtype == torch.float32:
        for name, got, want in zip(names, fused, truth):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
        return
    unfused = gac_run(multi_layer_pool_layernorm_reference, hs, weight, bias, dout, mode)
    for name, got, base, want in zip(names, fused, unfused, truth):
        err, baseline = rel_err(got, want), rel_err(base, want)
        assert err <= max(2 * baseline, BF16_FLOOR), f"{name}: fused {err:.2e} vs eager bf16 {baseline:.2e}"
