"""The fused LM-head loss as a module that is correct under DeepSpeed ZeRO-3.

Under ZeRO-3 ``lm_head.weight`` is an empty shard outside the forward of a module that owns or
has registered it (docs/architecture.md, "Known traps"). :class:`FusedLMHeadLoss` registers the head's parameters as
external parameters of itself (``deepspeed.zero.register_external_parameter``), so DeepSpeed
gathers them around its forward (and backward), and the gradient the fused op returns for the
weight lands on the parameter, where ZeRO's gradient hooks reduce-scatter it into the partition.

The module must be a submodule of the model given to ``deepspeed.initialize`` (DeepSpeed hooks
only those modules), and must not own the head: it holds a plain reference, so the head's
parameters appear once in ``parameters()``/``state_dict()``, under the LLM.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import NamedTuple

import torch
from torch import nn

from . import IGNORE_INDEX, LossParts
from .lopsided_ce import fused_linear_lopsided_ce

logger = logging.getLogger(__name__)


def _register_external(module: nn.Module, params: list[nn.Parameter]) -> bool:
    """Register ``params`` with ZeRO-3 as used in ``module``'s forward; False without deepspeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return False
    import deepspeed  # ``deepspeed.zero`` is an attribute, not an importable submodule

    for param in params:
        deepspeed.zero.register_external_parameter(module, param)
    return True


class HeadLossOutput(NamedTuple):
    loss: LossParts
    probe_logits: torch.Tensor | None  # [P, C] fp32, no gradient; None without a probe


class FusedLMHeadLoss(nn.Module):
    """``forward(hidden, targets, token_weights, groups, probe) -> HeadLossOutput`` through ``lm_head``
    without logits.

    hidden [..., H] and targets/token_weights/groups [...] are flattened; positions must already
    be shifted (hidden_t predicts targets_t). See :func:`kernels.fused_linear_lopsided_ce`.
    ``probe = (rows [P, H], columns)`` (C vocabulary ids) also reads the logits of ``columns`` at ``rows`` from the same
    gathered head (the I-FAS judgment logits: the head is gathered once for both). They carry no
    gradient: they are read out (scores), not trained. ``rows``: see :func:`kernels.fused_linear_lopsided_ce`.
    """

    def __init__(
        self,
        lm_head: nn.Linear,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        # Not a submodule: the head belongs to the LLM (no duplicate parameters or state_dict keys).
        self.__dict__["lm_head"] = lm_head
        self.ignore_index = ignore_index
        self.backend = backend
        self.chunk_size = chunk_size
        params = [p for p in (lm_head.weight, lm_head.bias) if p is not None]
        if _register_external(self, params):
            logger.debug("registered %d LM head parameter(s) as ZeRO-3 external parameters", len(params))

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor, groups: torch.Tensor,
        probe: tuple[torch.Tensor, tuple[int, ...]] | None = None, rows: torch.Tensor | None = None,
    ) -> HeadLossOutput:
        head = self.lm_head
        weight = head.weight
        if weight.numel() == 0 or weight.dim() != 2:
            raise RuntimeError(
                "lm_head.weight is not gathered (ZeRO-3 shard): call FusedLMHeadLoss as a submodule of the "
                "model passed to deepspeed.initialize, inside that model's forward"
            )
        probe_logits = None
        if probe is not None:
            probe_rows, columns = probe
            with torch.no_grad():  # columns by Python index: no index tensor to copy to the device
                probe_logits = probe_rows.detach() @ torch.stack([weight[c] for c in columns]).t()
                if head.bias is not None:
                    probe_logits = probe_logits + torch.stack([head.bias[c] for c in columns])
                probe_logits = probe_logits.float()
        loss = fused_linear_lopsided_ce(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            token_weights.reshape(-1),
            groups.reshape(-1),
            head.bias,
            self.ignore_index,
            backend=self.backend,
            chunk_size=self.chunk_size,
            rows=rows,
        )
        return HeadLossOutput(loss, probe_logits)

    def extra_repr(self) -> str:
        out, inp = self.lm_head.out_features, self.lm_head.in_features
        return f"lm_head=Linear({inp}, {out}), ignore_index={self.ignore_index}, backend={self.backend!r}"
