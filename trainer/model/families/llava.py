"""The LLaVA families (LLaVA, LLaVA-NeXT, LLaVA-OneVision): what a checkpoint fixes in the I-FAS model,
and the transformers form of a model without GAC: config and processor (trainer/model/families.py
writes it).

LLaVA-NeXT and LLaVA-OneVision ("anyres") cut an image into tiles on a grid chosen from
``image_grid_pinpoints``. A face crop is square and small, so the I-FAS model sees it as the whole image
plus one tile (the same pixels), each tile row closed by ``image_newline``: what those models compute
for a square image whose best grid is 1 x 1 (OneVision's pinpoints start at [384, 384]; llava-v1.6's have
no [336, 336], so that checkpoint saw a square image as two padded half tiles: a warning says so). Their
exported configs and processors hold the one pinpoint [size, size], so any image gets that grid; feed
square face crops, as training did.

An ``IFASModel`` with ``gac=false`` and ``projector_merge=1`` is a LLaVA: vision tower, the same
two-layer projector, an LLM reading the projected patches in place of ``<image>`` tokens. Written
as ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` it loads with
``AutoModelForImageTextToText`` / ``AutoProcessor`` and runs anywhere transformers runs; that is how
SCF's spoof-aware captioner, fine-tuned with this trainer, goes back into ``ifas-shards caption``.

The processor is built to see images exactly as the trainer does (``trainer.data.ImageTransform``:
bicubic resize to the square input size, then the encoder's mean/std), so a caption model sees the
same pixels at inference as in fine-tuning.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from trainer.model.arch import ModelLoadError, has_class_token, side, sub_config
from trainer.model.families.base import Family, NotFamilyCompatible, Release
from trainer.model.families.processor_files import save_processor
from trainer.sample.tokenizer import IMAGE_TOKEN

log = logging.getLogger("ifas.model")


def check_native_size(config: PretrainedConfig, image_size: int | None) -> None:
    """model.image_size may only repeat the size a family's encoder was trained at (Qwen-VL has none)."""
    native = side(config.vision_config.image_size)
    if image_size not in (None, native):
        raise ModelLoadError(f"model.image_size={image_size}: a {config.model_type} checkpoint runs at its encoder's "
                             f"{native} x {native}; leave model.image_size unset (it is for Qwen-VL checkpoints)")


LLAVA_LEGACY_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                         ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.image_newline", "image_newline"))


class LlavaFamily(Family):
    name = "llava"
    legacy_prefixes = LLAVA_LEGACY_PREFIXES
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    releases = (Release("llava-hf/llava-1.5-7b-hf, llava-1.5-13b-hf", "CLIP-L/14-336", 336, 14, 24),
                Release("llava-hf/llava-interleave-qwen-0.5b-hf, -7b-hf", "SigLIP-so400m/14-384", 384, 14, 27))

    def arch(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             image_size: int | None) -> dict[str, Any]:
        check_native_size(config, image_size)
        strategy = config.vision_feature_select_strategy
        if strategy != _feature_strategy({"has_class_token": has_class_token(config.vision_config)}):
            raise ModelLoadError(f"vision_feature_select_strategy {strategy!r} with a "
                                 f"{config.vision_config.model_type} encoder: the I-FAS model drops a class token "
                                 "exactly when the encoder has one")
        if not isinstance(config.vision_feature_layer, int):
            raise ModelLoadError(f"vision_feature_layer {config.vision_feature_layer}: only one layer is supported")
        if config.projector_hidden_act != "gelu":
            raise ModelLoadError(f"projector_hidden_act {config.projector_hidden_act!r}: only gelu is supported")
        return {"vision_feature_layer": config.vision_feature_layer, "projector_merge": 1}

    def check_exportable(self, arch: Mapping[str, Any]) -> None:
        super().check_exportable(arch)
        if arch.get("projector_merge", 1) != 1:
            raise NotFamilyCompatible(f"the projector merges {arch['projector_merge']}x{arch['projector_merge']} "
                                      "patches per token, LLaVA's reads one; train with model.projector_merge=1 to "
                                      "export as LLaVA")

    def hf_config(self, ifas_config: Mapping[str, Any]):
        return llava_config(ifas_config)

    def save_processor(self, ifas_config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                       chat_template: str | None, directory: str | Path) -> None:
        processor = llava_processor(ifas_config, tokenizer, chat_template)
        processor.save_pretrained(str(directory))
        processor.image_processor.save_pretrained(str(directory))  # preprocessor_config.json: processor_files.py


