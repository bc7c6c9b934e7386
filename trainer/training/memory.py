"""What a ZeRO-3 run holds per rank, on paper: the one place the README's "Real checkpoints at scale"
figures, the trainer benchmark's scaling table and the scale rehearsal's predictions come from
(``python -m trainer.bench.tables`` prints the README table).

Per parameter, partitioned over the world size (DeepSpeed ZeRO-3 with AdamW): the parameter in the training
dtype, the gradient partition in DeepSpeed's gradient-accumulation dtype (``data_types.grad_accum_dtype``; the
parameters' dtype when the config does not set it: bf16 with bf16 training), an fp32 master copy and AdamW's two
fp32 moments. The shipped configs (launch/ds_*.json) accumulate gradients in fp32: 18 bytes per parameter in
bf16, 20 in fp32 (a bf16 run without ``data_types`` holds 16, and accumulates its gradients in bf16).
``StateDtypes`` reads the dtypes from a DeepSpeed config or a live engine; tests check the prediction against
the engine's own buffers. The partitioned build
(trainer/model/build.py) adds, per rank and only while loading, one full tensor in the training dtype
(the gathered parameter being filled) and on rank 0 the same tensor as read from the checkpoint. The
build it replaced held the model twice in fp32 on every rank: 8 bytes per parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
MASTER_AND_MOMENTS_BYTES = 4 + 8  # fp32 master weights, AdamW's two fp32 moments
_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "float": "fp32"}
LEGACY_BUILD_BYTES = 8  # per parameter per rank: a full fp32 checkpoint model plus a full fp32 I-FAS model


@dataclass(frozen=True)
class ModelSize:
    name: str
    parameters: int
    largest_tensor: int  # elements of the biggest single tensor (usually the embedding or LM head)


def ifas_size(name: str, vision_config, text_config) -> ModelSize:
    """The I-FAS model (GAC included) on these configs, counted on the meta device (no memory)."""
    import torch

    from trainer.model.arch import ArchConfig
    from trainer.model.ifas import IFASModel

    with torch.device("meta"):
        model = IFASModel(vision_config, text_config, ArchConfig(image_token_id=0, yes_token_id=1, no_token_id=2))
    numels = [p.numel() for p in model.parameters()]
    return ModelSize(name, sum(numels), max(numels))


@dataclass(frozen=True)
class StateDtypes:
    """The dtypes ("bf16"/"fp32") a ZeRO-3 rank keeps its parameter and gradient partitions in."""

    params: str
    grads: str

    @property
    def bytes_per_parameter(self) -> int:
        return DTYPE_BYTES[self.params] + DTYPE_BYTES[self.grads] + MASTER_AND_MOMENTS_BYTES

    @classmethod
    def of_deepspeed_config(cls, ds_config: dict) -> "StateDtypes":
        """As DeepSpeed derives them (its engine's ``get_data_types``): the gradients in ``grad_accum_dtype``,
        else in the parameters' dtype."""
        params = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
        grads = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
        if grads is not None and str(grads).lower() not in _DTYPE_NAMES:
            raise ValueError(f"data_types.grad_accum_dtype {grads!r}: the memory model knows bf16 and fp32")
        return cls(params, _DTYPE_NAMES[str(grads).lower()] if grads is not None else params)

    @classmethod
    def of_engine(cls, engine) -> "StateDtypes":
        """What a live DeepSpeed engine holds."""
        params, grads = engine.get_data_types()
        return cls(_DTYPE_NAMES[str(params).removeprefix("torch.")], _DTYPE_NAMES[str(grads).removeprefix("torch.")])


def model_state_bytes(parameters: int, world_size: int, dtypes: StateDtypes) -> int:
    """Bytes one rank holds for parameters, gradients, master weights and optimizer states (ZeRO-3)."""
    return -(-parameters // world_size) * dtypes.bytes_per_parameter


def engine_state_bytes(engine) -> dict[str, int]:
    """What a live ZeRO-3 engine's rank holds, read off its own buffers: parameter partitions, the gradient
    partitions' flat buffer, the fp32 master partitions and the optimizer states (what ``model_state_bytes``
    predicts)."""
    import torch

    opt = engine.optimizer
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = sum(nbytes(p.ds_tensor) for p in engine.module.parameters())
    grads = nbytes(opt.grad_partitions_flat_buffer)
    master = sum(nbytes(t) for t in opt.fp32_partitioned_groups_flat)
    states = sum(nbytes(v) for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {"params": params, "grads": grads, "master": master, "optimizer_states": states,
            "total": params + grads + master + states}


def build_peak_bytes(largest_tensor: int, precision: str) -> int:
    """Extra bytes a rank holds while the partitioned build streams the checkpoint in (rank 0's figure:
    the gathered parameter plus the tensor read from the file, bf16 as checkpoints are shipped)."""
    return largest_tensor * (DTYPE_BYTES[precision] + DTYPE_BYTES["bf16"])


def legacy_build_bytes(parameters: int) -> int:
    """Per-rank bytes of the whole-model fp32 build that came before the partitioned one."""
    return parameters * LEGACY_BUILD_BYTES
