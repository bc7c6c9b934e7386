"""What an I-FAS model is, besides its vision and text configs: ``ArchConfig`` (saved in ifas_config.json), the
error a bad model directory or checkpoint raises, and the config helpers the model, the builder and the
checkpoint families share (no torch modules here)."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import AutoConfig, PretrainedConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# ArchConfig fields of earlier exports that the family now decides (trainer/model/families/): read and dropped
RETIRED_FIELDS = ("projector_norm", "features_from_output", "image_newline")
DEFAULT_FAMILY = "llava"  # the layout of presets and vision + LLM directories: a ViT, an MLP projector, a causal LM


class ModelLoadError(ValueError):
    """A model directory or checkpoint is missing or malformed; the message names the path."""


FLASH_DTYPES = (torch.bfloat16, torch.float16)  # flash-attn has no fp32 kernels


def _flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    """The attention kernel a run trains with (docs/architecture.md, "Attention"): ``auto`` is flash_attention_2
    on CUDA with flash-attn installed and bf16/fp16 weights, else sdpa; flash-attn asked for with other weights
    is refused. The choice is recorded in the model's config, and evaluation and prediction use it."""
    if requested == "auto":
        return "flash_attention_2" if _flash_available() and dtype in FLASH_DTYPES else "sdpa"
    if requested.startswith("flash_attention") and dtype not in FLASH_DTYPES:
        raise ModelLoadError(
            f"model.attn_implementation={requested} runs only in bf16 or fp16, but the weights are "
            f"{str(dtype).removeprefix('torch.')}: set train.precision=bf16, or model.attn_implementation=sdpa "
            "(or auto, which picks flash-attn only where it can run)")
    return requested


def recorded_attn_implementation(recorded: str, dtype: torch.dtype) -> str:
    """The attention kernel to score a model with: the one it was trained with (ifas_config.json's), or sdpa with
    a warning where that cannot run here (flash-attn without CUDA, the package, or bf16/fp16 weights)."""
    if recorded.startswith("flash_attention") and not (_flash_available() and dtype in FLASH_DTYPES):
        logging.getLogger(__name__).warning(
            "the model was trained with %s, which cannot run here (it needs CUDA, flash-attn and bf16/fp16 "
            "weights; these are %s): scoring with sdpa, whose results differ within rounding", recorded,
            str(dtype).removeprefix("torch."))
        return "sdpa"
    return recorded


@dataclass
class ArchConfig:
    """What IFASModel needs beyond the vision and text configs; saved in ifas_config.json."""

    image_token_id: int
    yes_token_id: int
    no_token_id: int
    vision_feature_layer: int = -2
    projector_merge: int = 1  # k: each image token merges k x k neighbouring patches
    pooling: str = "cls"
    has_class_token: bool = True
    gac: bool = True
    gac_prefix_queries: int = 4
    gac_heads: int = 4
    image_size: int = 128
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    image_resample: int = 3  # the checkpoint's image processor's PIL filter (3: bicubic)
    family: str = DEFAULT_FAMILY  # the checkpoint family (trainer/model/families/)
    image_span: list[str] = field(default_factory=lambda: ["", ""])  # tokens around the image tokens (<img>, </img>)
    family_extra: dict[str, int] = field(default_factory=dict)  # token ids the family-format export needs

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "ArchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(saved) - known - set(RETIRED_FIELDS)
        if unknown:
            raise ModelLoadError(f"ifas_config.json's arch has unknown fields {sorted(unknown)}: written by a newer "
                                 "version of this project?")
        return cls(**{k: v for k, v in saved.items() if k in known})


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are ``dtype`` (a model built straight in bf16: no fp32 copy first). torch's default
    dtype is process-wide state; this is the one place the project changes it, and it is always restored."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sub_config(saved: dict[str, Any]) -> PretrainedConfig:
    """A vision or text config from its ``to_dict()`` (as saved in ifas_config.json)."""
    saved = dict(saved)
    return AutoConfig.for_model(saved.pop("model_type"), **saved)


def side(size: int | list[int] | tuple[int, ...]) -> int:
    """The side of a square image or patch size (InternVL's configs give [height, width])."""
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise ModelLoadError(f"only square images and patches are supported, the config gives {list(size)}")
    return int(size[0])


def has_class_token(vision_config: PretrainedConfig) -> bool:
    """CLIP-style ViTs prepend a class token; SigLIP and similar pool over patches instead."""
    return "siglip" not in vision_config.model_type
