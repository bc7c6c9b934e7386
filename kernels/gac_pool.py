"""GAC multi-layer pooling: per tapped vision layer, pool then LayerNorm with that layer's affine.

    out[b, l] = LayerNorm_l(pool(hidden_states[l, b]))      pool = token 0 ("cls") or mean over N ("mean")

Three implementations with one contract: the Triton kernels (all layers in one launch, CUDA), a
vectorised torch version (CPU), and the eager per-layer reference the other two are tested
against. Statistics are computed in fp32; the output has the hidden states' dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F

from ._dispatch import resolve_backend

MODES = ("cls", "mean")


def _as_layer_tensor(hidden_states: torch.Tensor | Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """``[L, B, N, D]``; a sequence of ``[B, N, D]`` (e.g. HF ``hidden_states``) is stacked, and
    in cls mode only the class tokens are, so no copy of all tokens is made."""
    if isinstance(hidden_states, torch.Tensor):
        return hidden_states
    layers = [h[:, :1] for h in hidden_states] if mode == "cls" else list(hidden_states)
    return einops.rearrange(layers, "l b n d -> l b n d")  # the layers stacked in front


def _check(hidden_states: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, mode: str) -> None:
    if hidden_states.dim() != 4:
        raise ValueError(f"hidden_states must be [L, B, N, D], got {tuple(hidden_states.shape)}")
    n_layers, _, n_tokens, dim = hidden_states.shape
    if n_tokens < 1:
        raise ValueError("hidden_states has no tokens")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (n_layers, dim):
            raise ValueError(f"{name} must be [{n_layers}, {dim}], got {tuple(t.shape)}")


def multi_layer_pool_layernorm_reference(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mode: str = "cls",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Eager torch, one layer at a time: what a GAC does without the kernel. -> ``[B, L, D]``."""
    outs = []
    for layer, h in enumerate(hidden_states):
        pooled = h[:, 0] if mode == "cls" else h.float().mean(dim=1)
        dim = pooled.shape[-1]
        outs.append(F.layer_norm(pooled.float(), (dim,), ln_weight[layer].float(), ln_bias[layer].float(), eps))
    return torch.stack(outs, dim=1).to(hidden_states[0].dtype)


def _pool_ln_torch(
    hidden_states: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, mode: str, eps: float
) -> torch.Tensor:
    """All layers at once with batched torch ops (autograd gives the backward)."""
    if mode == "cls":
        x = hidden_states[:, :, 0].float()
    else:
        x = hidden_states.mean(dim=2, dtype=torch.float32)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * ln_weight.float()[:, None] + ln_bias.float()[:, None]
    return einops.rearrange(y, "l b d -> b l d").contiguous().to(hidden_states.dtype)


class _PoolLayerNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, ln_weight, ln_bias, mean: bool, eps: float):  # type: ignore[override]
        from . import gac_pool_triton

        out, xhat, rstd = gac_pool_triton.pool_ln_forward(hidden_states, ln_weight, ln_bias, mean, eps)
        ctx.save_for_backward(xhat, rstd, ln_weight)
        ctx.hs_meta = (hidden_states.shape, hidden_states.dtype)
        ctx.mean = mean
        ctx.param_dtypes = (ln_weight.dtype, ln_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        from . import gac_pool_triton

        xhat, rstd, ln_weight = ctx.saved_tensors
        dhs, dw, db = gac_pool_triton.pool_ln_backward(dout, xhat, rstd, ln_weight, *ctx.hs_meta, ctx.mean)
        return dhs, dw.to(ctx.param_dtypes[0]), db.to(ctx.param_dtypes[1]), None, None


def multi_layer_pool_layernorm(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mode: str = "cls",
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool every tapped layer and LayerNorm it with its own affine: ``[L, B, N, D]`` -> ``[B, L, D]``.

    hidden_states: ``[L, B, N, D]`` (or a sequence of L ``[B, N, D]``); ln_weight, ln_bias
    ``[L, D]``. mode "cls" takes token 0, "mean" averages all N tokens (pass only the patch
    tokens for encoders without a class token). Differentiable w.r.t. all three tensors.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    hs = _as_layer_tensor(hidden_states, mode)
    _check(hs, ln_weight, ln_bias, mode)
    if resolve_backend(backend, hs.device) == "triton":
        return _PoolLayerNormTriton.apply(hs, ln_weight, ln_bias, mode == "mean", float(eps))
    return _pool_ln_torch(hs, ln_weight, ln_bias, mode, eps)
