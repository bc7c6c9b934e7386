"""Checkpoint families: the image-text-to-text checkpoints ``model.path`` loads, behind one interface
(``Family``, trainer/model/families/base.py), and the one registry that lists them.

Every family here is a transformers-native class (``trust_remote_code`` is never needed) and becomes the same
I-FAS model (trainer/model/ifas.py) with the checkpoint's own vision tower, connector and LLM, plus the GAC.
The family comes from the checkpoint's ``config.json`` ``model_type``; other types are refused, with the list
below, before any weight is read. Adding a family: a module with a ``Family`` subclass, and one line in
``FAMILIES`` (or ``register(...)`` from outside the project); docs/architecture.md, "Adding a family".
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.model.arch import ModelLoadError
from trainer.model.families.base import Family, Release
from trainer.model.families.internvl import InternVLFamily
from trainer.model.families.llava import AnyresFamily, LlavaFamily
from trainer.model.families.qwen_vl import QWEN_LEGACY_PREFIXES, QwenVLFamily

FAMILIES: list[Family] = [
    LlavaFamily(),
    AnyresFamily("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextConfig", "LlavaNextProcessor", None,
                 (Release("llava-hf/llava-v1.6-mistral-7b-hf, llava-v1.6-vicuna-7b-hf, llama3-llava-next-8b-hf",
                          "CLIP-L/14-336", 336, 14, 24),)),
    AnyresFamily("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig",
                 "LlavaOnevisionProcessor", "LlavaOnevisionVideoProcessor",
                 (Release("llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-ov-hf, -0.5b-si-hf, -7b-si-hf",
                          "SigLIP-so400m/14-384", 384, 14, 26),)),
    InternVLFamily(),
    QwenVLFamily("qwen2_vl", "transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel",
                 "Qwen2VLTextModel", "Qwen2VLConfig", "Qwen2VLProcessor", "Qwen2VLVideoProcessor",
                 (Release("Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct", "Qwen2-VL ViT-675M/14, at 448", 448, 14, 32,
                          merge=2),), vision_width_key="embed_dim", legacy_prefixes=QWEN_LEGACY_PREFIXES),
    QwenVLFamily("qwen2_5_vl", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                 "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLTextModel", "Qwen2_5_VLConfig",
                 "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor",
                 (Release("Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct", "Qwen2.5-VL ViT-670M/14 (window attention), "
                          "at 448", 448, 14, 32, merge=2),), legacy_prefixes=QWEN_LEGACY_PREFIXES),
    QwenVLFamily("qwen3_vl", "transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel",
                 "Qwen3VLTextModel", "Qwen3VLConfig", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
                 (Release("Qwen/Qwen3-VL-2B-Instruct, -4B-Instruct, -8B-Instruct",
                          "Qwen3-VL ViT/16 (deepstack), at 448", 448, 16, 27, merge=2),)),
]


def register(family: Family) -> Family:
    """Add a family (e.g. from a plugin module imported before the run starts); its name and model types must be
    new."""
    taken = {f.name for f in FAMILIES} | {t for f in FAMILIES for t in f.model_types}
    clash = ({family.name} | set(family.model_types)) & taken
    if clash:
        raise ValueError(f"checkpoint family {family.name!r}: {sorted(clash)} already registered")
    FAMILIES.append(family)
    return family


def supported_families() -> str:
    return "; ".join(f"{f.name} (model_type {', '.join(f.model_types)}: {'; '.join(r.name for r in f.releases)})"
                     for f in FAMILIES)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelLoadError(f"unknown checkpoint family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


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
