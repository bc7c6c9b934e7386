"""Triton kernels of the fused lopsided cross entropy: one chunk of logits rows at a time.

The chunk's logits come from a cuBLAS matmul (kernels.lopsided_ce does the matmuls); these
kernels do the per-row work that would otherwise materialise several ``[T, V]`` fp32 tensors:

- ``_ce_fwd_kernel``: online log-sum-exp over vocabulary blocks (running max and rescaled sum,
  fp32 whatever the logits dtype) and the target logit -> CE and LSE per row.
- ``_ce_bwd_kernel``: ``coef_r * (softmax_r - onehot(target_r))`` written over the logits in
  place (same dtype), ready for the ``dlogits @ W`` and ``dlogits.T @ h`` matmuls.

Importing this module defines the ``@triton.jit`` functions, so TRITON_INTERPRET=1 (CPU
interpreter) must be set before the first import; tests reload it after setting the variable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest vocabulary block one program holds in registers; tests lower it to exercise the loop
# and the masked tail with tiny vocabularies.
MAX_BLOCK_V = 32768


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    ce_ptr,
    lse_ptr,
    V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    x_target = tl.load(row_ptr + target).to(tl.float32)
    tl.store(ce_ptr + row, lse - x_target)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    lse_ptr,
    coef_ptr,
    V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * coef
        grad = tl.where(offs == target, grad - coef, grad)
        tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_params(vocab: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    # ~32 fp32 values per thread; 32 warps is the hardware maximum per program.
    num_warps = max(1, min(32, block // (32 * 32)))
    return block, num_warps


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
    """Per-row CE of ``logits [C, V]`` (fp32); with ``coef`` also overwrites logits by the gradient.

    The gradient written is that of ``sum_r coef_r * CE_r`` w.r.t. the logits.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    ce = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(ce)
    if rows == 0:
        return ce
    block, num_warps = _launch_params(vocab)
    targets = targets.contiguous()
    _ce_fwd_kernel[(rows,)](logits, logits.stride(0), targets, ce, lse, vocab, BLOCK_V=block, num_warps=num_warps)
    if coef is not None:
        coef = coef.to(torch.float32).contiguous()
        _ce_bwd_kernel[(rows,)](
            logits, logits.stride(0), targets, lse, coef, vocab, BLOCK_V=block, num_warps=num_warps
        )
    return ce
