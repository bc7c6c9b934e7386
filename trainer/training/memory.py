"""What a ZeRO-3 run holds per rank, on paper: the one place the README's "Real checkpoints at scale"
figures, the trainer benchmark's scaling table and the scale rehearsal's predictions come from
(``python -m trainer.bench.tables`` prints the README table).

Per parameter, partitioned over the world size (DeepSpeed ZeRO-3 with AdamW; trainer.bench reads the
parameter, master and optimizer-state bytes off a live engine, 20 per parameter for the fp32 demo):
the parameter in the training dtype, an fp32 gradient partition, an fp32 master copy and AdamW's two
fp32 moments: 18 bytes in bf16, 20 in fp32. The partitioned build
(trainer/model/build.py) adds, per rank and only while loading, one full tensor in the training dtype
(the gathered parameter being filled) and on rank 0 the same tensor as read from the checkpoint. The
build it replaced held the model twice in fp32 on every rank: 8 bytes per parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
FP32_STATE_BYTES = 4 + 4 + 8  # gradient partition, master weights, AdamW moments (fp32 each)
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


def model_state_bytes(parameters: int, world_size: int, precision: str) -> int:
    """Bytes one rank holds for parameters, gradients, master weights and optimizer states (ZeRO-3)."""
    per_param = DTYPE_BYTES[precision] + FP32_STATE_BYTES
    return -(-parameters // world_size) * per_param


def build_peak_bytes(largest_tensor: int, precision: str) -> int:
    """Extra bytes a rank holds while the partitioned build streams the checkpoint in (rank 0's figure:
    the gathered parameter plus the tensor read from the file, bf16 as checkpoints are shipped)."""
    return largest_tensor * (DTYPE_BYTES[precision] + DTYPE_BYTES["bf16"])


def legacy_build_bytes(parameters: int) -> int:
    """Per-rank bytes of the whole-model fp32 build that came before the partitioned one."""
    return parameters * LEGACY_BUILD_BYTES
