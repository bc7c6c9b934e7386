"""Fused LM head + lopsided (token-weighted) cross entropy.

    loss = sum_t w_t * CE(h_t @ W.T + b, y_t),   split into judgment (group 1) and interpretation
                                                 (group 2) parts, total = judgment + interpretation

The same algorithm on both backends:

1. Gather the supervised positions (target != ignore_index, group 1 or 2, weight != 0) before
   the head. In an I-FAS sample most positions are image and prompt tokens, so this alone
   removes most of the head's work.
2. Run the gathered rows through the head in chunks; per chunk, CE per row from the log-sum-exp
   over the vocabulary, and when gradients are wanted, ``w_r * (softmax_r - onehot_r)`` written
   over the chunk's logits, then ``dh = dlogits @ W`` and ``dW += dlogits.T @ h``. Only one
   ``[chunk, V]`` logits block exists at a time; the full ``[T, V]`` logits never do.
3. The gradients are thus computed during the forward (3 matmuls, like the unfused path, instead
   of 4 with a recompute) and scaled by the incoming gradient in backward. Backward recomputes
   instead, with per-token coefficients, when the judgment or interpretation outputs themselves
   receive gradients (rare: they are normally logged), and for fp16 inputs, whose unscaled
   gradients would underflow before the loss scale reaches them.

The per-chunk row work is a Triton kernel pair on CUDA (:mod:`kernels.lopsided_ce_triton`) and
in-place torch ops elsewhere. Matches :func:`lopsided_ce_reference` (the unfused loss the trainer itself
runs where the fused one is off): tokens outside groups 1/2 do not count, whatever their weight.

Under ZeRO-3 the weight must be gathered while this runs: use :class:`kernels.FusedLMHeadLoss`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import IGNORE_INDEX, INTERPRETATION, JUDGMENT, LossParts
from ._dispatch import resolve_backend

# Bytes of one chunk of logits (and its fp32 working copy) per backend: small on CPU where the
# matmuls are efficient at a few hundred rows, larger on GPU where big matmuls pay off.
CHUNK_BYTES = {"torch": 16 << 20, "triton": 128 << 20}
MIN_CHUNK_ROWS = 16

# ce_chunk(logits [C, V], targets [C], coef [C] | None) -> CE [C] fp32; with coef, the logits are
# overwritten by d(sum_r coef_r * CE_r)/dlogits.
ChunkOp = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _ce_chunk_torch(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
    """Torch version of the Triton kernel pair; in place so no second ``[C, V]`` buffer is made."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    x_target = x.gather(1, targets[:, None]).squeeze(1)
    m = x.amax(dim=1, keepdim=True)
    x.sub_(m).exp_()  # x = exp(logits - max): no overflow however large the logits
    s = x.sum(dim=1, keepdim=True)
    ce = (m + s.log()).squeeze(1) - x_target
    if coef is not None:
        x.mul_(coef[:, None] / s)
        rows = torch.arange(x.shape[0], device=x.device)
        x[rows, targets] -= coef
        if x is not logits:
            logits.copy_(x)
    return ce


def _chunk_op(backend: str) -> ChunkOp:
    if backend == "triton":
        from . import lopsided_ce_triton  # defines the kernels on first import

        return lopsided_ce_triton.ce_chunk
    return _ce_chunk_torch


