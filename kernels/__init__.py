"""Fused kernels of the I-FAS trainer, each with a torch path for CPU and a dispatcher.

- :func:`fused_linear_lopsided_ce`: LM head + token-weighted cross entropy (the L-LM loss) without
  materialising the ``[T, V]`` logits; gradients for hidden states, head weight and bias.
- :func:`multi_layer_pool_layernorm`: the GAC's per-layer pooling (class token or mean) plus a
  per-layer LayerNorm, all tapped layers in one launch.
- :class:`FusedLMHeadLoss`: the fused loss as a module that works under DeepSpeed ZeRO-3.

This package shares its import name with the Hugging Face Hub package ``kernels``, which
transformers probes for (DESIGN.md 5). Keep this file light: no torch/triton/deepspeed import at
package import time, and no ``__version__`` (transformers reads it to decide whether the Hub
package is installed; without one our package never looks like a usable version).
Submodules are imported lazily, on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .zero3 import FusedLMHeadLoss

__all__ = [
    "LossParts",
    "fused_linear_lopsided_ce",
    "lopsided_ce_reference",
    "multi_layer_pool_layernorm",
    "multi_layer_pool_layernorm_reference",
    "FusedLMHeadLoss",
    "triton_available",
]


class LossParts(NamedTuple):
    """Weighted loss and its two parts, each a 0-dim fp32 tensor (total == judgment + interpretation)."""

    total: "torch.Tensor"
    judgment: "torch.Tensor"
    interpretation: "torch.Tensor"


def fused_linear_lopsided_ce(
    hidden: "torch.Tensor",
    weight: "torch.Tensor",
    targets: "torch.Tensor",
    token_weights: "torch.Tensor",
    groups: "torch.Tensor",
    bias: "torch.Tensor | None" = None,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> LossParts:
    """``sum_t w_t * CE(hidden_t @ weight.T + bias, targets_t)``, split into judgment/interpretation.

    See :func:`kernels.lopsided_ce.fused_linear_lopsided_ce`.
    """
    from .lopsided_ce import fused_linear_lopsided_ce as impl

    return impl(
        hidden, weight, targets, token_weights, groups, bias, ignore_index, backend=backend, chunk_size=chunk_size
    )


def multi_layer_pool_layernorm(
    hidden_states: "torch.Tensor",
    ln_weight: "torch.Tensor",
    ln_bias: "torch.Tensor",
    mode: str = "cls",
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> "torch.Tensor":
    """GAC multi-layer pooling: ``[L, B, N, D]`` -> ``[B, L, D]``. See :mod:`kernels.gac_pool`."""
    from .gac_pool import multi_layer_pool_layernorm as impl

    return impl(hidden_states, ln_weight, ln_bias, mode, eps, backend=backend)


# Lazily resolved exports: name -> submodule holding it.
_LAZY = {
    "FusedLMHeadLoss": "zero3",
    "lopsided_ce_reference": "lopsided_ce",
    "multi_layer_pool_layernorm_reference": "gac_pool",
    "triton_available": "_dispatch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
