"""GAC multi-layer pooling: per tapped vision layer, pool then LayerNorm with that layer's affine.

    out[b, l] = LayerNorm_l(pool(hidden_states[l, b]))      pool = token 0 ("cls") or mean over N ("mean")

Three implementations with one contract: the Triton kernels (CUDA), a torch version (CPU), and the eager
per-layer reference the other two are tested against. The fast two pool each layer from its own tensor and
never stack the layers' ``[B, N, D]`` states. Statistics are computed in fp32; the output has the hidden states' dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F

from ._dispatch import resolve_backend

MODES = ("cls", "mean")


def _layers(hidden_states: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tapped layers as L ``[B, N, D]`` tensors: a sequence as given (HF ``hidden_states``, never stacked), an
    ``[L, B, N, D]`` tensor as views of it."""
    return list(hidden_states.unbind(0)) if isinstance(hidden_states, torch.Tensor) else list(hidden_states)


def _check(layers: list[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> None:
    if not layers or any(h.dim() != 3 or h.shape != layers[0].shape for h in layers):
        raise ValueError(f"hidden_states must be L tensors [B, N, D] of one shape (or one [L, B, N, D]), got "
                         f"{[tuple(h.shape) for h in layers]}")
    _, n_tokens, dim = layers[0].shape
    if n_tokens < 1:
        raise ValueError("hidden_states has no tokens")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (len(layers), dim):
            raise ValueError(f"{name} must be [{len(layers)}, {dim}], got {tuple(t.shape)}")


def _expanded_grad(g: torch.Tensor, like: torch.Tensor, mean: bool) -> torch.Tensor:
    """d(pool)/d(layer) applied to ``g`` [B, D] fp32: mean spreads g / N over the tokens as a broadcast view (no
    [B, N, D] buffer; autograd adds it where the layer's own gradient is summed), cls puts g on token 0."""
    if mean:
        return (g / like.shape[1]).to(like.dtype).unsqueeze(1).expand(like.shape)
    out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    out[:, 0] = g
    return out


class _TokenMean(torch.autograd.Function):
    """``h.mean(dim=1)`` in fp32 whose gradient is a broadcast view (torch's divides after expanding: a full
    [B, N, D] tensor per layer)."""

    @staticmethod
    def forward(ctx, h):  # type: ignore[override]
        ctx.like = torch.empty((), dtype=h.dtype, device=h.device).expand(h.shape)  # shape and dtype, no data
        return h.mean(dim=1, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _expanded_grad(g, ctx.like, mean=True)


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
    layers: list[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor, mode: str, eps: float
) -> torch.Tensor:
    """Each layer pooled as it comes (fp32 [B, D]), then one batched LayerNorm over [L, B, D] (autograd gives
    the backward)."""
    x = torch.stack([h[:, 0].float() if mode == "cls" else _TokenMean.apply(h) for h in layers])
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * ln_weight.float()[:, None] + ln_bias.float()[:, None]
    return einops.rearrange(y, "l b d -> b l d").contiguous().to(layers[0].dtype)


class _PoolLayerNormTriton(torch.autograd.Function):
    """One forward launch per layer (each reads its own tensor), one backward launch for all; the layers'
    gradients are built from the pooled gradient ``dx`` [L, B, D] (_expanded_grad)."""

    @staticmethod
    def forward(ctx, ln_weight, ln_bias, mean: bool, eps: float, *layers):  # type: ignore[override]
        from . import gac_pool_triton

        out, xhat, rstd = gac_pool_triton.pool_ln_forward(layers, ln_weight, ln_bias, mean, eps)
        ctx.save_for_backward(xhat, rstd, ln_weight)
        ctx.like = [torch.empty((), dtype=h.dtype, device=h.device).expand(h.shape) for h in layers]
        ctx.mean = mean
        ctx.param_dtypes = (ln_weight.dtype, ln_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        from . import gac_pool_triton

        xhat, rstd, ln_weight = ctx.saved_tensors
        dx, dw, db = gac_pool_triton.pool_ln_backward(dout, xhat, rstd, ln_weight)
        dlayers = [_expanded_grad(dx[i], like, ctx.mean) for i, like in enumerate(ctx.like)]
        return dw.to(ctx.param_dtypes[0]), db.to(ctx.param_dtypes[1]), None, None, *dlayers


def multi_layer_pool_layernorm(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mode: str = "cls",
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool every tapped layer and LayerNorm it with its own affine: L x ``[B, N, D]`` -> ``[B, L, D]``.

    hidden_states: a sequence of L ``[B, N, D]`` (or one ``[L, B, N, D]``); ln_weight, ln_bias
    ``[L, D]``. mode "cls" takes token 0, "mean" averages all N tokens (pass only the patch
    tokens for encoders without a class token). Differentiable w.r.t. all of them. Each layer is pooled from
    its own tensor: no ``[L, B, N, D]`` stack is made, forward or backward (mean's gradient is a broadcast
    view), so the memory added is of the order of the output's.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = _layers(hidden_states)
    _check(layers, ln_weight, ln_bias)
    if resolve_backend(backend, layers[0].device) == "triton":
        return _PoolLayerNormTriton.apply(ln_weight, ln_bias, mode == "mean", float(eps), *layers)
    return _pool_ln_torch(layers, ln_weight, ln_bias, mode, eps)
