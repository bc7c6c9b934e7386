"""GAC multi-layer pooling + LayerNorm vs the eager per-layer reference, gradients included.

Both backends run here: the vectorised torch path, and the Triton kernels in the CPU
interpreter (TRITON_INTERPRET=1, small shapes).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from tests.helpers import assert_compiles_for_hopper, interpreted_triton_module

pytestmark = pytest.mark.timeout(120)
# fp32 summation orders differ; the low-variance layer (rstd ~30) amplifies rounding to ~1e-5.
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def interpreted_triton():
    """The Triton module in the CPU interpreter, with a tiny token tile (the token loop of the mean mode
    runs with a tail)."""
    with interpreted_triton_module("gac_pool_triton", MAX_TILE=64) as module:
        yield module


def make_inputs(shape=(3, 2, 7, 24), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_layers, _, _, dim = shape
    # layers with very different scales and offsets, as real encoder layers have
    scales = torch.logspace(-1, 1, n_layers)[:, None, None, None]
    hs = (torch.randn(shape, generator=gen) * scales + 3.0).to(dtype)
    weight = (1 + 0.3 * torch.randn(n_layers, dim, generator=gen)).to(dtype)
    bias = (0.1 * torch.randn(n_layers, dim, generator=gen)).to(dtype)
    dout = torch.randn(shape[1], n_layers, dim, generator=gen).to(dtype)
    return hs, weight, bias, dout


def forward_backward(fn, hs, weight, bias, dout, mode, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hs, weight, bias)]
    out = fn(*leaves, mode, **kwargs)
    (out.float() * dout.float()).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("mode", ["cls", "mean"])
@pytest.mark.parametrize("shape", [(3, 2, 7, 24), (1, 1, 1, 5), (2, 3, 9, 16)])
def test_matches_reference(backend: str, mode: str, shape) -> None:
    # D=24/5 are not powers of two; N=7/9 are not multiples of the token tile.
    inputs = make_inputs(shape)
    want, want_grads = forward_backward(kernels.multi_layer_pool_layernorm_reference, *inputs, mode)
    got, got_grads = forward_backward(kernels.multi_layer_pool_layernorm, *inputs, mode, backend=backend)
    assert got.shape == (shape[1], shape[0], shape[3]) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **FP32_TOL)
    for name, g, w in zip(("hidden_states", "ln_weight", "ln_bias"), got_grads, want_grads):
        assert g is not None and g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **FP32_TOL, msg=name)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_bf16(backend: str, mode: str) -> None:
    inputs = make_inputs((3, 2, 6, 32), dtype=torch.bfloat16)
    want, want_grads = forward_backward(kernels.multi_layer_pool_layernorm_reference, *inputs, mode)
    got, got_grads = forward_backward(kernels.multi_layer_pool_layernorm, *inputs, mode, backend=backend)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_strided_input(backend: str, mode: str) -> None:
    # A [L, B, N, D] view of a [B, L, N, D] tensor: the kernel must follow strides.
    hs, weight, bias, dout = make_inputs((3, 2, 5, 12))
    strided = hs.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    want, want_grads = forward_backward(kernels.multi_layer_pool_layernorm_reference, hs, weight, bias, dout, mode)
    got, got_grads = forward_backward(
        kernels.multi_layer_pool_layernorm, strided, weight, bias, dout, mode, backend=backend
    )
    torch.testing.assert_close(got, want, **FP32_TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **FP32_TOL)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_sequence_of_layers(backend: str, mode: str) -> None:
    """A tuple of per-layer [B, N, D] states (HF ``hidden_states``) gives the same result and gradients."""
    hs, weight, bias, dout = make_inputs((3, 2, 5, 12))
    layers = [h.clone().requires_grad_(True) for h in hs]
    out = kernels.multi_layer_pool_layernorm(tuple(layers), weight, bias, mode, backend=backend)
    (out * dout).sum().backward()
    want, (want_hs, _, _) = forward_backward(kernels.multi_layer_pool_layernorm_reference, hs, weight, bias, dout, mode)
    torch.testing.assert_close(out.detach(), want, **FP32_TOL)
    torch.testing.assert_close(torch.stack([h.grad for h in layers]), want_hs, **FP32_TOL)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_no_layer_stack_forward_or_backward(backend: str, mode: str) -> None:
    """Each layer is pooled from its own tensor: no op makes a tensor larger than one layer's in forward; in
    backward, mean's gradient reaches each layer as a broadcast view (stride 0 over the tokens)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hs, weight, bias, dout = make_inputs((4, 2, 9, 16))
    leaves = [t.detach().clone().requires_grad_(True) for t in hs.unbind(0)]
    layers = [h * 1.0 for h in leaves]  # non-leaves, as an encoder's outputs are
    seen = []
    for h in layers:
        h.register_hook(lambda g: seen.append(g))

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # not a view
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        out = kernels.multi_layer_pool_layernorm(layers, weight, bias, mode, backend=backend)
    assert Largest.numel < hs[0].numel()  # smaller than one layer, let alone L of them
    (out * dout).sum().backward()
    assert len(seen) == len(layers)
    if mode == "mean":
        assert all(g.stride(1) == 0 for g in seen)
    want = multi_layer_pool_layernorm_grads(hs, weight, bias, dout, mode)
    torch.testing.assert_close(torch.stack([h.grad for h in leaves]), want, **FP32_TOL)


