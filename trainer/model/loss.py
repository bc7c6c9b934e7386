"""Lopsided LM loss (L-LM) of I-FAS: its per-token weights, and the loss from full logits (the unfused path;
the cross entropy itself is ``kernels.weighted_ce_reference``, the one reference the fused kernel is tested against).

    L = alpha * L_judgment + (1 - alpha) * L_interpretation

Each part is a mean token cross entropy over its own tokens. "Mean" is over the *global* batch
(all ranks, all gradient-accumulation micro-steps): the caller passes the global token counts,
so the gradient does not depend on how the batch was split. Written as per-token weights
``w_t = alpha / N_judgment`` (judgment tokens) and ``(1 - alpha) / N_interpretation``
(interpretation tokens), the loss is ``sum_t w_t * CE_t``; the fused kernel takes exactly those
weights.

``alpha=None`` is the plain LM loss of the L-LM ablation (``loss.mode=plain``): every supervised
token weighted ``1 / (N_judgment + N_interpretation)``, i.e. one mean CE over all answer tokens,
so the one judgment token counts no more than any caption token.
"""
from __future__ import annotations

import torch

from kernels import LossParts, weighted_ce_reference  # the fused path returns the same type
from trainer.sample import INTERPRETATION, JUDGMENT


def group_counts(groups: torch.Tensor) -> tuple[int, int]:
    """Number of judgment and interpretation tokens in ``groups``."""
    return int((groups == JUDGMENT).sum()), int((groups == INTERPRETATION).sum())


def loss_alpha(mode: str, alpha: float) -> float | None:
    """The ``alpha`` to pass to the loss for ``loss.mode``: None (plain LM loss) or ``alpha``."""
    if mode not in ("lopsided", "plain"):
        raise ValueError(f"loss.mode must be lopsided or plain, got {mode!r}")
    return None if mode == "plain" else alpha


def lopsided_token_weights(
    groups: torch.Tensor, alpha: float | None, n_judgment: float | torch.Tensor,
    n_interpretation: float | torch.Tensor
) -> torch.Tensor:
    """Per-token fp32 weights of the L-LM loss (0 for unsupervised tokens); alpha=None: plain LM loss.

    The counts may be tensors (e.g. all-reduced on the device): nothing here syncs with the host.
    A count of 0 means the group has no tokens, so its weight is never used; clamping to 1 only
    avoids a division by zero.
    """
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha is None:  # plain: one mean over every supervised token
        n_all = (torch.as_tensor(n_judgment, dtype=torch.float32, device=groups.device)
                 + torch.as_tensor(n_interpretation, dtype=torch.float32, device=groups.device)).clamp(min=1.0)
        supervised = (groups == JUDGMENT) | (groups == INTERPRETATION)
        return torch.where(supervised, 1.0 / n_all, torch.zeros((), dtype=torch.float32, device=groups.device))
    n_j = torch.as_tensor(n_judgment, dtype=torch.float32, device=groups.device).clamp(min=1.0)
    n_i = torch.as_tensor(n_interpretation, dtype=torch.float32, device=groups.device).clamp(min=1.0)
    zero = torch.zeros((), dtype=torch.float32, device=groups.device)
    weights = torch.where(groups == JUDGMENT, alpha / n_j, zero)
    return torch.where(groups == INTERPRETATION, (1.0 - alpha) / n_i, weights)


def lopsided_lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    alpha: float | None = 0.7,
    n_judgment: float | None = None,
    n_interpretation: float | None = None,
) -> LossParts:
    """The reference L-LM loss on flattened, already shifted positions.

    logits [T, V], targets [T], groups [T]. ``n_judgment``/``n_interpretation`` are the token
    counts of the global batch; by default the counts of this call (a single-process batch).
    """
    weights = batch_token_weights(groups, alpha, n_judgment, n_interpretation)
    return weighted_ce_reference(logits, targets, weights, groups)


def batch_token_weights(groups: torch.Tensor, alpha: float | None, n_judgment: float | None = None,
                        n_interpretation: float | None = None) -> torch.Tensor:
    """``lopsided_token_weights`` with the global batch's counts, or, where one is not given, this
    call's own (counted only then: counting reads the device)."""
    if n_judgment is None or n_interpretation is None:
        local_j, local_i = group_counts(groups)
        n_judgment = local_j if n_judgment is None else n_judgment
        n_interpretation = local_i if n_interpretation is None else n_interpretation
    return lopsided_token_weights(groups, alpha, n_judgment, n_interpretation)
