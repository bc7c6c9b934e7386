"""The run configuration's value checks (trainer/config.py loads, then calls ``validate``): every size has a least
value, every choice its allowed set, every combination that cannot run is refused with the key and the fix, so
a bad value stops ``--check`` before any rank starts work."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

from trainer.typed_yaml import ConfigError

if TYPE_CHECKING:
    from trainer.config import RunConfig

MODULE_GROUPS = ("vision", "projector", "gac", "llm")  # what optim.freeze and optim.lr_scale name

# Every count and size a run reads, with its least allowed value: a negative batch size must fail in
# --check, not at the final evaluation after hours of training (None: the key is unset).
MIN_SIZES: dict[str, float] = {
    "model.image_size": 1, "model.projector_merge": 1, "model.gac_prefix_queries": 1, "model.gac_heads": 1,
    "data.shuffle_buffer": 0, "data.num_workers": 0, "data.augment.jpeg_quality_min": 1,
    "optim.warmup_steps": 0, "optim.grad_clip": 0,
    "train.max_steps": 1, "train.stop_at_step": 0, "train.micro_batch_size": 1, "train.grad_accum": 1,
    "train.log_every": 1, "train.save_every": 1, "train.keep_last": 0, "train.max_bad_steps": 1,
    "train.collective_timeout_s": 1,
    "eval.batch_size": 1, "eval.max_samples": 0, "eval.every": 0, "eval.explain_samples": 0,
}


# Sizes below the least that stand for "choose for me".
AUTO_SIZES: dict[str, tuple[int, str]] = {"data.num_workers": (-1, "from the CPUs per rank")}


def size_arg(least: int) -> Callable[[str], int]:
    """argparse type for a command's count or size (ifas-eval, ifas-predict): an integer >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {least}")
        return value
    return parse


def _check_sizes(cfg: RunConfig) -> None:
    for key, least in MIN_SIZES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        auto, meaning = AUTO_SIZES.get(key, (None, ""))
        if value is not None and value < least and value != auto:
            alternative = f" (or {auto}: {meaning})" if auto is not None else ""
            raise ConfigError(f"{key} must be >= {least:g}{alternative}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Value checks that need no files (file checks happen in the data/model code)."""
    _check_sizes(cfg)
    if cfg.data.max_length < 0 or cfg.data.answer_tokens < 2:
        raise ConfigError(f"data.max_length={cfg.data.max_length} (0: from the checkpoint) and data.answer_tokens="
                          f"{cfg.data.answer_tokens} (at least 2: the judgment and the end of text) are out of range")
    if not 0.0 <= cfg.loss.alpha <= 1.0:
        raise ConfigError(f"loss.alpha must be in [0, 1], got {cfg.loss.alpha}")
    if cfg.loss.mode not in ("lopsided", "plain"):
        raise ConfigError(f"loss.mode must be lopsided or plain, got {cfg.loss.mode!r}")
    if cfg.train.stage not in ("sft", "grpo"):
        raise ConfigError(f"train.stage must be sft or grpo, got {cfg.train.stage!r}")
    if cfg.train.stage == "grpo":
        _validate_grpo(cfg)
    a = cfg.data.augment
    for key in ("flip", "resample", "blur", "jpeg"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.augment.{key} is a probability in [0, 1], got {getattr(a, key)}")
    if not 0.0 < a.crop_scale <= 1.0 or not 0.0 <= a.color < 1.0 or not 1 <= a.jpeg_quality_min <= 95:
        raise ConfigError(f"data.augment: crop_scale must be in (0, 1], color in [0, 1), jpeg_quality_min in "
                          f"[1, 95]; got {a.crop_scale}, {a.color}, {a.jpeg_quality_min}")
    for name in list(cfg.optim.lr_scale) + cfg.optim.freeze:
        if name not in MODULE_GROUPS:
            raise ConfigError(f"unknown module group {name!r} in optim.lr_scale/optim.freeze; use {MODULE_GROUPS}")
    if set(cfg.optim.freeze) >= set(MODULE_GROUPS):
        raise ConfigError("optim.freeze freezes every module: nothing would train")
    if set(cfg.model.gradient_checkpointing) - {"vision", "llm"}:
        raise ConfigError(
            f"model.gradient_checkpointing takes vision and/or llm, got {cfg.model.gradient_checkpointing}"
        )
    if cfg.model.pooling not in ("auto", "cls", "mean"):
        raise ConfigError(f"model.pooling must be auto, cls or mean, got {cfg.model.pooling!r}")
    if cfg.model.fused_kernels not in ("auto", True, False):
        raise ConfigError(f"model.fused_kernels must be auto, true or false, got {cfg.model.fused_kernels!r}")
    if cfg.model.kernel_backend not in ("auto", "triton", "torch"):
        raise ConfigError(f"model.kernel_backend must be auto, triton or torch, got {cfg.model.kernel_backend!r}")
    if cfg.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {cfg.train.precision!r}")
    if cfg.model.attn_implementation.startswith("flash_attention") and cfg.train.precision == "fp32":
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation} runs only in bf16 or fp16, but "
                          "train.precision=fp32: set train.precision=bf16, or model.attn_implementation=sdpa (or auto, "
                          "which picks flash-attn only where it can run)")
    if cfg.data.answer_style not in ("caption", "judgment"):
        raise ConfigError(f"data.answer_style must be caption or judgment, got {cfg.data.answer_style!r}")
    if cfg.data.caption_source not in ("shards", "template"):
        raise ConfigError(f"data.caption_source must be shards or template, got {cfg.data.caption_source!r}")
    if cfg.data.task not in ("fas", "caption"):
        raise ConfigError(f"data.task must be fas or caption, got {cfg.data.task!r}")
    if cfg.data.task == "caption":
        _validate_captioning(cfg)
    if cfg.model.init_from and (cfg.model.path or cfg.model.vision_path or cfg.model.tokenizer_path):
        raise ConfigError("model.init_from starts from an I-FAS export, which holds every weight and the tokenizer "
                          "its token ids belong to: drop model.path / model.vision_path + model.llm_path / "
                          "model.tokenizer_path")
    if cfg.model.image_size is not None and not cfg.model.path:
        raise ConfigError("model.image_size is the face size for a Qwen-VL checkpoint (model.path); other models run "
                          "at their encoder's size: drop it")
    if cfg.model.vision_path and not cfg.model.llm_path or cfg.model.llm_path and not cfg.model.vision_path:
        raise ConfigError("model.vision_path and model.llm_path go together: set both (or model.path)")


