"""The DeepSpeed ZeRO-3 training loop (console script ``ifas-train``; ``launch/train.sh``).

    deepspeed --num_gpus 2 launch/train.sh --config launch/configs/demo.yaml train.max_steps=100

One step = ``train.grad_accum`` micro-batches per rank. Before the step, the judgment and
interpretation token counts of the whole global batch are summed over ranks, so the lopsided
loss is normalised globally and its gradient does not depend on the split of the batch.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shards.scf import captioner_prompt
from trainer.config import ConfigError, RunConfig, load_config
from trainer.checkpoint import Checkpointer, LayoutMismatch, tag_for
from trainer.evaluate import PeriodicEvaluator
from trainer.monitor import log_system_scalars
from trainer.data import SKIP_REASONS, ImageTransform, ShardSetError, ShardStream, StreamState, make_loader, resolve_shards
from trainer.dist import (WorldInfo, all_reduce_sum, collective_timeout, device, finish_process, gather_objects,
                          init_distributed, shutdown_distributed)
from trainer.llava_format import is_llava_compatible, llava_processor, processor_chat_template
from trainer.loss import INTERPRETATION, JUDGMENT, loss_alpha
from trainer.model import IFASModel, ModelLoadError, build_model
from trainer.prompt import PromptBuilder
from trainer.timing import PhaseTimer, phase
from trainer.tokenizer import TokenizerError, build_demo_tokenizer, load_tokenizer

log = logging.getLogger("ifas.train")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = "checkpoints"
PREEMPTED = "preempted"  # marker a signal-stopped run leaves for launch/slurm.sbatch (requeue)
INJECT_NAN_ENV = "IFAS_INJECT_NAN_AT_STEPS"  # fault injection for tests: "3,4" poisons those steps' loss
MODEL_CONFIG_DIR = "model_config"  # ifas_config.json + tokenizer: what export needs beside the weights
PROCESSOR_DIR = "processor"  # under MODEL_CONFIG_DIR, for LLaVA-form models: the LlavaProcessor export writes
USER_ERRORS = (ConfigError, ShardSetError, TokenizerError, ModelLoadError, FileNotFoundError, LayoutMismatch)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)


# ----- inputs, checked before any rank starts work -----

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
    saved = Path(cfg.train.output_dir) / MODEL_CONFIG_DIR
    if cfg.model.tokenizer_path or cfg.model.llava_path or cfg.model.llm_path:
        return load_tokenizer(cfg.model.tokenizer_path or cfg.model.llava_path or cfg.model.llm_path)
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)  # resuming: the exact tokenizer the weights were trained with
    return build_demo_tokenizer(read_captions(train_urls))


def check_inputs(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Resolve shard sets and check the DeepSpeed config; raises a user error naming the problem.
    (The tokenizer is checked by prepare_tokenizer, also before any rank starts work.)"""
    train_urls = resolve_shards(cfg.data.train_shards, "data.train_shards")
    eval_urls = resolve_shards(cfg.data.eval_shards, "data.eval_shards") if cfg.data.eval_shards else []
    if cfg.eval.dev_shards:
        resolve_shards(cfg.eval.dev_shards, "eval.dev_shards")
    ds_path = deepspeed_config_path(cfg)
    if not ds_path.is_file():
        raise ConfigError(f"train.deepspeed_config {ds_path} does not exist; use launch/ds_zero3.json or a copy of it")
    try:
        json.loads(ds_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"train.deepspeed_config {ds_path} is not valid JSON: {exc}") from exc
    return train_urls, eval_urls


# ----- DeepSpeed pieces -----

def deepspeed_config_path(cfg: RunConfig) -> Path:
    """train.deepspeed_config, relative to the working directory, else to the project (so the
    default launch/ds_zero3.json is found from anywhere)."""
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        return PROJECT_ROOT / path
    return path


