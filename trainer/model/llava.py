"""The transformers LLaVA form of a model without GAC: config, processor and weight names.

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

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from trainer.model.tokenizer import IMAGE_TOKEN
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES, verify_weights, write_weights

# this project's state-dict prefixes -> LlavaForConditionalGeneration's
LLAVA_PREFIXES = (
    ("vision.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)


class NotLlavaCompatible(ValueError):
    """The model has parts LLaVA cannot hold (GAC tokens, merged patches); the message says which."""


def is_llava_compatible(arch: Mapping[str, Any]) -> bool:
    return not arch.get("gac") and arch.get("projector_merge", 1) == 1


def check_llava_compatible(arch: Mapping[str, Any]) -> None:
    """``arch``: the model's ArchConfig as a dict (``ifas_config.json``'s ``arch``)."""
    if arch.get("gac"):
        raise NotLlavaCompatible("the model has a GAC, which LLaVA has no place for; train with model.gac=false "
                                 "to export in LLaVA format (or export in this project's format)")
    if arch.get("projector_merge", 1) != 1:
        raise NotLlavaCompatible(f"the projector merges {arch['projector_merge']}x{arch['projector_merge']} patches "
                                 "per token, LLaVA's reads one; train with model.projector_merge=1 to export as LLaVA")


def _feature_strategy(arch: Mapping[str, Any]) -> str:
    # LLaVA's "default" drops the class token from the patch features, as IFASModel does; "full" keeps all
    return "default" if arch["has_class_token"] else "full"


def to_llava_name(name: str) -> str:
    for ours, theirs in LLAVA_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise NotLlavaCompatible(f"weight {name!r} has no place in LLaVA")


class LlavaNamedTensors(Mapping):
    """A read-only view of this project's state dict (or DeepSpeed's lazy one) under LLaVA names."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self._ours = {to_llava_name(k): k for k in tensors}
        self._tensors = tensors

    def __getitem__(self, name: str) -> Any:
        return self._tensors[self._ours[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ours)

    def __len__(self) -> int:
        return len(self._ours)


def llava_config(ifas_config: Mapping[str, Any]):
    """A ``LlavaConfig`` equal in architecture to ``ifas_config`` (``IFASModel.config_dict()``)."""
    from transformers import LlavaConfig

    from trainer.model.ifas import sub_config

    arch = ifas_config["arch"]
    check_llava_compatible(arch)
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


def write_llava(ifas_config: Mapping[str, Any], tensors: Mapping[str, Any], processor, directory: str | Path,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, dtype=None) -> None:
    """Write a model (its config dict and state dict, or DeepSpeed's lazy one; cast to ``dtype`` if given)
    as a transformers LLaVA
    directory: weights streamed through trainer.model.weights, config, ``processor`` and a generation config
    that stops at the EOS every trained answer ends with; then check the weights against the config."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    config = llava_config(ifas_config)
    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    write_weights(skeleton, LlavaNamedTensors(tensors), directory, max_shard_size, dtype)
    if dtype is not None:  # what from_pretrained(dtype="auto") loads, on every level of the config
        config.dtype = config.text_config.dtype = config.vision_config.dtype = dtype
    config.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    tok = processor.tokenizer
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(str(directory))
    verify_weights(skeleton, directory)  # read back: every tensor present once, with LLaVA's shapes
