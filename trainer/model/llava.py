"""The LLaVA family's transformers form of a model without GAC: config and processor
(trainer/model/families.py writes it).

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

from collections.abc import Mapping
from typing import Any

from trainer.model.tokenizer import IMAGE_TOKEN


def _feature_strategy(arch: Mapping[str, Any]) -> str:
    # LLaVA's "default" drops the class token from the patch features, as IFASModel does; "full" keeps all
    return "default" if arch["has_class_token"] else "full"


def llava_config(ifas_config: Mapping[str, Any]):
    """A ``LlavaConfig`` equal in architecture to ``ifas_config`` (``IFASModel.config_dict()``)."""
    from transformers import LlavaConfig

    from trainer.model.ifas import sub_config

    arch = ifas_config["arch"]
    text = sub_config(ifas_config["text_config"])
    grid = arch["image_size"] // ifas_config["vision_config"]["patch_size"]
    return LlavaConfig(
        vision_config=sub_config(ifas_config["vision_config"]), text_config=text,
        image_token_index=arch["image_token_id"], image_seq_length=grid * grid,
        projector_hidden_act="gelu",  # trainer.model.Projector
        vision_feature_select_strategy=_feature_strategy(arch), vision_feature_layer=arch["vision_feature_layer"],
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


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
        do_resize=True, size={"height": size, "width": size}, resample=Image.BICUBIC, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(arch["image_mean"]),
        image_std=list(arch["image_std"]), do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=ifas_config["vision_config"]["patch_size"],
                          vision_feature_select_strategy=_feature_strategy(arch),
                          num_additional_image_tokens=1 if arch["has_class_token"] else 0,
                          image_token=IMAGE_TOKEN, chat_template=chat_template)
