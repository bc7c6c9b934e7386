"""What a run checks before any rank starts work: the shard sets, the DeepSpeed config and the
tokenizer (``ifas-train --check`` runs exactly this)."""
from __future__ import annotations

import json
import logging
import os

from trainer.config import ConfigError, RunConfig
from trainer.data import HeldOut, resolve_shards
from trainer.run_dir import RunDir
from trainer.sample.tokenizer import build_demo_tokenizer, load_tokenizer
from trainer.training.engine import deepspeed_config_path

log = logging.getLogger("ifas.train")


def read_captions(urls: list[str], limit: int = 20000) -> list[str]:
    """Captions of the training shards (json members only), for the demo tokenizer."""
    import webdataset as wds

    captions = []
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
                        select_files=lambda name: name.endswith(".json"), handler=wds.warn_and_continue)
    for raw in ds:
        try:
            captions.append(json.loads(raw["json"]).get("caption", ""))
        except (KeyError, ValueError):
            continue
        if len(captions) >= limit:
            break
    return captions


def prepare_tokenizer(cfg: RunConfig, train_urls: list[str]):
    """The run's tokenizer: given path, checkpoint's own, the saved demo one, or a fresh demo BPE."""
    if cfg.model.path and not cfg.model.init_from:  # its family names the image token where the tokenizer does not
        from trainer.model.build import checkpoint_tokenizer

        return checkpoint_tokenizer(cfg.model)  # (an unsupported family is refused before anything is loaded)
    saved = RunDir(cfg.train.output_dir).model_config
    given = cfg.model.init_from or cfg.model.tokenizer_path or cfg.model.llm_path
    if given:
        return load_tokenizer(given)
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)  # resuming: the exact tokenizer the weights were trained with
    return build_demo_tokenizer(read_captions(train_urls))


def check_inputs(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Resolve shard sets and check the DeepSpeed config; raises a user error naming the problem.
    (The tokenizer is checked by prepare_tokenizer, also before any rank starts work.)"""
    sources = cfg.data.train_sources()
    train_urls = resolve_shards([s.path for s in sources], "data.train_shards")
    bad = [s for s in sources if not s.weight > 0]
    if bad:
        raise ConfigError(f"data.train_shards: {bad[0].path} has weight {bad[0].weight}; weights must be positive "
                          "(leave a set out to not train on it)")
    eval_urls = resolve_shards(cfg.data.eval_shards, "data.eval_shards") if cfg.data.eval_shards else []
    held = held_out_dev(cfg, train_urls)
    if held and not held.split and held.shards == frozenset(train_urls):
        raise ConfigError("eval.dev_shards holds every training shard and eval.dev_split is empty, so nothing is left "
                          "to train on; set eval.dev_split to the dev samples' split (e.g. val) or other dev shards")
    ds_path = deepspeed_config_path(cfg)
    if not ds_path.is_file():
        raise ConfigError(f"train.deepspeed_config {ds_path} does not exist; use launch/ds_zero3.json or a copy of it")
    try:
        json.loads(ds_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"train.deepspeed_config {ds_path} is not valid JSON: {exc}") from exc
    return train_urls, eval_urls


def held_out_dev(cfg: RunConfig, train_urls: list[str]) -> HeldOut | None:
    """The training shards' dev samples (eval.dev_shards, their eval.dev_split samples; "" = all), which training
    skips (docs/architecture.md, "Thresholds"); None when no training shard is a dev shard."""
    if not cfg.eval.dev_shards:
        return None
    dev = {os.path.realpath(u) for u in resolve_shards(cfg.eval.dev_shards, "eval.dev_shards")}
    shared = frozenset(u for u in train_urls if os.path.realpath(u) in dev)
    return HeldOut(cfg.eval.dev_split, shared) if shared else None


def check_model_files(cfg: RunConfig, tokenizer) -> None:
    """For a model.path checkpoint: what the build will take from its files, read from them alone (a problem the
    build would meet is raised here, before any rank starts)."""
    if cfg.model.path and not cfg.model.init_from:
        from trainer.model.build import checkpoint_summary

        summary = checkpoint_summary(cfg.model, tokenizer)
        log.info("model.path %s: %s", cfg.model.path, ", ".join(f"{k} {v}" for k, v in summary.items()))


def check_sequence_budget(cfg: RunConfig, tokenizer) -> int:
    """data.max_length against the image tokens (from the configs alone, no weights), the prompt and
    the shortest answer (judgment + end of text); returns the tokens left for the interpretation.
    ``data.max_length=0`` is set here to the prompt + ``data.answer_tokens`` (one config fits every family).
    Raises a ConfigError naming the numbers and the value to set."""
    from trainer.model.build import image_tokens_of
    from trainer.sample.prompt import PromptBuilder

    if cfg.data.task == "caption":  # its prompt comes from the captioner's processor, written at build time
        return cfg.data.max_length
    image_tokens, image_span = image_tokens_of(cfg.model, tokenizer)
    prompt = len(PromptBuilder(tokenizer, image_tokens, 1 << 20, cfg.data.answer_style,
                               image_span=image_span).prompt_ids)
    shortest = prompt + 2  # + judgment + end of text
    if cfg.data.max_length == 0:
        cfg.data.max_length = prompt + max(cfg.data.answer_tokens, 2)
        log.info("data.max_length=%d: %d image tokens + %d prompt tokens + data.answer_tokens=%d", cfg.data.max_length,
                 image_tokens, prompt - image_tokens, cfg.data.answer_tokens)
    if cfg.data.max_length < shortest:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} is too short: {image_tokens} image tokens + "
            f"{prompt - image_tokens} prompt tokens + the shortest answer need {shortest}; set data.max_length to at "
            f"least {shortest}, better {shortest + 64} so the explanations fit")
    return cfg.data.max_length - shortest
