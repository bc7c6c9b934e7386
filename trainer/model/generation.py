"""Generation with a DeepSpeed engine's model outside ``engine.forward`` (GRPO rollouts, the periodic
evaluation's explanations).

Under ZeRO-3 every parameter is a shard outside a forward, and ``model.generate`` is not the engine's forward:
DeepSpeed's own gathering of parameters that a module reads from a child (``nn.MultiheadAttention``'s output
projection in the GAC) is switched on only inside ``engine.forward``. ``gather=True`` gathers the whole model
once per generate call (what TRL does for its ZeRO-3 rollouts: one all-gather instead of one per layer per
token; it needs the full model in memory for the call); ``gather=False`` keeps it partitioned and switches that
gathering on for the call, each token's forward then gathering layer by layer. Either way the caller must make
the same number of generate calls on every rank and step them in lockstep (``synced_gpus``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator


def is_partitioned(module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def model_for_generation(engine, gather: bool = True) -> Iterator:
    """``engine.module`` (or a plain model), ready for ``generate`` on every rank."""
    model = getattr(engine, "module", engine)
    if not is_partitioned(model):
        yield model
        return
    if gather:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model
        return
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict

    dicts = [m._parameters for m in model.modules() if isinstance(m._parameters, ZeROOrderedDict)]
    for d in dicts:
        d._in_forward = True
    try:
        yield model
    finally:
        for d in dicts:
            d._in_forward = False
