"""Fused kernels of the I-FAS trainer, each with a torch path for CPU and a dispatcher.

- :func:`fused_linear_lopsided_ce`: LM head + token-weighted cross entropy (the L-LM loss) without
  materialising the ``[T, V]`` logits; gradients for hidden states, head weight and bias.
- :func:`multi_layer_pool_layernorm`: the GAC's per-layer pooling (class token or mean) plus a
  per-layer LayerNorm, all tapped layers in one launch.
- :class:`FusedLMHeadLoss`: the fused loss as a module that works under DeepSpeed ZeRO-3.

This package shares its import name with the Hugging Face Hub package ``kernels``, which
transformers probes for (docs/architecture.md, "Known traps"). Keep this file light: no torch/triton/deepspeed import at
package import time, and no ``__version__`` (transformers reads it to decide whether the Hub
package is installed; without one our package never looks like a usable version).
Submodules are imported lazily, on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .gac_pool import multi_layer_pool_layernorm
    from .lopsided_ce import fused_linear_lopsided_ce
    from .zero3 import FusedLMHeadLoss

__all__ = [
    "IGNORE_INDEX",
    "UNSUPERVISED",
    "JUDGMENT",
    "INTERPRETATION",
    "LossParts",
    "fused_linear_lopsided_ce",
    "lopsided_ce_reference",
    "weighted_ce_reference",
    "multi_layer_pool_layernorm",
    "multi_layer_pool_layernorm_reference",
    "FusedLMHeadLoss",
    "triton_available",
]


# The label contract the loss kernels share with the trainer (trainer/sample/ re-exports it): targets equal to
# IGNORE_INDEX are not supervised; each supervised token belongs to the judgment or the interpretation group.
IGNORE_INDEX = -100
UNSUPERVISED, JUDGMENT, INTERPRETATION = 0, 1, 2


class LossParts(NamedTuple):
    """Weighted loss and its two parts, each a 0-dim fp32 tensor (total == judgment + interpretation)."""

    total: "torch.Tensor"
    judgment: "torch.Tensor"
    interpretation: "torch.Tensor"


# Lazily resolved exports: name -> submodule holding it.
_LAZY = {
    "fused_linear_lopsided_ce": "lopsided_ce",
    "multi_layer_pool_layernorm": "gac_pool",
    "FusedLMHeadLoss": "zero3",
    "lopsided_ce_reference": "lopsided_ce",
    "weighted_ce_reference": "lopsided_ce",
    "multi_layer_pool_layernorm_reference": "gac_pool",
    "triton_available": "_dispatch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
