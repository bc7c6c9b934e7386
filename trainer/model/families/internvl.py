"""The InternVL family (transformers' native ``InternVLForConditionalGeneration``: InternVL2.5/3/3.5 ``-hf``).

What differs from LLaVA, and where the I-FAS model takes it from (docs/architecture.md, "Checkpoint
families"):
- the projector reads 2 x 2 patches at once (pixel shuffle with ``downsample_ratio`` 0.5) after a
  LayerNorm: ``Projector(merge=2, norm=True)`` (trainer/model/projector.py) holds the same weights under
  the same names and orders the merged channels as InternVL's pixel shuffle does;
- ``vision_feature_layer`` -1 is the encoder's output after its final norm, not the last hidden state;
- the processor writes the image as ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>``; the I-FAS prompt puts
  the GAC tokens inside that span, after the N projector tokens;
- one 448 x 448 tile per face (``max_patches=1``): a face crop is small, InternVL's tiling would only
  repeat it.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from trainer.model.arch import ModelLoadError, sub_config
from trainer.model.families.base import Family, Release
from trainer.model.families.llava import check_native_size
from trainer.model.families.processor_files import save_processor

INTERNVL_TOKENS = ("context_image_token", "start_image_token", "end_image_token")


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    releases = (Release("OpenGVLab/InternVL3-1B-hf, -2B-hf, -8B-hf, InternVL2.5-1B..8B-hf", "InternViT-300M-448px",
                        448, 14, 24, merge=2),)
    projector_norm = True  # multi_modal_projector.layer_norm over the merged patches
    default_image_token = None  # the -hf tokenizer names <IMG_CONTEXT> (context_image_token)
    features_from_output = True  # layer -1 is the encoder's output after its final norm

    def arch(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             image_size: int | None) -> dict[str, Any]:
        return internvl_arch(config, tokenizer, image_size)

    def hf_config(self, ifas_config: Mapping[str, Any]):
        return internvl_config(ifas_config)

    def save_processor(self, ifas_config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                       chat_template: str | None, directory: str | Path) -> None:
        save_internvl_processor(ifas_config, tokenizer, chat_template, directory)


def internvl_arch(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                  image_size: int | None = None) -> dict[str, Any]:
    """The ArchConfig fields an InternVL checkpoint fixes."""
    check_native_size(config, image_size)
    merge = round(1 / config.downsample_ratio)
    if abs(merge * config.downsample_ratio - 1) > 1e-6:
        raise ModelLoadError(f"InternVL downsample_ratio {config.downsample_ratio} is not 1/k for a whole k")
    if config.vision_feature_select_strategy != "default":
        raise ModelLoadError("InternVL vision_feature_select_strategy 'full' keeps the class token, which the pixel "
                             "shuffle cannot place on the patch grid; only 'default' checkpoints are supported")
    if config.projector_hidden_act != "gelu":
        raise ModelLoadError(f"InternVL projector_hidden_act {config.projector_hidden_act!r}: only gelu is supported")
    missing = [name for name in INTERNVL_TOKENS if not getattr(tokenizer, name, None)]
    if missing:
        raise ModelLoadError(f"the tokenizer does not name InternVL's {', '.join(missing)}: use the checkpoint's own "
                             "-hf tokenizer (its tokenizer_config.json lists them under extra_special_tokens)")
    return {"vision_feature_layer": config.vision_feature_layer, "projector_merge": merge,
            "image_span": [tokenizer.start_image_token, tokenizer.end_image_token]}


def internvl_config(ifas_config: Mapping[str, Any]):
    """An ``InternVLConfig`` equal in architecture to ``ifas_config`` (``IFASModel.config_dict()``, no GAC)."""
    from transformers import InternVLConfig

    arch = ifas_config["arch"]
    text = sub_config(ifas_config["text_config"])
    return InternVLConfig(
        vision_config=sub_config(ifas_config["vision_config"]), text_config=text,
        image_token_id=arch["image_token_id"], downsample_ratio=1 / arch["projector_merge"],
        projector_hidden_act="gelu", vision_feature_layer=arch["vision_feature_layer"],
        vision_feature_select_strategy="default", image_seq_length=num_projector_tokens(ifas_config),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


def num_projector_tokens(ifas_config: Mapping[str, Any]) -> int:
    """Image tokens per tile (the processor's image_seq_length), counted as the model counts them."""
    arch = ifas_config["arch"]
    return InternVLFamily().image_token_counts(sub_config(ifas_config["vision_config"]), arch["projector_merge"],
                                               False, 0, image_size=arch["image_size"])[0]


def save_internvl_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None,
                            directory: str | Path) -> None:
    """Write an ``InternVLProcessor`` for one tile per face at the model's input size, preparing pixels as
    ``ImageTransform`` does (bicubic resize to the square size, then mean/std; the PIL backend)."""
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    arch = ifas_config["arch"]
    size = arch["image_size"]
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size}, crop_to_patches=False, max_patches=1,
        resample=arch.get("image_resample", Image.BICUBIC),
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(arch["image_mean"]),
        image_std=list(arch["image_std"]), do_convert_rgb=True)
    save_processor("InternVLProcessor", image_processor, tokenizer, chat_template, directory, "InternVLVideoProcessor",
                   image_seq_length=num_projector_tokens(ifas_config))