class AnyresFamily(LlavaFamily):
    """LLaVA-NeXT and LLaVA-OneVision: a face is the whole image plus its one tile, rows closed by a newline."""

    image_newline = True

    def __init__(self, name: str, model_class: str, config_class: str, processor_class: str,
                 video_processor_class: str | None, releases: tuple[Release, ...]) -> None:
        self.name, self.model_types, self.model_class, self.releases = name, (name,), model_class, releases
        self.config_class, self.processor_class = config_class, processor_class
        self.video_processor_class = video_processor_class  # what transformers builds its processor with

    def arch(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             image_size: int | None) -> dict[str, Any]:
        fixed = super().arch(config, tokenizer, image_size)
        size = config.vision_config.image_size
        if [size, size] not in [list(p) for p in config.image_grid_pinpoints]:
            log.warning("%s: image_grid_pinpoints has no [%d, %d], so the checkpoint cut square images into several "
                        "padded tiles; the I-FAS model (and its export) sees a face as the whole image plus one tile",
                        config.model_type, size, size)
        return fixed

    def hf_config(self, ifas_config: Mapping[str, Any]):
        """The family's config with the one tile grid the I-FAS model was trained on."""
        import transformers

        size = ifas_config["arch"]["image_size"]
        return getattr(transformers, self.config_class)(**_llava_fields(ifas_config),
                                                        image_grid_pinpoints=[[size, size]])

    def save_processor(self, ifas_config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                       chat_template: str | None, directory: str | Path) -> None:
        save_anyres_processor(ifas_config, tokenizer, chat_template, directory, self.processor_class,
                              self.video_processor_class)


def _feature_strategy(arch: Mapping[str, Any]) -> str:
    # LLaVA's "default" drops the class token from the patch features, as IFASModel does; "full" keeps all
    return "default" if arch["has_class_token"] else "full"


def llava_config(ifas_config: Mapping[str, Any]):
    """A ``LlavaConfig`` equal in architecture to ``ifas_config`` (``IFASModel.config_dict()``)."""
    from transformers import LlavaConfig

    grid = ifas_config["arch"]["image_size"] // ifas_config["vision_config"]["patch_size"]
    return LlavaConfig(**_llava_fields(ifas_config), image_seq_length=grid * grid)


def _llava_fields(ifas_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields LLaVA, LLaVA-NeXT and LLaVA-OneVision share, from ``ifas_config``."""
    arch = ifas_config["arch"]
    text = sub_config(ifas_config["text_config"])
    return dict(vision_config=sub_config(ifas_config["vision_config"]), text_config=text,
                image_token_index=arch["image_token_id"], projector_hidden_act="gelu",  # trainer.model.Projector
                vision_feature_select_strategy=_feature_strategy(arch),
                vision_feature_layer=arch["vision_feature_layer"],
                tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def save_anyres_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None, directory,
                          processor_class: str, video_processor_class: str | None) -> None:
    """A ``LlavaNextProcessor`` or ``LlavaOnevisionProcessor`` for the one tile grid, preparing pixels as
    ``ImageTransform`` does (bicubic resize to the square size, no crop, then mean/std)."""
    from PIL import Image
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    arch = ifas_config["arch"]
    size = arch["image_size"]
    common = dict(size={"height": size, "width": size}, image_grid_pinpoints=[[size, size]],
                  resample=arch.get("image_resample", Image.BICUBIC),
                  crop_size={"height": size, "width": size},  # the tile size (LLaVA-NeXT's default is 224)
                  do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(arch["image_mean"]), image_std=list(arch["image_std"]), do_convert_rgb=True)
    strategy = _feature_strategy(arch)
    if processor_class == "LlavaNextProcessor":
        save_processor("LlavaNextProcessor", LlavaNextImageProcessorPil(**common), tokenizer, chat_template, directory,
                       patch_size=ifas_config["vision_config"]["patch_size"], vision_feature_select_strategy=strategy,
                       num_additional_image_tokens=1 if arch["has_class_token"] else 0, image_token=IMAGE_TOKEN)
    else:
        grid = size // ifas_config["vision_config"]["patch_size"]
        save_processor("LlavaOnevisionProcessor", LlavaOnevisionImageProcessorPil(**common), tokenizer, chat_template,
                       directory, video_processor_class, num_image_tokens=grid * grid,
                       vision_feature_select_strategy=strategy, image_token=IMAGE_TOKEN)


def llava_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None = None):
    """A ``LlavaProcessor`` that expands ``<image>`` to the model's image-token count and prepares
    pixels as ``ImageTransform`` does. ``chat_template``: the processor-level template to keep (e.g.
    the base captioner's); None leaves only the tokenizer's own."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    arch = ifas_config["arch"]
    size = arch["image_size"]
    # the PIL backend resizes exactly as ImageTransform does (the torchvision one differs slightly)
    image_processor = CLIPImageProcessorPil(
        do_resize=True, size={"height": size, "width": size}, resample=arch.get("image_resample", Image.BICUBIC),
        do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(arch["image_mean"]),
        image_std=list(arch["image_std"]), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=ifas_config["vision_config"]["patch_size"],
                          vision_feature_select_strategy=_feature_strategy(arch),
                          num_additional_image_tokens=1 if arch["has_class_token"] else 0,
                          image_token=IMAGE_TOKEN, chat_template=chat_template)
