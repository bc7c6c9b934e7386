"""Typed run configuration: dataclasses loaded from YAML, with ``section.key=value`` overrides.

Every run (train, eval, predict) is described by one ``RunConfig``. Loading refuses unknown
keys and values of the wrong type with a one-line error naming the key, so a typo stops the
run before any rank starts work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from shards.schema import CAPTION_PROMPT
from trainer.typed_yaml import ConfigError, build_dataclass, merge_trees, parse_overrides

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_overrides"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # shipped files (launch/...) resolve against it
MODULE_GROUPS = ("vision", "projector", "gac", "llm")


@dataclass
class ModelConfig:
    # Where the weights come from (first that is set wins): a local image-text-to-text checkpoint of a
    # supported family (LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL:
    # trainer/model/families/), found from its config.json model_type;
    # or a vision-encoder directory plus an LLM directory; or a named offline preset.
    path: str | None = None  # (model.llava_path, its name before other families, is read as model.path)
    vision_path: str | None = None
    llm_path: str | None = None
    preset: str = "tiny"
    # Tokenizer directory; None = the LLM's/LLaVA's own, or for the tiny preset a BPE built from
    # the training captions (saved under train.output_dir/model_config, see trainer/run_dir.py).
    tokenizer_path: str | None = None
    # An ifas-export directory to start a new run from: its architecture (the keys below are taken from
    # it), tokenizer and weights. Not for resuming (a run resumes from its own checkpoints by itself).
    init_from: str | None = None
    # The input size of a face for checkpoints without a native one (Qwen-VL: default 448, a multiple of
    # patch x merge: 28, or 32 for Qwen3-VL); other families run at their encoder's size.
    image_size: int | None = None
    vision_feature_layer: int = -2  # patch features for the projector, as in LLaVA
    projector_merge: int = 1  # k > 1: one image token per k x k patches (fewer LLM tokens)
    pooling: str = "auto"  # GAC per-layer pooling: cls | mean | auto (cls if the encoder has one)
    gac: bool = True
    gac_prefix_queries: int = 4
    gac_heads: int = 4
    # auto: flash_attention_2 on CUDA when flash-attn is installed (the [gpu] extra) and the weights are bf16/fp16,
    # else sdpa. Recorded in the export: evaluation and prediction use the same (docs/architecture.md, "Attention").
    attn_implementation: str = "auto"
    # Modules whose layers recompute activations in backward (saves memory): any of vision, llm.
    gradient_checkpointing: list[str] = field(default_factory=list)
    # Loss through the fused LM-head cross entropy (kernels/): auto = on CUDA only; true; false.
    fused_kernels: bool | str = "auto"
    # The kernels' backend, for the GAC pooling and the fused loss: auto = Triton on CUDA, torch elsewhere;
    # torch rules the Triton kernels out (e.g. when debugging a GPU run); triton.
    kernel_backend: str = "auto"


@dataclass
class ShardSource:
    """A training shard set with its share of the samples (data.train_shards: {path: ..., weight: ...})."""

    path: str
    weight: float = 1.0


@dataclass
class AugmentConfig:
    """Train-time image augmentation against capture-condition shift (trainer/data/augment.py); never
    applied in evaluation."""

    enabled: bool = False
    crop_scale: float = 0.8  # random resized crop keeps this..100% of the area (1 = no crop)
    flip: float = 0.5  # probability of a horizontal flip
    color: float = 0.2  # brightness/contrast/saturation jitter +-this, colour cast +-half of it (0 = off)
    resample: float = 0.25  # probability of down-up resampling by 2-4x (resolution shift)
    blur: float = 0.1  # probability of a Gaussian blur, radius 0.5-1.5 px (blur is also a spoof cue: keep low)
    jpeg: float = 0.5  # probability of a JPEG re-encode
    jpeg_quality_min: int = 40  # its quality is drawn from this..95


@dataclass
class DataConfig:
    # Shard-set dirs, globs or brace URLs, read as one set; or with weights ({path: ..., weight: 0.3}):
    # each set then streams on its own and every sample is drawn from a set with probability
    # proportional to its weight (trainer/data/stream.py, deterministic for the seed and resumable).
    train_shards: list[str | ShardSource] = field(default_factory=list)
    eval_shards: list[str] = field(default_factory=list)
    max_length: int = 128  # tokens per sample, image tokens included; captions are truncated. 0: the prompt
    answer_tokens: int = 96  # with max_length 0: (its image tokens included, from the checkpoint) + this many
    shuffle_buffer: int = 512
    num_workers: int = -1  # loader worker processes per rank; -1: from the CPUs per rank (loader_workers_per_rank)
    answer_style: str = "caption"  # caption: "Yes. <caption>"; judgment: "Yes" only
    # shards: each sample's own caption (SCF or template, whatever the shards hold); template: the
    # attack type's template sentence instead (the template-vs-SCF captions ablation).
    caption_source: str = "shards"
    # fas: I-FAS (the question -> "Yes/No. <caption>"). caption: fine-tune a captioner on the shards'
    # captions (SCF step 5): caption_prompt -> "<caption>", every token weighted alike; the model must
    # be LLaVA-shaped (model.gac=false, model.projector_merge=1) to export for ifas-shards caption.
    task: str = "fas"
    caption_prompt: str = CAPTION_PROMPT
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Live/spoof balancing: every training set's live and spoof samples stream apart and are drawn
    # half and half (within the set's weight), the minority label then coming round more often.
    balance: bool = False

    def train_sources(self) -> list[ShardSource]:
        """data.train_shards as sources (a plain path has weight 1)."""
        return [s if isinstance(s, ShardSource) else ShardSource(s) for s in self.train_shards]

    @property
    def mixed(self) -> bool:
        """Weighted mixing: some train_shards entry gives a weight."""
        return any(isinstance(s, ShardSource) for s in self.train_shards)


@dataclass
class LossConfig:
    alpha: float = 0.7  # weight of the judgment part of the lopsided LM loss
    # lopsided: L-LM (alpha above); plain: the L-LM ablation, every answer token weighted equally
    # (mean CE over all supervised tokens; alpha is then unused).
    mode: str = "lopsided"


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    # Per-module learning-rate multipliers and freezing (modules: vision, projector, gac, llm).
    lr_scale: dict[str, float] = field(default_factory=lambda: {g: 1.0 for g in MODULE_GROUPS})
    freeze: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    max_steps: int = 200  # the schedule's length
    # Stop (with a checkpoint) after this step, 0 = run to max_steps: splits one run into pieces
    # that fit an allocation; the resumed pieces continue the same schedule.
    stop_at_step: int = 0
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1
    deepspeed_config: str = "launch/ds_zero3.json"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    resume: bool = True  # continue from output_dir/checkpoints/latest when present
    collective_timeout_s: float = 1800.0  # a rank that died or hangs fails the others after this
    max_bad_steps: int = 10  # non-finite loss/gradient steps in a row before the run saves and stops
    log_sample_keys: bool = False  # append each step's sample keys to output_dir/sample_keys/rank<r>.jsonl
    # sft: supervised fine-tuning (the L-LM loss); grpo: the reinforcement stage after it (the grpo: section,
    # trainer/training/grpo/), started from an SFT run or export (model.init_from)
    stage: str = "sft"


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_samples: int = 0  # 0 = every sample of the eval shards
    at_end: bool = True
    every: int = 0  # evaluate the held-out shards every N training steps (0 = only at the end)
    # Shard sets whose `dev_split` samples fix a decision threshold (EER threshold there) that is then
    # applied to the held-out sets: the "threshold fixed on held-out training data" HTER. Empty = none.
    dev_shards: list[str] = field(default_factory=list)
    dev_split: str = "val"  # the samples' `split` metadata value to use ("" = every sample of dev_shards)
    # Held-out samples whose greedy explanation the periodic and final evaluations score with the SCF keyword
    # metrics (trainer/eval/explain.py: cue hit, wrong cue, contradiction); 0 = none
    explain_samples: int = 0
    explain_max_new_tokens: int = 48


@dataclass
class GRPOConfig:
    """The GRPO stage (train.stage=grpo, docs/architecture.md "GRPO stage"): per image, ``group_size`` sampled
    answers; a verifiable reward per answer (each part weighted); group-normalised advantages; a clipped
    policy-ratio objective plus ``kl_coef`` x KL to the frozen reference (the run's starting weights)."""

    group_size: int = 8  # answers sampled per image (G)
    max_new_tokens: int = 40  # answer length cap (judgment + explanation + end of text)
    temperature: float = 1.0  # sampling temperature of the rollouts (the log-probs use the same)
    clip_eps: float = 0.2  # policy-ratio clip range
    kl_coef: float = 0.04  # weight of the KL (k3 estimator) to the reference
    # rollouts generate with the whole policy gathered on every rank (one all-gather per call; needs the full model
    # in memory), or partitioned (gathered layer by layer for every token: trainer/model/generation.py)
    gather_for_generation: bool = True
    # the judgment token's advantage from the judgment reward alone and the explanation tokens' from the other
    # parts (each normalised within the group): an answer's cue or format reward then never pushes its judgment
    # token, nor its judgment reward its explanation. false: one advantage of the total reward for every token
    split_advantages: bool = True
    updates_per_rollout: int = 1  # optimizer steps on each batch of rollouts (>1: the ratio clip acts)
    # judgment weight of the lopsided split of the policy loss (as L-LM does for SFT); null: every answer token alike
    alpha: float | None = None
    # reward parts: judgment correct, cue of the sample's own attack type (live cues for a live face),
    # no contradiction between judgment and explanation, well formed (starts with the judgment token, ends within
    # max_new_tokens, min_words..max_words explanation words); wrong_cue (<= 0): a spoof naming only another
    # attack type's cues
    reward_judgment: float = 1.0
    reward_cue: float = 1.0
    reward_no_contradiction: float = 0.5
    reward_format: float = 0.5
    reward_wrong_cue: float = 0.0
    min_words: int = 4
    max_words: int = 40


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (optional) plus ``key=value`` overrides, then validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file (see launch/configs/)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    data = merge_trees(_old_names(data), _old_names(parse_overrides(overrides or [])))
    cfg = build_dataclass(RunConfig, data)
    validate(cfg)
    if cfg.data.num_workers == -1:
        cfg.data.num_workers = loader_workers_per_rank()
    return cfg


def _old_names(source: dict[str, Any]) -> dict[str, Any]:
    """One config source (the YAML file, or the overrides) with model.llava_path under its new name
    model.path, so a later source overrides either; both in one source must agree."""
    model = source.get("model")
    if isinstance(model, dict) and model.get("llava_path") is not None:
        model = dict(model)
        old = model.pop("llava_path")
        if model.get("path") not in (None, old):
            raise ConfigError(f"model.path={model['path']} and model.llava_path={old} name two checkpoints; "
                              "model.llava_path is the old name of model.path: set only model.path")
        model["path"] = old
        source = {**source, "model": model}
    return source


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


def loader_workers_per_rank() -> int:
    """Loader workers for one rank: the node's CPUs shared by its ranks (the launcher's LOCAL_SIZE, torchrun's
    LOCAL_WORLD_SIZE or SLURM's tasks per node), less one for the training process; 1 to 8 (decoding and
    resizing faces is PIL work, one process per core)."""
    env = os.environ
    ranks = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "1")
                .split("(")[0] or 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(ranks, 1) - 1))


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
