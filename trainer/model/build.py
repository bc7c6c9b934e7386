"""Building the model of a run (``build_model``) from ``ModelConfig``: weights from (a) a local
LLaVA-architecture checkpoint directory, (b) a vision-encoder directory plus an LLM directory, or
(c) a named tiny preset built offline (demo, tests). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from trainer.config import ModelConfig
from trainer.model.ifas import CLIP_MEAN, CLIP_STD, ArchConfig, IFASModel, ModelLoadError
from trainer.model.tokenizer import ensure_image_token, judgment_token_ids, load_tokenizer


def preset_configs(preset: str, vocab_size: int) -> tuple[PretrainedConfig, PretrainedConfig]:
    """Named configs built offline (random weights): ``tiny``/``tiny-siglip`` for the demo and the
    tests; ``bench-1b`` for the GPU throughput benchmark (``trainer.bench``): a CLIP-L/14-wide vision
    tower at 448 px and an LLM of Qwen2-1.5B's widths with 16 of its 28 layers, about 1B parameters."""
    from transformers import CLIPVisionConfig, Qwen2Config, SiglipVisionConfig

    if preset == "bench-1b":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=448, patch_size=14)
        text = Qwen2Config(vocab_size=vocab_size, hidden_size=1536, intermediate_size=8960, num_hidden_layers=16,
                           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=False)
        return vision, text
    vision_kw = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=128,
        patch_size=16,
    )
    if preset == "tiny":
        vision = CLIPVisionConfig(**vision_kw)
    elif preset == "tiny-siglip":
        vision = SiglipVisionConfig(**vision_kw)
    else:
        raise ModelLoadError(f"unknown model preset {preset!r}; known presets: tiny, tiny-siglip, bench-1b")
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return vision, text


def vision_config_of(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    """The vision encoder's config alone (config.json files, no weights): for checks before a build."""
    from transformers import AutoConfig

    if cfg.llava_path:
        return AutoConfig.from_pretrained(str(_require_dir(cfg.llava_path, "model.llava_path"))).vision_config
    if cfg.vision_path:
        vcfg = AutoConfig.from_pretrained(str(_require_dir(cfg.vision_path, "model.vision_path")))
        return getattr(vcfg, "vision_config", vcfg)
    return preset_configs(cfg.preset, vocab_size)[0]


def _has_class_token(vision_config: PretrainedConfig) -> bool:
    # CLIP-style ViTs prepend a class token; SigLIP and similar pool over patches instead.
    return "siglip" not in vision_config.model_type


def _image_processing(path: str | Path | None, image_size: int) -> dict[str, Any]:
    """Read normalisation from a preprocessor_config.json when the checkpoint has one."""
    info: dict[str, Any] = {"image_size": image_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
        info["image_mean"] = list(pre.get("image_mean", info["image_mean"]))
        info["image_std"] = list(pre.get("image_std", info["image_std"]))
    return info


def _require_dir(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{key} {p} does not exist; give a local checkpoint directory (nothing is downloaded)")
    return p


def build_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[IFASModel, PreTrainedTokenizerBase]:
    """Build the model and tokenizer for a run: LLaVA dir, vision+LLM dirs, or a tiny preset.

    For the tiny preset the caller passes the (demo) tokenizer; for checkpoints it is read from
    ``cfg.tokenizer_path`` or the checkpoint directory.
    """
    arch_kw = dict(
        vision_feature_layer=cfg.vision_feature_layer,
        projector_merge=cfg.projector_merge,
        gac=cfg.gac,
        gac_prefix_queries=cfg.gac_prefix_queries,
        gac_heads=cfg.gac_heads,
    )
    pretrained: dict[str, nn.Module] = {}
    if cfg.llava_path:
        from transformers import LlavaForConditionalGeneration

        root = _require_dir(cfg.llava_path, "model.llava_path")
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_path or root)
        llava = LlavaForConditionalGeneration.from_pretrained(str(root), dtype=torch.float32)
        vision_config, text_config = llava.config.vision_config, llava.config.text_config
        arch_kw["vision_feature_layer"] = llava.config.vision_feature_layer
        if cfg.projector_merge != 1:
            raise ModelLoadError(
                "model.projector_merge must be 1 with model.llava_path: LLaVA's projector reads single patches"
            )
        image_info = _image_processing(root, vision_config.image_size)
        pretrained = {
            "vision": llava.model.vision_tower,
            "projector": llava.model.multi_modal_projector,
            "llm.model": llava.model.language_model,
            "llm.lm_head": llava.lm_head,
        }
    elif cfg.vision_path:
        vroot = _require_dir(cfg.vision_path, "model.vision_path")
        lroot = _require_dir(cfg.llm_path, "model.llm_path")
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_path or lroot)
        vcfg = AutoConfig.from_pretrained(str(vroot))
        vision_config = getattr(vcfg, "vision_config", vcfg)  # a full CLIP/SigLIP checkpoint holds one
        vision_cls = type(AutoModel.from_config(vision_config))
        vision = vision_cls.from_pretrained(str(vroot), dtype=torch.float32)
        llm = AutoModelForCausalLM.from_pretrained(str(lroot), dtype=torch.float32)
        text_config = llm.config
        image_info = _image_processing(vroot, vision_config.image_size)
        pretrained = {"vision": vision, "llm": llm}
    else:
        if tokenizer is None:
            raise ModelLoadError(
                f"model.preset={cfg.preset!r} needs a tokenizer (model.tokenizer_path or the demo BPE)"
            )
        vision_config, text_config = preset_configs(cfg.preset, len(tokenizer))
        image_info = _image_processing(None, vision_config.image_size)

    image_token_id = ensure_image_token(tokenizer)
    yes_id, no_id = judgment_token_ids(tokenizer)
    has_cls = _has_class_token(vision_config)
    pooling = cfg.pooling if cfg.pooling != "auto" else ("cls" if has_cls else "mean")
    if pooling == "cls" and not has_cls:
        raise ModelLoadError(
            f"model.pooling=cls but the {vision_config.model_type} encoder has no class token; use mean"
        )
    arch = ArchConfig(
        image_token_id=image_token_id,
        yes_token_id=yes_id,
        no_token_id=no_id,
        pooling=pooling,
        has_class_token=has_cls,
        **arch_kw,
        **image_info,
    )
    model = IFASModel(vision_config, text_config, arch, resolve_attn_implementation(cfg.attn_implementation))
    for name, module in pretrained.items():
        target = model.get_submodule(name)
        target.load_state_dict(module.state_dict())
    if len(tokenizer) > model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(len(tokenizer))
    for name in cfg.gradient_checkpointing:  # recompute layer activations in backward
        getattr(model, name).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def resolve_attn_implementation(requested: str) -> str:
    """``auto``: flash_attention_2 on CUDA when flash-attn is installed, else sdpa (works on CPU)."""
    if requested != "auto":
        return requested
    import importlib.util

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"
