"""Triton kernels of the GAC multi-layer pooling + per-layer LayerNorm, forward and backward.

One program per sample: pool the layer's tokens (class token, or the mean over all N tokens with an fp32
accumulator), LayerNorm over D with the layer's own affine, write ``out[b, l, :]``. One launch per layer, each
reading that layer's own tensor (the layers are never stacked). The backward, one launch for all layers,
recomputes nothing from the hidden states: the forward keeps ``xhat`` (normalised pooled vector, fp32) and
``rstd``; it writes the pooled vectors' gradient ``dx`` [L, B, D], which the caller spreads over the tokens.

Importing this module defines the ``@triton.jit`` functions, so TRITON_INTERPRET=1 (CPU
interpreter) must be set before the first import; tests reload it after setting the variable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one [BLOCK_N, BLOCK_D] token tile; tests lower it to run the token loop with a tail.
MAX_TILE = 8192


@triton.jit
def _pool_ln_fwd_kernel(
    hs_ptr,
    layer,
    s_b,
    s_n,
    s_d,
    w_ptr,
    b_ptr,
    out_ptr,
    xhat_ptr,
    rstd_ptr,
    B,
    L,
    N,
    D,
    eps,
    MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    sample = tl.program_id(0)
    base = hs_ptr + sample.to(tl.int64) * s_b
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    if MEAN:
        tokens = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tokens
            ptrs = base + n[:, None].to(tl.int64) * s_n + cols[None, :] * s_d
            tile = tl.load(ptrs, mask=(n[:, None] < N) & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(tile, axis=0)
        x = acc / N
    else:
        x = tl.load(base + cols * s_d, mask=dmask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(dmask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = xc * rstd
    w = tl.load(w_ptr + layer * D + cols, mask=dmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + layer * D + cols, mask=dmask, other=0.0).to(tl.float32)
    row = layer * B + sample  # [L, B] bookkeeping for backward
    tl.store(xhat_ptr + row.to(tl.int64) * D + cols, xhat, mask=dmask)
    tl.store(rstd_ptr + row, rstd)
    out_row = (sample * L + layer).to(tl.int64)  # output is [B, L, D]
    tl.store(out_ptr + out_row * D + cols, (xhat * w + b).to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _pool_ln_bwd_kernel(
    dout_ptr,
    xhat_ptr,
    rstd_ptr,
    w_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    B,
    L,
    D,
    BLOCK_D: tl.constexpr,
):
    layer = tl.program_id(0)
    sample = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    row = (layer * B + sample).to(tl.int64)
    dy = tl.load(dout_ptr + (sample * L + layer).to(tl.int64) * D + cols, mask=dmask, other=0.0).to(tl.float32)
    xhat = tl.load(xhat_ptr + row * D + cols, mask=dmask, other=0.0)
    rstd = tl.load(rstd_ptr + row)
    w = tl.load(w_ptr + layer * D + cols, mask=dmask, other=0.0).to(tl.float32)
    # Per-(layer, sample) partial affine gradients; summed over samples by the launcher
    # (deterministic, unlike atomics).
    tl.store(dw_ptr + row * D + cols, dy * xhat, mask=dmask)
    tl.store(db_ptr + row * D + cols, dy, mask=dmask)
    dxhat = dy * w
    c1 = tl.sum(xhat * dxhat, axis=0) / D
    c2 = tl.sum(dxhat, axis=0) / D
    tl.store(dx_ptr + row * D + cols, (dxhat - xhat * c1 - c2) * rstd, mask=dmask)


def _blocks(n_tokens: int, dim: int, mean: bool) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(dim)
    block_n = max(1, min(triton.next_power_of_2(n_tokens), MAX_TILE // block_d)) if mean else 1
    num_warps = max(1, min(8, block_n * block_d // 256))
    return block_n, block_d, num_warps


def pool_ln_forward(
    layers: list[torch.Tensor] | tuple[torch.Tensor, ...], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    mean: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L x ``[B, N, D]`` -> (out ``[B, L, D]`` in the input dtype, xhat ``[L, B, D]`` fp32, rstd ``[L, B]``)."""
    batch, n_tokens, dim = layers[0].shape
    n_layers, dev = len(layers), layers[0].device
    out = torch.empty(batch, n_layers, dim, dtype=layers[0].dtype, device=dev)
    xhat = torch.empty(n_layers, batch, dim, dtype=torch.float32, device=dev)
    rstd = torch.empty(n_layers, batch, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out, xhat, rstd
    block_n, block_d, num_warps = _blocks(n_tokens, dim, mean)
    w, b = ln_weight.contiguous(), ln_bias.contiguous()
    for layer, h in enumerate(layers):
        _pool_ln_fwd_kernel[(batch,)](
            h, layer, *h.stride(), w, b, out, xhat, rstd, batch, n_layers, n_tokens, dim, eps,
            MEAN=mean, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )
    return out, xhat, rstd


def pool_ln_backward(
    dout: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, ln_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. the pooled vectors ``[L, B, D]`` (fp32), ln_weight and ln_bias ``[L, D]`` (fp32)."""
    n_layers, batch, dim = xhat.shape
    dx = torch.empty_like(xhat)
    dw = torch.empty_like(xhat)
    db = torch.empty_like(xhat)
    if xhat.numel() == 0:
        return dx, dw.sum(1), db.sum(1)  # nothing to pool: every gradient is empty
    block_d = triton.next_power_of_2(dim)
    _pool_ln_bwd_kernel[(n_layers, batch)](
        dout.contiguous(), xhat, rstd, ln_weight.contiguous(), dx, dw, db, batch, n_layers, dim,
        BLOCK_D=block_d, num_warps=max(1, min(8, block_d // 256)),
    )
    return dx, dw.sum(1), db.sum(1)
