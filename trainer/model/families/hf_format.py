"""Checkpoint families: the image-text-to-text checkpoints ``model.path`` loads, and the little that differs.

Every family is a transformers-native class (``trust_remote_code`` is never needed) laid out as vision
tower, multimodal projector, language model and LM head, and becomes the same I-FAS model
(trainer/model/ifas.py) with the checkpoint's pretrained projector and the GAC added. A family fixes
only (docs/architecture.md, "Checkpoint families"):
- how its projector reads the patches and which vision output it reads (ArchConfig fields),
- the tokens around the image tokens in the prompt (the chat template is the checkpoint's own),
- its transformers config and processor, for the family-format export of a model without GAC
  (``ifas-export --format hf``), which ``AutoModelForImageTextToText`` loads.

The family comes from the checkpoint's ``config.json`` ``model_type``; other types are refused, with the
list below, before any weight is read.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from trainer.model.ifas import ModelLoadError
from trainer.model.internvl import internvl_arch, internvl_config, save_internvl_processor
from trainer.model.llava import (
    ANYRES_TYPES,
    anyres_config,
    llava_arch,
    llava_config,
    llava_processor,
    save_anyres_processor,
)
from trainer.model.qwen_vl import qwen_arch, qwen_config, save_qwen_processor
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES, verify_weights, write_weights

# this project's state-dict prefixes -> the family class's (the same for every family here; the first
# that matches wins)
HF_PREFIXES = (
    ("projector.image_newline", "model.image_newline"),  # LLaVA-NeXT/OneVision keep it beside the projector
    ("vision.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)
# Qwen-VL: the whole visual module, merger included, is the vision group
QWEN_PREFIXES = (("vision.", "model.visual."), ("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."))


def _save_llava_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None,
                          directory: str | Path) -> None:
    llava_processor(ifas_config, tokenizer, chat_template).save_pretrained(str(directory))


@dataclass(frozen=True)
class Release:
    """A Hub release a family covers, with its vision tower's shape (for the README's token counts)."""

    name: str
    vision: str
    image_size: int
    patch_size: int
    layers: int
    merge: int = 1  # patches per image token, per side (InternVL's pixel shuffle: 2)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    model_class: str  # the transformers class the checkpoint was saved from
    releases: tuple[Release, ...]  # what it covers (README, "Checkpoint families")
    # (config, tokenizer, model.image_size) -> the ArchConfig fields it fixes
    arch: Callable[[PretrainedConfig, PreTrainedTokenizerBase, int | None], dict[str, Any]]
    hf_config: Callable[[Mapping[str, Any]], PretrainedConfig]  # its config, from ifas_config.json
    save_processor: Callable[..., None]  # (ifas_config, tokenizer, chat_template, directory): its processor files
    prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES  # I-FAS state-dict prefix -> the family class's

    def checkpoint_prefixes(self) -> dict[str, str]:
        """The family class's prefixes -> I-FAS ones (how a checkpoint's tensors are placed)."""
        return {theirs: ours for ours, theirs in self.prefixes}

    def transformers_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)


FAMILIES = (
    Family("llava", ("llava",), "LlavaForConditionalGeneration",
           (Release("llava-hf/llava-1.5-7b-hf, llava-1.5-13b-hf", "CLIP-L/14-336", 336, 14, 24),
            Release("llava-hf/llava-interleave-qwen-0.5b-hf, -7b-hf", "SigLIP-so400m/14-384", 384, 14, 27)),
           llava_arch, llava_config, _save_llava_processor),
    Family("llava_next", ("llava_next",), "LlavaNextForConditionalGeneration",
           (Release("llava-hf/llava-v1.6-mistral-7b-hf, llava-v1.6-vicuna-7b-hf, llama3-llava-next-8b-hf",
                    "CLIP-L/14-336", 336, 14, 24),),
           llava_arch, partial(anyres_config, family="llava_next"),
           partial(save_anyres_processor, family="llava_next")),
    Family("llava_onevision", ("llava_onevision",), "LlavaOnevisionForConditionalGeneration",
           (Release("llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-ov-hf, -0.5b-si-hf, -7b-si-hf",
                    "SigLIP-so400m/14-384", 384, 14, 26),),
           llava_arch, partial(anyres_config, family="llava_onevision"),
           partial(save_anyres_processor, family="llava_onevision")),
    Family("internvl", ("internvl",), "InternVLForConditionalGeneration",
           (Release("OpenGVLab/InternVL3-1B-hf, -2B-hf, -8B-hf, InternVL2.5-1B..8B-hf", "InternViT-300M-448px",
                    448, 14, 24, merge=2),),
           internvl_arch, internvl_config, save_internvl_processor),
    Family("qwen2_vl", ("qwen2_vl",), "Qwen2VLForConditionalGeneration",
           (Release("Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct", "Qwen2-VL ViT-675M/14, at 448", 448, 14, 32,
                    merge=2),),
           qwen_arch, qwen_config, save_qwen_processor, QWEN_PREFIXES),
    Family("qwen2_5_vl", ("qwen2_5_vl",), "Qwen2_5_VLForConditionalGeneration",
           (Release("Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct", "Qwen2.5-VL ViT-670M/14 (window attention), at 448",
                    448, 14, 32, merge=2),),
           qwen_arch, qwen_config, save_qwen_processor, QWEN_PREFIXES),
    Family("qwen3_vl", ("qwen3_vl",), "Qwen3VLForConditionalGeneration",
           (Release("Qwen/Qwen3-VL-2B-Instruct, -4B-Instruct, -8B-Instruct", "Qwen3-VL ViT/16 (deepstack), at 448",
                    448, 16, 27, merge=2),),
           qwen_arch, qwen_config, save_qwen_processor, QWEN_PREFIXES),
)


def supported_families() -> str:
    return "; ".join(f"{f.name} (model_type {', '.join(f.model_types)}: {'; '.join(r.name for r in f.releases)})"
                     for f in FAMILIES)


def readme_table(gac_prefix_queries: int = 4) -> str:
    """The README's table of families: the image tokens per face at each release's own resolution
    (projector tokens, then with the GAC), counted by the code the model is built with."""
    from types import SimpleNamespace

    from trainer.model.ifas import image_token_counts

    rows = ["| family (`model_type`) | releases | vision tower | image tokens per face: projector + GAC |",
            "|---|---|---|---|"]
    for family in FAMILIES:
        for r in family.releases:
            vision = SimpleNamespace(image_size=r.image_size, patch_size=r.patch_size, num_hidden_layers=r.layers)
            newline = any(t in ANYRES_TYPES for t in family.model_types)
            patches, total = image_token_counts(vision, r.merge, True, gac_prefix_queries, newline)
            rows.append(f"| {family.name} | {r.name} | {r.vision}, {r.layers} layers | "
                        f"{patches} + {total - patches} = {total} |")
    return "\n".join(rows)


def checkpoint_family(root: str | Path) -> Family:
    """The family of the checkpoint directory ``root``, from its config.json alone (no weight is read:
    ``--check`` refuses an unknown family within seconds)."""
    path = Path(root) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"model.path {root} has no config.json: give a transformers checkpoint directory "
                             "(or model.vision_path + model.llm_path for a separate encoder and LLM)")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from exc
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ModelLoadError(f"{path}: model_type {model_type!r} is not a supported checkpoint family. model.path loads "
                         f"{supported_families()}. A separate vision encoder and LLM load with model.vision_path + "
                         "model.llm_path")


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelLoadError(f"unknown checkpoint family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


class NotFamilyCompatible(ValueError):
    """The model has parts its family's class cannot hold (GAC tokens, merged patches); the message says which."""