def deepspeed_config(cfg: RunConfig, on_cuda: bool) -> dict[str, Any]:
    """The JSON config with everything the run config owns filled in (one source of truth)."""
    ds = json.loads(deepspeed_config_path(cfg).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.optim.grad_clip
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt["params"].update(lr=cfg.optim.lr, betas=list(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    if not on_cuda:
        opt["params"]["torch_adam"] = True  # FusedAdam would JIT-compile C++ on CPU (DESIGN.md 4)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if on_cuda else "fp32")
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.pop("fp16", None)
    return ds


def param_groups(model: IFASModel, cfg: RunConfig) -> list[dict[str, Any]]:
    """Per-module groups with their lr multiplier; frozen modules get requires_grad=False.
    Biases and norm weights (1-D) take no weight decay."""
    groups = []
    for name, module in model.module_groups().items():
        frozen = name in cfg.optim.freeze
        decay, no_decay = [], []
        for p in module.parameters():
            p.requires_grad_(not frozen)
            if not frozen:
                (no_decay if p.ndim < 2 else decay).append(p)
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


def model_inputs(batch: dict[str, Any], dev: torch.device) -> dict[str, torch.Tensor]:
    names = ("input_ids", "attention_mask", "pixel_values", "score_positions", "labels", "label_groups")
    return {n: batch[n].to(dev, non_blocking=True) for n in names}


def unweighted_parts(totals: torch.Tensor, alpha: float | None) -> tuple[float, float]:
    """Judgment and interpretation parts of the summed loss as plain mean token CEs, so runs with
    another alpha (or the plain loss) compare. totals: [loss, part_j, part_i, _, _, n_j, n_i]."""
    part_j, part_i, n_j, n_i = (float(totals[i]) for i in (1, 2, 5, 6))
    if alpha is None:  # plain: each part is sum(CE) / (n_j + n_i) per step
        return (part_j * (n_j + n_i) / n_j if n_j else 0.0), (part_i * (n_j + n_i) / n_i if n_i else 0.0)
    return (part_j / alpha if alpha > 0 else 0.0), (part_i / (1 - alpha) if alpha < 1 else 0.0)


def train_step(engine, micro_batches: list[dict[str, Any]], dev: torch.device, alpha: float | None, world: int,
               poison: bool = False, timer: PhaseTimer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns [loss, judgment, interpretation]
    summed over them (this rank's share of the global-batch loss, detached, on the device) and this
    rank's [judgment, interpretation] token counts (on the host).
    ``poison`` makes the loss NaN (fault injection for tests, see INJECT_NAN_ENV); ``timer``
    (benchmark only) records the phases."""
    groups = [mb["label_groups"] for mb in micro_batches]
    counts = torch.stack([sum((g == JUDGMENT).sum() for g in groups), sum((g == INTERPRETATION).sum() for g in groups)])
    with phase(timer, "comm_counts"):  # one small collective per step, kept on the device (no host sync)
        n_judgment, n_interp = all_reduce_sum(counts.to(dev, torch.float64, non_blocking=True))
    scale = world * len(micro_batches)
    parts = torch.zeros(3, dtype=torch.float64, device=dev)
    for mb in micro_batches:
        with phase(timer, "forward"):
            out = engine(**model_inputs(mb, dev), alpha=alpha, n_judgment=n_judgment, n_interpretation=n_interp)
        if poison:
            out = out._replace(loss=type(out.loss)(*(p * float("nan") for p in out.loss)))
        # DeepSpeed averages gradients over ranks and micro-steps; the loss is already a global
        # mean, so scale back up to make the update exactly its gradient.
        with phase(timer, "backward"):
            engine.backward(out.loss.total * scale)
        with phase(timer, "optimizer_step"):
            engine.step()
        parts += torch.stack(list(out.loss)).detach().double()
    return parts, counts


# ----- checkpoints, stopping -----

class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's --signal, a scheduler's preemption) ask the run to stop after the
    current step. Ranks agree over a gloo group on the host, so checking costs no device sync."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        import torch.distributed as dist

        self.received: int | None = None
        self.group = dist.new_group(backend="gloo", timeout=collective_timeout())
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def any_rank(self) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0


class TrainingHalted(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps in a row) after saving."""


def skipped_counts(state: StreamState, info: WorldInfo) -> dict[str, int]:
    """Bad samples skipped so far, summed over ranks, per reason."""
    local = state.skipped_total()
    totals = all_reduce_sum(torch.tensor([float(local.get(r, 0)) for r in SKIP_REASONS], dtype=torch.float64))
    return {r: int(v) for r, v in zip(SKIP_REASONS, totals.tolist())}


# ----- building the run -----

def build_engine(cfg: RunConfig, tokenizer, info: WorldInfo, dev: torch.device):
    """Model + DeepSpeed engine for a run; rank 0 writes what export needs (architecture, tokenizer)
    to output_dir, and every rank then uses exactly that tokenizer. Returns (model, tokenizer,
    engine, optimizer)."""
    import deepspeed
    import torch.distributed as dist

    out_dir = Path(cfg.train.output_dir)
    model_dir = out_dir / MODEL_CONFIG_DIR
    model, tokenizer = build_model(cfg.model, tokenizer)
    model.use_fused_loss(cfg.model.fused_kernels is True or (cfg.model.fused_kernels == "auto" and dev.type == "cuda"))
    if info.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "ifas_config.json").write_text(json.dumps(model.config_dict(), indent=2))
        tokenizer.save_pretrained(str(model_dir))
        if is_llava_compatible(model.config_dict()["arch"]):  # exportable as LLaVA (ifas-export --format llava)
            chat_template = processor_chat_template(cfg.model.llava_path)  # the base captioner's, if any
            llava_processor(model.config_dict(), tokenizer, chat_template).save_pretrained(str(model_dir / PROCESSOR_DIR))
        (out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dist.barrier()
    tokenizer = load_tokenizer(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d image tokens per sample", n_params / 1e6, model.num_image_tokens)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg), config=deepspeed_config(cfg, dev.type == "cuda"),
        lr_scheduler=lambda opt: make_scheduler(opt, cfg))
    return model, tokenizer, engine, optimizer


def training_batches(cfg: RunConfig, train_urls: list[str], model: IFASModel, tokenizer, info: WorldInfo,
                     state: StreamState):
    """(prompt builder, image transform, iterator of this rank's training batches from ``state``)."""
    arch = model.arch
    caption_prompt = None
    if cfg.data.task == "caption":  # the prompt the exported captioner will be given (shards/scf.py)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(Path(cfg.train.output_dir) / MODEL_CONFIG_DIR / PROCESSOR_DIR))
        caption_prompt = captioner_prompt(processor, cfg.data.caption_prompt)
    builder = PromptBuilder(tokenizer, model.num_image_tokens, cfg.data.max_length, cfg.data.answer_style, caption_prompt)
    transform = ImageTransform(arch.image_size, arch.image_mean, arch.image_std)
    stream = ShardStream(train_urls, builder, transform, rank=info.rank, world_size=info.world_size,
                         batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, resume=state, num_workers=cfg.data.num_workers,
                         caption_source=cfg.data.caption_source)
    return builder, transform, iter(make_loader(stream, tokenizer.pad_token_id))


# ----- the loop -----

def train(cfg: RunConfig, train_urls: list[str], eval_urls: list[str], tokenizer) -> dict[str, Any]:
    from tqdm import tqdm

    info = init_distributed(cfg.train.collective_timeout_s)
    setup_logging(info.rank)
    dev = device()
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    out_dir = Path(cfg.train.output_dir)
    stop_request = StopRequest()

    model, tokenizer, engine, optimizer = build_engine(cfg, tokenizer, info, dev)
    if info.is_main:
        (out_dir / PREEMPTED).unlink(missing_ok=True)

    checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, cfg.train.keep_last, info.is_main)
    start_step, stream_state = 0, StreamState()
    layout = {"world_size": info.world_size, "num_workers": cfg.data.num_workers}
    client = checkpointer.load(engine, layout) if cfg.train.resume else None
    if client is not None:
        saved = client["data"]
        start_step = client["step"]
        stream_state = StreamState.from_state_dict(saved["streams"][info.rank])
        log.info("resumed from step %d", start_step)

    builder, transform, batches = training_batches(cfg, train_urls, model, tokenizer, info, stream_state)

    def save(step: int) -> None:
        client_state = {"step": step, "config": cfg.to_dict(),
                        "data": {"world_size": info.world_size, "num_workers": cfg.data.num_workers,
                                 "streams": gather_objects(stream_state.state_dict(), info)}}
        checkpointer.save(engine, step, client_state, layout)

    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    evaluator = (PeriodicEvaluator(cfg, {"held-out": eval_urls}, builder, transform, info, tokenizer.pad_token_id,
                                   writer, out_dir) if eval_urls else None)
    keys_log = None
    if cfg.train.log_sample_keys:
        (out_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
        keys_log = open(out_dir / "sample_keys" / f"rank{info.rank}.jsonl", "a")
    nan_steps = {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()}
    alpha = loss_alpha(cfg.loss.mode, cfg.loss.alpha)  # None: the plain LM loss of the ablation
    gas, world = cfg.train.grad_accum, info.world_size
    history: list[dict[str, Any]] = []
    # loss, judgment part, interpretation part, samples, tokens, judgment tokens, interpretation tokens
    window = torch.zeros(7, dtype=torch.float64, device=dev)
    window_time, window_wait, window_steps = 0.0, 0.0, 0
    skipped_steps, skipped_in_a_row = 0, 0
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not info.is_main, desc="train", unit="step")
    engine.train()
    last_step = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    done = start_step
    for step in range(start_step, last_step):
        if stop_request.any_rank():
            log.warning("stop requested by a signal: saving a checkpoint at step %d and exiting", done)
            save(done)
            if info.is_main:
                (out_dir / PREEMPTED).write_text(f"{done}\n")
            return {"history": history, "preempted": True}
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(gas)]
        t_data = time.perf_counter()
        lr_used = [g["lr"] for g in optimizer.param_groups]  # the rates this step trains with
        step_parts, step_tokens = train_step(engine, micro, dev, alpha, world, poison=(step + 1) in nan_steps)
        for mb in micro:
            stream_state.update(mb)
        done = step + 1
        # DeepSpeed skips an update whose gradient norm is not finite (the norm is all-reduced, so
        # every rank agrees); the flag is already on the host.
        if engine.optimizer.overflow:
            skipped_steps += 1
            skipped_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", done, skipped_in_a_row)
            if skipped_in_a_row >= cfg.train.max_bad_steps:
                save(done)
                raise TrainingHalted(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (up to step {done}); "
                    f"saved a checkpoint. Lower optim.lr, check the data, or raise train.max_bad_steps")
        else:
            skipped_in_a_row = 0
            window[:3] += step_parts
            window[3] += gas * cfg.train.micro_batch_size
            window[4] += sum(int(mb["attention_mask"].sum()) for mb in micro)  # CPU tensors: no device sync
            n_judgment, n_interp = step_tokens.tolist()  # host tensor: no device sync
            window[5] += n_judgment
            window[6] += n_interp
            window_steps += 1
        if keys_log is not None:
            keys_log.write(json.dumps({"step": done, "keys": [k for mb in micro for k in mb["keys"]]}) + "\n")
            keys_log.flush()
        window_time += time.perf_counter() - t0
        window_wait += t_data - t0
        bar.update(1)
        if done % cfg.train.log_every == 0 or done == last_step:
            totals = all_reduce_sum(window.clone()).cpu()
            n = max(window_steps, 1)
            ce_judgment, ce_interp = unweighted_parts(totals, alpha)
            rec = {"step": done, "loss": totals[0].item() / n, "loss_judgment": ce_judgment / n,
                   "loss_interpretation": ce_interp / n,
                   "lr": lr_used[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "samples_per_s": totals[3].item() / window_time,
                   "tokens_per_s": totals[4].item() / window_time, "data_wait_frac": window_wait / window_time,
                   "skipped_steps": skipped_steps, "skipped_samples": skipped_counts(stream_state, info)}
            history.append(rec)
            lrs = {g.get("name", "group"): lr for g, lr in zip(optimizer.param_groups, lr_used)}
            log_system_scalars(writer, done, info, dev, lrs=lrs)  # memory per rank (collective), lr per group
            if writer is not None:
                for k, v in rec.items():
                    if k == "skipped_samples":
                        for reason, count in v.items():
                            writer.add_scalar(f"data/skipped_{reason}", count, done)
                    elif k != "step":
                        writer.add_scalar(f"train/{k}", v, done)
                writer.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", judg=f"{rec['loss_judgment']:.3f}")
            window.zero_()
            window_time = window_wait = 0.0
            window_steps = 0
        saved = done % cfg.train.save_every == 0 or done == last_step
        if saved:
            save(done)
        # Periodic held-out evaluation (collective: every rank runs it); its best step's checkpoint
        # is saved and kept out of keep_last pruning.
        if evaluator is not None and done != cfg.train.max_steps and evaluator.maybe_run(engine, done) is not None:
            if evaluator.last_was_best:
                checkpointer.protected = {tag_for(done)}
                if not saved:
                    save(done)
    bar.close()
    if keys_log is not None:
        keys_log.close()

    result: dict[str, Any] = {"history": history}
    if evaluator is not None and cfg.eval.at_end and done == cfg.train.max_steps:
        result["eval"] = evaluator.run(engine, done, final=True)["held-out"]
    if writer is not None:
        writer.close()
    if info.is_main:
        (out_dir / "train_result.json").write_text(json.dumps(
            {"history": history, "eval": result["eval"].as_dict() if "eval" in result else None}, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    return finish_process(_main(argv))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-train", description="Train I-FAS with DeepSpeed ZeRO-3.")
    parser.add_argument("--config", help="run config YAML (see launch/configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="validate config and inputs, then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        cfg = load_config(args.config, args.overrides)
        train_urls, eval_urls = check_inputs(cfg)
        tokenizer = prepare_tokenizer(cfg, train_urls)
        if args.check:
            log.info("config and inputs are valid")
            return 0
        try:
            train(cfg, train_urls, eval_urls, tokenizer)
        finally:
            shutdown_distributed()
    except USER_ERRORS as exc:
        print(f"ifas-train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingHalted as exc:
        print(f"ifas-train: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
