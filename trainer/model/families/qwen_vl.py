"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL families (transformers' ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration``): what a checkpoint fixes
in the I-FAS model, and their config and processor for the family-format export. What the model runs
for them is in trainer/model/families/mrope.py.

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

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from trainer.model.arch import ArchConfig, ModelLoadError, sub_config
from trainer.model.families.base import Family, Release, VisualFeatures
from trainer.model.families.mrope import MRopeCausalLM, mrope_positions, patchify
from trainer.model.families.processor_files import save_processor

DEFAULT_IMAGE_SIZE = 448
QWEN_PREFIXES = (("vision.", "model.visual."), ("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."))
# Qwen2-VL and Qwen2.5-VL were released from transformers 4.4x: visual.*, and model.* for the LLM
QWEN_LEGACY_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


class QwenVLFamily(Family):
    """One of Qwen2-VL, Qwen2.5-VL, Qwen3-VL: they differ only in transformers' classes and one config key."""

    prefixes = QWEN_PREFIXES  # the whole visual module, merger included, is the vision group
    default_image_token = "<|image_pad|>"  # what Qwen's processors fall back to (the releases' tokenizers name none)

    def __init__(self, name: str, modeling: str, vision_class: str, text_class: str, config_class: str,
                 processor_class: str, video_processor_class: str, releases: tuple[Release, ...],
                 vision_width_key: str = "hidden_size", legacy_prefixes: tuple[tuple[str, str], ...] = ()) -> None:
        self.name, self.model_types, self.releases = name, (name,), releases
        self.model_class = config_class.removesuffix("Config") + "ForConditionalGeneration"
        self.modeling, self.vision_class, self.text_class = modeling, vision_class, text_class
        self.config_class, self.processor_class = config_class, processor_class
        self.video_processor_class = video_processor_class
        self.vision_width_key = vision_width_key  # Qwen2-VL's blocks are embed_dim wide (its hidden_size: the merger's)
        self.legacy_prefixes = legacy_prefixes
        self._llm_class: type[MRopeCausalLM] | None = None

    def _modeling(self, name: str) -> type:
        return getattr(importlib.import_module(self.modeling), name)

    def arch(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             image_size: int | None) -> dict[str, Any]:
        return qwen_arch(config, tokenizer, image_size)

    def build_vision(self, vision_config: PretrainedConfig, **kw: Any) -> nn.Module:
        return self._modeling(self.vision_class)._from_config(vision_config, **kw)

    def build_llm(self, text_config: PretrainedConfig, **kw: Any) -> nn.Module:
        if self._llm_class is None:  # the causal LM around this family's text model
            self._llm_class = type(f"{self.text_class}CausalLM", (MRopeCausalLM,),
                                   {"text_model_class": self._modeling(self.text_class)})
        return self._llm_class._from_config(text_config, **kw)

    def vision_width(self, vision_config: PretrainedConfig) -> int:
        return getattr(vision_config, self.vision_width_key)

    def build_projector(self, vision_width: int, text_width: int, arch: ArchConfig) -> nn.Module | None:
        return None  # the patch merger is the vision tower's last module

    def encode(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """Flattened patches and their grid in, the merger's tokens out; the blocks' outputs (flattened over the
        batch) for the GAC; Qwen3-VL's deepstack features for its first LLM layers."""
        vc = model.vision.config
        flat, grid = patchify(pixel_values, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
        out = model.vision(flat, grid_thw=grid, output_hidden_states=True)
        b = pixel_values.shape[0]
        states = tuple(h.reshape(b, -1, h.shape[-1]) for h in out.hidden_states)
        deepstack = [f.reshape(b, -1, f.shape[-1]) for f in getattr(out, "deepstack_features", None) or []]
        tokens = out.pooler_output.reshape(b, -1, out.pooler_output.shape[-1])
        return VisualFeatures(tokens, states, states[-1], deepstack)

    def positions(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The LLM's 3-D position ids (trainer/model/families/mrope.py)."""
        rows = model.arch.image_size // model.vision.config.patch_size // model.arch.projector_merge
        return mrope_positions(input_ids, attention_mask, model.arch.image_token_id, rows, rows)

    def llm_inputs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                   visual: VisualFeatures) -> dict[str, Any]:
        """3-D positions; Qwen3-VL's deepstack features, added at the projector's image tokens (not the GAC's) in
        its first layers."""
        extra: dict[str, Any] = {"position_ids": self.positions(model, input_ids, attention_mask)}
        if visual.llm_extra:
            extra["visual_pos_masks"] = image_mask & (image_mask.cumsum(dim=1) <= model.num_patch_tokens)
            extra["deepstack_visual_embeds"] = [f.reshape(-1, f.shape[-1]) for f in visual.llm_extra]
        return extra

    def generating(self, model, llm_inputs: dict[str, Any], generate_kwargs: Mapping[str, Any]) -> ContextManager[None]:
        if generate_kwargs.get("num_beams", 1) > 1 or generate_kwargs.get("num_return_sequences", 1) > 1 or \
                generate_kwargs.get("use_cache") is False:
            raise ValueError("Qwen-VL generation here runs one sequence per prompt with the KV cache (no num_beams, "
                             "num_return_sequences or use_cache=False): its 3-D positions are kept per prompt")
        return model.llm.prompt_inputs(llm_inputs)

    def hf_config(self, ifas_config: Mapping[str, Any]):
        """The family's config, equal in architecture to ``ifas_config`` (no GAC)."""
        import transformers

        arch = ifas_config["arch"]
        text = sub_config(ifas_config["text_config"])
        return getattr(transformers, self.config_class)(
            vision_config=sub_config(ifas_config["vision_config"]), text_config=text,
            image_token_id=arch["image_token_id"], **arch.get("family_extra", {}),  # the checkpoint's token ids
            tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))

    def save_processor(self, ifas_config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                       chat_template: str | None, directory: str | Path) -> None:
        save_qwen_processor(ifas_config, tokenizer, chat_template, directory, self.processor_class,
                            self.video_processor_class)


def qwen_arch(config: PretrainedConfig, tokenizer, image_size: int | None) -> dict[str, Any]:
    """The ArchConfig fields a Qwen-VL checkpoint fixes (``image_size``: model.image_size)."""
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


def save_qwen_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None,
                        directory: str | Path, processor_class: str, video_processor_class: str) -> None:
    """The family's processor (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) giving
    every square face the training grid, pixels as ``ImageTransform``'s (bicubic resize, mean/std)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    arch, vision = ifas_config["arch"], ifas_config["vision_config"]
    size = arch["image_size"]
    half = vision["patch_size"] * vision["spatial_merge_size"] // 2
    # smart_resize rounds in floating point: half a grid unit of slack either side lands every square
    # image on size x size (min = max = size^2 misses it for many input sizes)
    images = Qwen2VLImageProcessorPil(
        min_pixels=(size - half) ** 2, max_pixels=(size + half) ** 2,
        resample=arch.get("image_resample", Image.BICUBIC),
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"], merge_size=vision["spatial_merge_size"],
        image_mean=list(arch["image_mean"]), image_std=list(arch["image_std"]))
    save_processor(processor_class, images, tokenizer, chat_template, directory, video_processor_class)