def default_chunk_size(backend: str, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk of logits (plus its fp32 copy on the torch path) fits the budget."""
    row_bytes = vocab * dtype.itemsize
    if backend == "torch" and dtype != torch.float32:
        row_bytes += vocab * 4
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES[backend] // row_bytes)


def _chunked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor | None,
    targets: torch.Tensor,
    coef: torch.Tensor | None,
    chunk_size: int,
    chunk_op: ChunkOp,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """CE of the selected rows ``hidden[idx]`` (all rows if idx is None), fp32 ``[S]``.

    With ``coef``, also the gradients of ``sum_r coef_r * CE_r`` w.r.t. hidden (full ``[T, H]``,
    zero on unselected rows), weight and bias, for those of them flagged in ``need``.
    """
    n_rows = targets.shape[0]
    ce = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad = coef is not None
    need_h, need_w, need_b = need if grad else (False, False, False)
    # Gradients live in the input dtype (as autograd would give them); dW of bf16 weights is
    # therefore accumulated across chunks in bf16, each chunk's matmul accumulating in fp32.
    # They are contiguous whatever the inputs' strides: chunks of dh are written through ``out=``.
    dh = dw = db = None
    if need_h:
        alloc = torch.empty if idx is None else torch.zeros  # unselected rows get a zero gradient
        dh = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if need_w:  # the first chunk's matmul writes it (no zero fill and no extra pass over [V, H])
        dw = (torch.empty if n_rows else torch.zeros)(weight.shape, dtype=weight.dtype, device=weight.device)
    if need_b:
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    w_t = weight.t()
    # One logits buffer for every chunk, written through ``out=``: no allocation (on CPU, fresh pages
    # to fault in) per chunk, and never two chunks alive at once.
    chunk_buffer = torch.empty((min(chunk_size, n_rows), weight.shape[0]), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, chunk_size):
        end = min(n_rows, start + chunk_size)
        rows = None if idx is None else idx[start:end]
        h_c = hidden[start:end] if rows is None else hidden.index_select(0, rows)
        logits = chunk_buffer[: end - start]
        if bias is None:
            torch.mm(h_c, w_t, out=logits)
        else:
            torch.addmm(bias, h_c, w_t, out=logits)
        ce[start:end] = chunk_op(logits, targets[start:end], None if coef is None else coef[start:end])
        if dh is not None:  # logits now hold dlogits
            if rows is None:
                torch.mm(logits, weight, out=dh[start:end])
            else:
                dh.index_copy_(0, rows, torch.mm(logits, weight))
        if dw is not None:
            if start == 0:
                torch.mm(logits.t(), h_c, out=dw)
            else:
                dw.addmm_(logits.t(), h_c)
        if db is not None:
            db += logits.sum(dim=0, dtype=torch.float32)
    return ce, dh, dw, db


class _FusedLinearLopsidedCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        token_weights: torch.Tensor,
        groups: torch.Tensor,
        ignore_index: int,
        backend: str,
        chunk_size: int | None,
        compute_grad: bool,
        rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        vocab = weight.shape[0]
        ctx.bias_dtype = None if bias is None else bias.dtype
        if bias is not None:
            bias = bias.to(hidden.dtype)  # addmm wants one dtype; the gradient goes back in bias's own
        if rows is None:
            selected = (
                (targets != ignore_index)
                & ((groups == JUDGMENT) | (groups == INTERPRETATION))
                & (token_weights != 0)
            )
            idx = selected.nonzero().squeeze(1)  # a host sync: the chunk loop needs the count (so does the check)
        else:
            idx = rows  # the caller's (computed on the host): nothing here reads the device
        if idx.numel() == targets.numel():
            idx = None  # all rows supervised: no gather, no scatter
            y, w, g = targets, token_weights.float(), groups
        else:
            y, w, g = targets[idx], token_weights[idx].float(), groups[idx]
        if rows is None and y.numel() and bool(((y < 0) | (y >= vocab)).any()):
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}")
        chunk = chunk_size or default_chunk_size(backend, vocab, hidden.dtype)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        # fp16 gradients computed before the loss scale is applied would underflow: fp16 waits for
        # backward (one more matmul); fp32/bf16 compute them now (3 matmuls, like the unfused path).
        precompute = compute_grad and hidden.dtype != torch.float16
        ce, dh, dw, db = _chunked_ce(
            hidden, weight, bias, idx, y, w if precompute else None, chunk, _chunk_op(backend), need
        )
        weighted = w * ce
        judgment = torch.where(g == JUDGMENT, weighted, 0.0).sum()
        interpretation = torch.where(g == INTERPRETATION, weighted, 0.0).sum()
        ctx.grads = (dh, dw, db) if precompute else None
        ctx.consumed = False
        ctx.need = need
        ctx.chunk = chunk
        ctx.backend = backend
        ctx.save_for_backward(hidden, weight, bias, idx, y, w, g)
        return judgment + interpretation, judgment, interpretation

    @staticmethod
    def backward(ctx, g_total, g_judgment, g_interp):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "fused_linear_lopsided_ce: backward ran twice through the same graph; its gradients are "
                "computed in forward and consumed by the first backward (retain_graph is not supported)"
            )
        ctx.consumed = True
        hidden, weight, bias, idx, y, w, g = ctx.saved_tensors
        if ctx.grads is not None and g_judgment is None and g_interp is None:
            dh, dw, db = ctx.grads
            if g_total is not None:
                for grad in (dh, dw, db):
                    if grad is not None:
                        grad.mul_(g_total)
            else:
                dh = dw = db = None
        else:
            # Not precomputed (fp16), or the parts carry their own gradients: compute now with
            # per-token coefficients. Under ZeRO-3 the weight is gathered again for this backward
            # (FusedLMHeadLoss registers it with the module).
            ctx.grads = None  # free the precomputed ones first
            scale = torch.zeros_like(w)
            if g_total is not None:
                scale += g_total
            if g_judgment is not None:
                scale += torch.where(g == JUDGMENT, g_judgment, 0.0)
            if g_interp is not None:
                scale += torch.where(g == INTERPRETATION, g_interp, 0.0)
            _, dh, dw, db = _chunked_ce(
                hidden, weight, bias, idx, y, w * scale, ctx.chunk, _chunk_op(ctx.backend), ctx.need
            )
        ctx.grads = None
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dh, dw, db, None, None, None, None, None, None, None, None


def fused_linear_lopsided_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    groups: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    rows: torch.Tensor | None = None,
) -> LossParts:
    """Weighted CE of the LM head's logits without materialising them; differentiable.

    hidden [T, H] (positions already shifted to align with targets), weight [V, H] (same dtype),
    bias [V] or None, targets [T] long (``ignore_index`` where unsupervised), token_weights [T]
    (e.g. trainer.model.loss.lopsided_token_weights), groups [T] (0 unsupervised, 1 judgment,
    2 interpretation). Returns ``LossParts(total, judgment, interpretation)``, 0-dim fp32.
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch". chunk_size: rows of
    logits per chunk (default from a memory budget per backend). rows: long ``[R]``, the rows to compute
    (ascending; each a supervised one, its target in the vocabulary), known to the caller so that the op
    reads nothing back from the device; by default they are found here (a host sync) and the targets checked.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    n = hidden.shape[0]
    for name, t in (("targets", targets), ("token_weights", token_weights), ("groups", groups)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    backend = resolve_backend(backend, hidden.device)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    total, judgment, interpretation = _FusedLinearLopsidedCE.apply(
        hidden, weight, bias, targets, token_weights, groups, ignore_index, backend, chunk_size, compute_grad, rows
    )
    return LossParts(total, judgment, interpretation)


def lopsided_ce_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    groups: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LossParts:
    """The unfused path, as transformers computes it: full ``[T, V]`` logits, fp32 upcast, CE."""
    return weighted_ce_reference(F.linear(hidden, weight, bias), targets, token_weights, groups, ignore_index)


def weighted_ce_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    groups: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> LossParts:
    """Weighted CE of given ``[T, V]`` logits: the reference every fused path is tested against, and the loss the
    trainer computes from its own logits when the fused loss is off (trainer/model/loss.py)."""
    ce = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    weighted = ce * token_weights
    judgment = torch.where(groups == JUDGMENT, weighted, 0.0).sum()  # where, not a mask gather: no host sync
    interpretation = torch.where(groups == INTERPRETATION, weighted, 0.0).sum()
    return LossParts(judgment + interpretation, judgment, interpretation)
