"""Building the model of a run (``build_model``) from ``ModelConfig``: weights from (a) a local
checkpoint of a supported family (trainer/model/families/), (b) a vision-encoder directory plus an LLM
directory, (c) an I-FAS export (``model.init_from``), or (d) a named tiny preset built offline (demo,
tests). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from trainer.config import ModelConfig
from trainer.model.arch import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_FAMILY,
    ArchConfig,
    ModelLoadError,
    default_dtype,
    has_class_token,
    resolve_attn_implementation,
    side,
    sub_config,
)
from trainer.model.families import Family, checkpoint_family, family_named
from trainer.model.ifas import IFASModel
from trainer.model.pretrained import CheckpointError, CheckpointPart, load_pretrained
from trainer.model.weights import WeightsError
from trainer.run_dir import CONFIG_NAME
from trainer.sample.tokenizer import ensure_image_token, image_token_of, judgment_token_ids, load_tokenizer

log = logging.getLogger("ifas.model")


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


def _export_config(cfg: ModelConfig) -> dict[str, Any]:
    """ifas_config.json of ``model.init_from`` (an ifas-export directory)."""
    path = _require_dir(cfg.init_from, "model.init_from") / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(f"model.init_from: {path.parent} is not an I-FAS export (no {CONFIG_NAME}); "
                             "give a directory ifas-export wrote")
    return json.loads(path.read_text())


def image_tokens_of(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[int, list[str]]:
    """(image tokens per sample, the tokens the prompt puts around them) of the model ``cfg`` builds,
    from config files alone (no weights): for checks before a build."""
    if cfg.init_from:
        saved = _export_config(cfg)
        arch = ArchConfig.from_dict(saved["arch"])
        return (family_named(arch.family).image_token_counts(sub_config(saved["vision_config"]), arch.projector_merge,
                                                              arch.gac, arch.gac_prefix_queries, arch.image_size)[1],
                arch.image_span)
    fixed: dict[str, Any] = {"projector_merge": cfg.projector_merge}
    family = family_named(DEFAULT_FAMILY)  # presets and vision + LLM directories
    if cfg.path:
        _, family, family_config, fixed = _family_checkpoint(cfg, tokenizer)
        vision = family_config.vision_config
    elif cfg.vision_path:
        vcfg = AutoConfig.from_pretrained(str(_require_dir(cfg.vision_path, "model.vision_path")))
        vision = getattr(vcfg, "vision_config", vcfg)
    else:
        vision = preset_configs(cfg.preset, len(tokenizer))[0]
    count = family.image_token_counts(vision, fixed["projector_merge"], cfg.gac, cfg.gac_prefix_queries,
                                      fixed.get("image_size"))[1]
    return count, fixed.get("image_span", ["", ""])


def _family_checkpoint(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase
                       ) -> tuple[Path, Family, PretrainedConfig, dict[str, Any]]:
    """(directory, family, config, the ArchConfig fields it fixes) of model.path, checked against the
    tokenizer; from config files alone, for the build and for the checks before it."""
    root = _require_dir(cfg.path, "model.path")
    family = checkpoint_family(root)
    family_config = AutoConfig.from_pretrained(str(root))
    _check_image_token(family_config, tokenizer, root)
    return root, family, family_config, _family_arch(family, family_config, tokenizer, cfg)


def _family_arch(family: Family, family_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                 cfg: ModelConfig) -> dict[str, Any]:
    """The ArchConfig fields a family checkpoint fixes; model.projector_merge may only repeat its merge."""
    fixed = family.arch(family_config, tokenizer, cfg.image_size)
    merge = fixed["projector_merge"]
    if cfg.projector_merge not in (1, merge):
        raise ModelLoadError(f"model.projector_merge={cfg.projector_merge} with a {family.name} checkpoint: its "
                             f"pretrained projector reads {merge}x{merge} patches per token; leave "
                             "model.projector_merge unset")
    return {**fixed, "family": family.name}


def image_processing(directory: Path | None, image_size: int, required: bool) -> dict[str, Any]:
    """The ArchConfig fields of the checkpoint's image processor (mean, std, resampling filter), read by
    transformers' own AutoImageProcessor: from preprocessor_config.json (how most releases ship it) or the
    ``image_processor`` of processor_config.json (how transformers 5 saves it), with the class's defaults for
    what the file leaves out. ``required``: a checkpoint without either file is refused (its normalisation cannot
    be guessed); otherwise (a preset, or a vision directory without one) CLIP's, with a warning for a directory."""
    info: dict[str, Any] = {"image_size": image_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    if directory is None:
        return info
    from transformers import AutoImageProcessor

    try:  # the PIL backend: what ImageTransform computes, and no torchvision needed
        processor = AutoImageProcessor.from_pretrained(str(directory), backend="pil")
    except (OSError, ValueError, KeyError) as exc:
        if required:
            raise ModelLoadError(f"{directory} has no image processor (preprocessor_config.json, or processor_config"
                                 f".json with an image_processor): copy the release's processor files beside its "
                                 f"weights; its image normalisation cannot be guessed ({exc})") from exc
        log.warning("%s has no image processor settings (%s): using CLIP's mean and std", directory, exc)
        return info
    info.update(image_mean=[float(v) for v in processor.image_mean], image_std=[float(v) for v in processor.image_std],
                image_resample=int(getattr(processor, "resample", ArchConfig.image_resample)))
    return info


def checkpoint_summary(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the build takes from model.path's files, read from them alone (no weight; ``--check`` prints it, and
    raises what the build would): family, config layout, tying, image token, image normalisation."""
    root, family, family_config, fixed = _family_checkpoint(cfg, tokenizer)
    raw = json.loads((root / "config.json").read_text())
    size = fixed.get("image_size") or side(family_config.vision_config.image_size)
    images = image_processing(root, size, required=True)
    return {"family": family.name, "config.json": "nested" if "text_config" in raw else "flat (transformers 4)",
            "tied embeddings": tied_embeddings(family_config),
            "image token": tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(image_token_of(tokenizer))),
            "image size": size, "image mean": images["image_mean"], "image std": images["image_std"],
            "resample": images.get("image_resample", ArchConfig.image_resample)}


def tied_embeddings(family_config: PretrainedConfig) -> bool:
    """Whether transformers ties the checkpoint's LM head to its input embedding: the composite config's
    ``tie_word_embeddings`` (a flat transformers-4 config.json keeps it at the top level, its text config has
    none), else the text config's."""
    tied = getattr(family_config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(family_config.text_config, "tie_word_embeddings", False)
    return bool(tied)


def checkpoint_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the model.path checkpoint (or model.tokenizer_path), naming the image token its family's
    processor falls back to where the tokenizer names none."""
    family = checkpoint_family(_require_dir(cfg.path, "model.path"))
    return load_tokenizer(cfg.tokenizer_path or cfg.path, image_token=family.default_image_token)


def _check_image_token(family_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, root: Path) -> None:
    """The checkpoint's image token must be the tokenizer's placeholder: its embedding row is the one trained."""
    theirs = getattr(family_config, "image_token_id", None)
    ours = tokenizer.convert_tokens_to_ids(image_token_of(tokenizer))
    if theirs is not None and theirs != ours:
        name = tokenizer.convert_ids_to_tokens(theirs) if theirs < len(tokenizer) else None
        raise ModelLoadError(
            f"{root}/config.json has image_token_id {theirs} ({name!r}) but the tokenizer's image placeholder is "
            f"{image_token_of(tokenizer)!r} ({ours}): use the checkpoint's own tokenizer, or name the placeholder "
            f'in its tokenizer_config.json ("extra_special_tokens": {{"image_token": "{name}"}})')


def _require_dir(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{key} {p} does not exist; give a local checkpoint directory (nothing is downloaded)")
    return p


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    """A model built on the meta device (no memory, no init): the reference for a checkpoint's key names."""
    with torch.device("meta"), no_init_weights():
        return build()


def _group_context(loaded: set[str], zero3_config: dict[str, Any] | None) -> Callable[[str], Any]:
    """How each module group is built: a group the checkpoint fills is made without random init and,
    under ZeRO-3, partitioned as each of its modules is made (``deepspeed.zero.Init``), so no rank ever
    holds it whole (docs/architecture.md, "Loading checkpoints at scale")."""

    def context(group: str) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if group in loaded:
            if zero3_config is not None:
                import deepspeed
                import torch._dynamo  # noqa: F401  (imported lazily inside zero.Init it fails: "Known traps")

                # the dtype follows the config's bf16 flag (an explicit dtype is ignored on CPU, "Known traps")
                stack.enter_context(deepspeed.zero.Init(config_dict_or_path=zero3_config))
            stack.enter_context(no_init_weights())
        return stack

    return context


def _partition_fresh(model: IFASModel, loaded: set[str], zero3_config: dict[str, Any]) -> None:
    """Partition the randomly initialised groups, built whole so that every init (transformers' and
    torch's, which set submodules' weights after making them) ran as in a plain build: identical weights."""
    import deepspeed

    for group, module in model.module_groups().items():
        if group not in loaded:
            deepspeed.zero.Init(module=module, config_dict_or_path=zero3_config)


def build_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, *, dtype: torch.dtype = torch.float32,
    zero3_config: dict[str, Any] | None = None,
) -> tuple[IFASModel, PreTrainedTokenizerBase]:
    """Build the model and tokenizer for a run: LLaVA dir, vision+LLM dirs, or a tiny preset.

    For the tiny preset the caller passes the (demo) tokenizer; for checkpoints it is read from
    ``cfg.tokenizer_path`` or the checkpoint directory. Parameters are made in ``dtype``; with a
    ZeRO-3 DeepSpeed config they are partitioned as they are made, and the checkpoint's weights are
    streamed into the partitions tensor by tensor (trainer/model/pretrained.py).
    """
    arch_kw: dict[str, Any] = dict(
        vision_feature_layer=cfg.vision_feature_layer,
        projector_merge=cfg.projector_merge,
        gac=cfg.gac,
        gac_prefix_queries=cfg.gac_prefix_queries,
        gac_heads=cfg.gac_heads,
    )
    parts: list[CheckpointPart] = []
    arch: ArchConfig | None = None
    if cfg.init_from:  # a new run from an I-FAS export: its architecture, tokenizer and every weight
        root = _require_dir(cfg.init_from, "model.init_from")
        saved = _export_config(cfg)
        tokenizer = load_tokenizer(root)  # the one the export's token ids belong to
        vision_config, text_config = sub_config(saved["vision_config"]), sub_config(saved["text_config"])
        arch = ArchConfig.from_dict(saved["arch"])
        groups = ("vision", "llm", "projector") + (("gac",) if arch.gac else ())
        parts.append(CheckpointPart(root, {f"{g}.": f"{g}." for g in groups}))
    elif cfg.path:
        tokenizer = tokenizer or checkpoint_tokenizer(cfg)  # (an unsupported family is refused first)
        root, family, family_config, fixed = _family_checkpoint(cfg, tokenizer)
        arch_kw.update(fixed)
        vision_config, text_config = family_config.vision_config, family_config.text_config
        # the I-FAS LLM is built from the text config: it gets the tying transformers gives the whole checkpoint
        text_config.tie_word_embeddings = tied_embeddings(family_config)
        image_info = image_processing(root, arch_kw.pop("image_size", None) or side(vision_config.image_size), True)
        # names as the family's class has them (older files' layouts, e.g. llava-hf's transformers-4 one, are
        # translated by transformers' own rules first: trainer/model/pretrained.py)
        parts.append(CheckpointPart(root, family.checkpoint_prefixes(),
                                    _meta(lambda: family.transformers_class()(family_config))))
    elif cfg.vision_path:
        vroot = _require_dir(cfg.vision_path, "model.vision_path")
        lroot = _require_dir(cfg.llm_path, "model.llm_path")
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_path or lroot)
        vcfg = AutoConfig.from_pretrained(str(vroot))
        vision_config = getattr(vcfg, "vision_config", vcfg)  # a full CLIP/SigLIP checkpoint holds one
        text_config = AutoConfig.from_pretrained(str(lroot))
        image_info = image_processing(vroot, vision_config.image_size, required=False)
        parts.append(CheckpointPart(vroot, {"": "vision."}, _meta(lambda: AutoModel.from_config(vision_config))))
        parts.append(CheckpointPart(lroot, {"": "llm."}, _meta(lambda: AutoModelForCausalLM.from_config(text_config))))
    else:
        if tokenizer is None:
            raise ModelLoadError(
                f"model.preset={cfg.preset!r} needs a tokenizer (model.tokenizer_path or the demo BPE)"
            )
        vision_config, text_config = preset_configs(cfg.preset, len(tokenizer))
        image_info = image_processing(None, vision_config.image_size, required=False)

    # Rows for tokens the checkpoint's vocabulary lacks (e.g. an added <image>) are made here, not by a
    # resize after the build (which a partitioned embedding would not survive).
    image_token_id = ensure_image_token(tokenizer)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    if arch is None:
        yes_id, no_id = judgment_token_ids(tokenizer)
        has_cls = arch_kw.pop("has_class_token", None)
        has_cls = has_class_token(vision_config) if has_cls is None else has_cls
        pooling = cfg.pooling if cfg.pooling != "auto" else ("cls" if has_cls else "mean")
        if pooling == "cls" and not has_cls:
            raise ModelLoadError(
                f"model.pooling=cls but the {vision_config.model_type} encoder has no class token; use mean"
            )
        arch = ArchConfig(image_token_id=image_token_id, yes_token_id=yes_id, no_token_id=no_id, pooling=pooling,
                          has_class_token=has_cls, **arch_kw, **image_info)
    loaded = {target.split(".")[0] for part in parts for target in part.prefixes.values()}
    with default_dtype(dtype):
        model = IFASModel(vision_config, text_config, arch, resolve_attn_implementation(cfg.attn_implementation, dtype),
                          group_context=_group_context(loaded, zero3_config))
        if zero3_config is not None:
            _partition_fresh(model, loaded, zero3_config)
    vocabulary = [name for name, p in model.named_parameters(remove_duplicate=False)
                  if p is model.llm.get_input_embeddings().weight or p is model.llm.get_output_embeddings().weight]
    try:
        load_pretrained(model, parts, vocabulary)
    except (CheckpointError, WeightsError) as exc:
        raise ModelLoadError(str(exc)) from exc
    for name in cfg.gradient_checkpointing:  # recompute layer activations in backward
        getattr(model, name).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer
