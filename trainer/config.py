"""Typed run configuration: dataclasses loaded from YAML, with ``section.key=value`` overrides.

Every run (train, eval, predict) is described by one ``RunConfig``. Loading refuses unknown
keys and values of the wrong type with a one-line error naming the key, so a typo stops the
run before any rank starts work.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shards.schema import CAPTION_PROMPT
from trainer.config_checks import MODULE_GROUPS, size_arg, validate
from trainer.typed_yaml import ConfigError, build_dataclass, merge_trees, parse_overrides

__all__ = ["MODULE_GROUPS", "ConfigError", "RunConfig", "load_config", "parse_overrides", "size_arg", "validate"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # shipped files (launch/...) resolve against it


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


def loader_workers_per_rank() -> int:
    """Loader workers for one rank: the node's CPUs shared by its ranks (the launcher's LOCAL_SIZE, torchrun's
    LOCAL_WORLD_SIZE or SLURM's tasks per node), less one for the training process; 1 to 8 (decoding and
    resizing faces is PIL work, one process per core)."""
    env = os.environ
    ranks = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "1")
                .split("(")[0] or 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(ranks, 1) - 1))
