"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL families (transformers' ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration``): what a checkpoint fixes
in the I-FAS model, and their config and processor for the family-format export. What the model runs
for them is in trainer/model/mrope.py.

What differs from the LLaVA layout (docs/architecture.md, "Checkpoint families"):
- the vision tower reads flattened patches (``temporal_patch_size`` copies of a still image) with their
  grid and ends in its own patch merger, one LLM token per 2 x 2 patches: the whole ``visual`` module,
  merger included, is the I-FAS vision group (Qwen2.5-VL reorders its tokens into attention windows and
  back around the merger, so the merger cannot be taken out); there is no separate projector;
- the GAC reads every vision block's output, pooled by the mean (no class token);
- the LLM takes 3-D rotary positions (M-RoPE); the GAC tokens are positioned as text after the image;
- Qwen3-VL's LLM also adds "deepstack" features (inner vision layers, merged) to its first layers'
  hidden states at the image tokens: at the projector's, not the GAC's;
- the face is one image at ``model.image_size`` (default 448: 32 x 32 patches, 256 tokens); the exported
  processor's ``min_pixels``/``max_pixels`` pin it, so a square face gets exactly the training-time grid.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

DEFAULT_IMAGE_SIZE = 448


def qwen_arch(config: PretrainedConfig, tokenizer, image_size: int | None) -> dict[str, Any]:
    """The ArchConfig fields a Qwen2-VL / Qwen2.5-VL checkpoint fixes (``image_size``: model.image_size)."""
    from trainer.model.ifas import ModelLoadError

    vision = config.vision_config
    size = image_size or DEFAULT_IMAGE_SIZE
    unit = vision.patch_size * vision.spatial_merge_size
    if size % unit:
        raise ModelLoadError(f"model.image_size={size} must be a multiple of {unit} (patch {vision.patch_size} x "
                             f"merge {vision.spatial_merge_size}) for {config.model_type}")
    extra = {key: getattr(config, key) for key in ("vision_start_token_id", "vision_end_token_id", "video_token_id")
             if getattr(config, key, None) is not None}
    return {"vision_feature_layer": -1, "projector_merge": vision.spatial_merge_size, "image_size": size,
            "has_class_token": False, "family_extra": extra}


def qwen_config(ifas_config: Mapping[str, Any]):
    """The family's config, equal in architecture to ``ifas_config`` (no GAC)."""
    import transformers

    from trainer.model.ifas import sub_config

    arch = ifas_config["arch"]
    cls = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
           "qwen3_vl": transformers.Qwen3VLConfig}[arch["family"]]
    text = sub_config(ifas_config["text_config"])
    return cls(vision_config=sub_config(ifas_config["vision_config"]), text_config=text,
               image_token_id=arch["image_token_id"], **arch.get("family_extra", {}),  # the checkpoint's token ids
               tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def save_qwen_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None,
                        directory: str | Path) -> None:
    """The family's processor (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) giving
    every square face the training grid, pixels as ``ImageTransform``'s (bicubic resize, mean/std)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from trainer.model.processor_files import save_processor

    arch, vision = ifas_config["arch"], ifas_config["vision_config"]
    size = arch["image_size"]
    half = vision["patch_size"] * vision["spatial_merge_size"] // 2
    # smart_resize rounds in floating point: half a grid unit of slack either side lands every square
    # image on size x size (min = max = size^2 misses it for many input sizes)
    images = Qwen2VLImageProcessorPil(
        min_pixels=(size - half) ** 2, max_pixels=(size + half) ** 2, resample=Image.BICUBIC,
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"], merge_size=vision["spatial_merge_size"],
        image_mean=list(arch["image_mean"]), image_std=list(arch["image_std"]))
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
            "qwen3_vl": "Qwen3VLProcessor"}[arch["family"]]
    save_processor(name, images, tokenizer, chat_template, directory)
