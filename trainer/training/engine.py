"""The DeepSpeed side of a run: its JSON config filled from the run config, parameter groups,
the learning-rate schedule, and ``build_engine`` (model + engine, with what export needs written
to the run directory first)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from trainer.config import PROJECT_ROOT, RunConfig
from trainer.data.provenance import training_data
from trainer.dist import WorldInfo, barrier
from trainer.model.build import build_model
from trainer.model.families.hf_format import is_family_compatible, save_family_processor
from trainer.model.ifas import IFASModel
from trainer.model.pretrained import full_numel, full_shape
from trainer.run_dir import CONFIG_NAME, TRAINING_DATA, RunDir
from trainer.sample.tokenizer import load_tokenizer, processor_chat_template

log = logging.getLogger("ifas.train")


def deepspeed_config_path(cfg: RunConfig) -> Path:
    """train.deepspeed_config, relative to the working directory, else to the project (so the
    default launch/ds_zero3.json is found from anywhere)."""
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        return PROJECT_ROOT / path
    return path


def deepspeed_config(cfg: RunConfig, on_cuda: bool, load_universal: bool = False) -> dict[str, Any]:
    """The JSON config with everything the run config owns filled in (one source of truth).
    ``load_universal``: the run resumes from a universal checkpoint (another world size)."""
    ds = json.loads(deepspeed_config_path(cfg).read_text())
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.optim.grad_clip
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt["params"].update(lr=cfg.optim.lr, betas=list(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    if opt.get("type", "").lower() in ("adam", "adamw"):
        # torch's AdamW (fused kernel on CUDA): DeepSpeed's FusedAdam would JIT-compile its C++/CUDA op
        # with nvcc on every node at the first step (docs/architecture.md, "CPU facts the code relies on").
        opt["params"].setdefault("torch_adam", True)
        if on_cuda and opt["params"]["torch_adam"]:
            opt["params"].setdefault("fused", True)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if on_cuda else "fp32")
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.pop("fp16", None)
    return ds


def param_groups(model: IFASModel, cfg: RunConfig) -> list[dict[str, Any]]:
    """Per-module groups with their lr multiplier; frozen modules get requires_grad=False.
    Biases and norm weights (1-D) take no weight decay."""
    groups = []
    set_by_user = {g for g, scale in cfg.optim.lr_scale.items() if scale != 1.0} | set(cfg.optim.freeze)
    absent = sorted(set_by_user - set(model.module_groups()))
    if absent:  # e.g. no GAC, or Qwen-VL's merger, which is part of its vision group (it follows vision's)
        log.warning("optim.lr_scale/optim.freeze name %s, which this model does not have; ignored", absent)
    for name, module in model.module_groups().items():
        frozen = name in cfg.optim.freeze
        decay, no_decay = [], []
        for p in module.parameters():
            p.requires_grad_(not frozen)
            if not frozen:
                (no_decay if len(full_shape(p)) < 2 else decay).append(p)
        lr = cfg.optim.lr * cfg.optim.lr_scale.get(name, 1.0)
        for params, wd, suffix in ((decay, cfg.optim.weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": name + suffix})
    return groups


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio))


def build_engine(cfg: RunConfig, tokenizer, info: WorldInfo, dev: torch.device, load_universal: bool = False):
    """Model + DeepSpeed engine for a run; rank 0 writes what export needs (architecture, tokenizer)
    to output_dir, and every rank then uses exactly that tokenizer. Returns (model, tokenizer,
    engine, optimizer)."""
    import deepspeed

    run = RunDir(cfg.train.output_dir)
    ds_config = deepspeed_config(cfg, dev.type == "cuda", load_universal)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    model, tokenizer = build_model(cfg.model, tokenizer, dtype=dtype, zero3_config=ds_config if zero3 else None)
    model.use_kernels(cfg.model.fused_kernels is True or (cfg.model.fused_kernels == "auto" and dev.type == "cuda"),
                      cfg.model.kernel_backend)
    if info.is_main:
        run.model_config.mkdir(parents=True, exist_ok=True)
        # the training dtype: what ifas-export writes by default
        (run.model_config / CONFIG_NAME).write_text(json.dumps(model.config_dict(dtype), indent=2))
        tokenizer.save_pretrained(str(run.model_config))
        if is_family_compatible(model.config_dict()["arch"]):  # exportable as its family (ifas-export --format hf)
            # the base checkpoint's processor-level template, if it has one
            chat_template = processor_chat_template(Path(cfg.model.path)) if cfg.model.path else None
            save_family_processor(model.config_dict(), tokenizer, chat_template, run.processor)
        run.run_config.write_text(json.dumps(cfg.to_dict(), indent=2))
        sources = training_data([s.path for s in cfg.data.train_sources()])
        (run.model_config / TRAINING_DATA).write_text(json.dumps(sources, indent=2))
    barrier()
    tokenizer = load_tokenizer(run.model_config)
    n_params = sum(full_numel(p) for p in model.parameters())
    log.info("model: %.2fM parameters, %d image tokens per sample", n_params / 1e6, model.num_image_tokens)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg), config=ds_config,
        lr_scheduler=lambda opt: make_scheduler(opt, cfg))
    return model, tokenizer, engine, optimizer