def _validate_captioning(cfg: RunConfig) -> None:
    """data.task=caption trains a LLaVA captioner: no judgment token, no liveness evaluation."""
    if cfg.loss.mode != "plain":
        raise ConfigError(
            "data.task=caption has no judgment token for the lopsided loss to weight; set loss.mode=plain"
        )
    if cfg.model.gac or cfg.model.projector_merge != 1:
        raise ConfigError(
            "data.task=caption trains a LLaVA-form captioner (ifas-export --format llava); "
            "set model.gac=false and model.projector_merge=1"
        )
    if cfg.data.eval_shards or cfg.eval.dev_shards or cfg.eval.every:
        raise ConfigError(
            "data.task=caption has no liveness evaluation; drop data.eval_shards, eval.dev_shards and eval.every"
        )


def _validate_grpo(cfg: RunConfig) -> None:
    """train.stage=grpo: a model that already answers (an SFT run or export) and a sound grpo: section."""
    g = cfg.grpo
    if not cfg.model.init_from:
        raise ConfigError("train.stage=grpo starts from a supervised model: set model.init_from to an SFT run "
                          "directory (e.g. runs/demo) or its export (ifas-export)")
    if cfg.data.task != "fas" or cfg.data.answer_style != "caption":
        raise ConfigError("train.stage=grpo rewards judgments and explanations: it needs data.task=fas and "
                          "data.answer_style=caption")
    if g.group_size < 2:
        raise ConfigError(f"grpo.group_size must be >= 2 (advantages are normalised within a group), got "
                          f"{g.group_size}")
    if g.max_new_tokens < 2 or g.temperature <= 0 or not 0 < g.clip_eps < 1 or g.kl_coef < 0:
        raise ConfigError(f"grpo: max_new_tokens >= 2, temperature > 0, clip_eps in (0, 1) and kl_coef >= 0 are "
                          f"needed; got {g.max_new_tokens}, {g.temperature}, {g.clip_eps}, {g.kl_coef}")
    if g.updates_per_rollout < 1:
        raise ConfigError(f"grpo.updates_per_rollout must be >= 1, got {g.updates_per_rollout}")
    if g.alpha is not None and not 0.0 <= g.alpha <= 1.0:
        raise ConfigError(f"grpo.alpha must be in [0, 1] or null, got {g.alpha}")
    if not 0 <= g.min_words <= g.max_words:
        raise ConfigError(f"grpo.min_words <= grpo.max_words is needed, got {g.min_words} and {g.max_words}")
    if g.reward_wrong_cue > 0:
        raise ConfigError(f"grpo.reward_wrong_cue is a penalty: give a value <= 0, got {g.reward_wrong_cue}")