def multi_layer_pool_layernorm_grads(hs, weight, bias, dout, mode):
    """The eager reference's gradient w.r.t. the layers."""
    _, grads = forward_backward(kernels.multi_layer_pool_layernorm_reference, hs, weight, bias, dout, mode)
    return grads[0]


def test_eps_is_used(backend: str) -> None:
    hs, weight, bias, _ = make_inputs((2, 2, 3, 8))
    hs = hs * 1e-3  # variance ~1e-6: eps matters
    for eps in (1e-5, 1e-2):
        want = kernels.multi_layer_pool_layernorm_reference(hs, weight, bias, "mean", eps)
        got = kernels.multi_layer_pool_layernorm(hs, weight, bias, "mean", eps, backend=backend)
        torch.testing.assert_close(got, want, **FP32_TOL)


def test_validation() -> None:
    hs, weight, bias, _ = make_inputs()
    with pytest.raises(ValueError, match="mode"):
        kernels.multi_layer_pool_layernorm(hs, weight, bias, "max")
    with pytest.raises(ValueError, match="ln_weight"):
        kernels.multi_layer_pool_layernorm(hs, weight[:, :-1], bias)
    with pytest.raises(ValueError, match=r"\[L, B, N, D\]"):
        kernels.multi_layer_pool_layernorm(hs[0], weight, bias)


COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels import gac_pool_triton as k

    types = {"layer": "i32", "s_b": "i64", "s_n": "i32", "s_d": "i32", "B": "i32", "L": "i32", "N": "i32",
             "D": "i32", "eps": "fp32", "MEAN": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    for dtype in ("*bf16", "*fp32"):
        ptrs = {"hs_ptr": dtype, "out_ptr": dtype, "dout_ptr": dtype}
        for mean in (True, False):
            block_n, block_d, warps = k._blocks(577, 1024, mean)
            for fn in (k._pool_ln_fwd_kernel, k._pool_ln_bwd_kernel):
                sig = {n: ptrs.get(n) or types.get(n) or "*fp32" for n in fn.arg_names}
                consts = {n: v for n, v in (("MEAN", mean), ("BLOCK_N", block_n), ("BLOCK_D", block_d))
                          if n in fn.arg_names}
                out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                     target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                assert "cubin" in out.asm, fn
    print("compiled")
    """
)


def test_triton_kernels_compile_for_hopper(tmp_path: Path) -> None:
    assert_compiles_for_hopper(COMPILE_FOR_HOPPER, tmp_path)