def check_family_compatible(arch: Mapping[str, Any]) -> None:
    """``arch``: the model's ArchConfig as a dict (``ifas_config.json``'s ``arch``)."""
    family = arch.get("family", "llava")
    if arch.get("gac"):
        raise NotFamilyCompatible(f"the model has a GAC, which {family} has no place for; train with model.gac=false "
                                  "to export in the family's format (or export in this project's format)")
    if family == "llava" and arch.get("projector_merge", 1) != 1:
        raise NotFamilyCompatible(f"the projector merges {arch['projector_merge']}x{arch['projector_merge']} patches "
                                  "per token, LLaVA's reads one; train with model.projector_merge=1 to export as LLaVA")


def is_family_compatible(arch: Mapping[str, Any]) -> bool:
    try:
        check_family_compatible(arch)
    except NotFamilyCompatible:
        return False
    return True


def to_family_name(name: str, prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES) -> str:
    for ours, theirs in prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise NotFamilyCompatible(f"weight {name!r} has no place in the family's class")


class FamilyNamedTensors(Mapping):
    """A read-only view of this project's state dict (or DeepSpeed's lazy one) under the family's names."""

    def __init__(self, tensors: Mapping[str, Any], prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES) -> None:
        self._ours = {to_family_name(k, prefixes): k for k in tensors}
        self._tensors = tensors

    def __getitem__(self, name: str) -> Any:
        return self._tensors[self._ours[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ours)

    def __len__(self) -> int:
        return len(self._ours)


def save_family_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None,
                          directory: str | Path) -> None:
    """Write the family's processor for the model (images prepared as ImageTransform does) to ``directory``;
    ``chat_template``: a processor-level template to keep (e.g. the base checkpoint's)."""
    family = family_named(ifas_config["arch"].get("family", "llava"))
    family.save_processor(ifas_config, tokenizer, chat_template, directory)


def write_family(ifas_config: Mapping[str, Any], tensors: Mapping[str, Any], processor_dir: str | Path,
                 directory: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, dtype=None) -> None:
    """Write a model without GAC (its config dict and state dict, or DeepSpeed's lazy one; cast to ``dtype``
    if given) in its family's transformers format: weights streamed through trainer.model.weights, config,
    the processor files of ``processor_dir`` (save_family_processor's) and a generation config that stops
    at the EOS every trained answer ends with; then check the weights against the config."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    check_family_compatible(ifas_config["arch"])
    family = family_named(ifas_config["arch"].get("family", "llava"))
    config = family.hf_config(ifas_config)
    with torch.device("meta"):
        skeleton = family.transformers_class()(config)
    write_weights(skeleton, FamilyNamedTensors(tensors, family.prefixes), directory, max_shard_size, dtype)
    if dtype is not None:  # what from_pretrained(dtype="auto") loads, on every level of the config
        config.dtype = config.text_config.dtype = config.vision_config.dtype = dtype
    config.save_pretrained(str(directory))
    for f in Path(processor_dir).iterdir():
        if f.is_file():
            shutil.copyfile(f, Path(directory) / f.name)
    tok = AutoTokenizer.from_pretrained(str(processor_dir))
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(str(directory))
    verify_weights(skeleton, directory)  # read back: every tensor present once, with the family's shapes


if __name__ == "__main__":
    print(readme_table())
