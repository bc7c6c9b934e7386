"""What a ZeRO-3 run holds per rank, on paper: the one place the README's "Real checkpoints at scale"
figures, the trainer benchmark's scaling table and the scale rehearsal's predictions come from
(``python -m trainer.training.memory`` prints the README table).

Per parameter, partitioned over the world size (DeepSpeed ZeRO-3 with AdamW; trainer.bench reads the
parameter, master and optimizer-state bytes off a live engine, 20 per parameter for the fp32 demo):
the parameter in the training dtype, an fp32 gradient partition, an fp32 master copy and AdamW's two
fp32 moments: 18 bytes in bf16, 20 in fp32. The partitioned build
(trainer/model/build.py) adds, per rank and only while loading, one full tensor in the training dtype
(the gathered parameter being filled) and on rank 0 the same tensor as read from the checkpoint. The
build it replaced held the model twice in fp32 on every rank: 8 bytes per parameter.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

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

    from trainer.model.ifas import ArchConfig, IFASModel

    with torch.device("meta"):
        model = IFASModel(vision_config, text_config, ArchConfig(image_token_id=0, yes_token_id=1, no_token_id=2))
    numels = [p.numel() for p in model.parameters()]
    return ModelSize(name, sum(numels), max(numels))


def checkpoint_configs() -> dict[str, tuple[Any, Any]]:
    """Vision and text configs of the 7-8B checkpoints the README gives figures for (the shapes in
    their config.json files)."""
    from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config

    clip_l_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    vicuna_7b = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32)
    qwen2_7b = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    return {"llava-1.5-7b-hf": (clip_l_336, vicuna_7b), "CLIP-L/336 + Qwen2-7B-Instruct": (clip_l_336, qwen2_7b)}


def real_checkpoints() -> list[ModelSize]:
    return [ifas_size(name, *configs) for name, configs in checkpoint_configs().items()]


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


def readme_table(world_sizes: tuple[int, ...] = (8, 16, 32)) -> str:
    """The README's table: per-rank memory of a 7B full fine-tune under ZeRO-3 in bf16."""
    rows = ["| I-FAS on | parameters | GPUs | model states / GPU | loading, extra / rank | "
            "loading before the partitioned build / rank (8-GPU node) |", "|---|---|---|---|---|---|"]
    for size in real_checkpoints():
        for ws in world_sizes:
            states = model_state_bytes(size.parameters, ws, "bf16")
            build = build_peak_bytes(size.largest_tensor, "bf16")
            legacy = legacy_build_bytes(size.parameters)
            rows.append(f"| {size.name} | {size.parameters / 1e9:.2f}B | {ws} | {states / GiB:.1f} GiB | "
                        f"{build / GiB:.1f} GiB | {legacy / GiB:.0f} GiB ({8 * legacy / GiB:.0f} GiB) |")
    return "\n".join(rows)


HOST_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def keep_host_heap_small() -> None:
    """Host tensors of 1 MiB and more get their own memory map, returned to the OS when freed. glibc's
    default raises that threshold up to 32 MiB as large blocks are freed, and then keeps the freed
    memory of the build's transient tensors, DeepSpeed's copies into its flat buffers and ZeRO-3's
    gather buffers and gradients in its heap: at 2 CPU ranks of the scale rehearsal (BENCHMARKS.md)
    2.5 GiB of RSS per rank that nothing used. Called once per process, at the start of training; a
    no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="trainer.training.memory", description=__doc__.splitlines()[0]).parse_args(argv)
    print(readme_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
