"""The measurements of the training-throughput benchmark inside one rank (``python -m trainer.bench`` runs this
as ``deepspeed --num_gpus N --module trainer.bench --worker``): the real training step and its phases, the bare
model's step on the same batches, the loader's headroom, ZeRO-3 bytes per rank, FLOPs and MFU."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Dense bf16 peaks (FLOP/s) of accelerators the MFU target is stated for.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def _matmul_peak(dev: torch.device) -> float:
    """FLOP/s of a large matmul on this device (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = 4096 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if dev.type == "cuda" else 5
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def bare_step_seconds(cfg, tokenizer, dtype: torch.dtype, fused: bool, dev: torch.device, kept: list,
                      warmup: int, alpha) -> tuple[float, int]:
    """(seconds per step, parameters) of the bare model on the trainer's timed batches ``kept`` (after ``warmup``
    of them untimed): the same model, initial weights and dtype in plain torch, no DeepSpeed, loader or logging. In bf16
    it follows DeepSpeed's bf16 recipe by hand (fp32 master weights, fp32 gradients and AdamW moments, the bf16
    weights copied back after the update), so the ratio measures the trainer, not a cheaper optimizer."""
    from trainer.model.build import build_model
    from trainer.training.loop import model_inputs

    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg.model, tokenizer, dtype=dtype)  # the engine's initial weights
    model.use_kernels(fused, cfg.model.kernel_backend)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    master = params if dtype == torch.float32 else [p.detach().float() for p in params]
    optimizer = torch.optim.AdamW(master, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    gas = cfg.train.grad_accum

    def steps(micros: list) -> float:
        t0 = time.perf_counter()
        for micro in micros:
            for mb in micro:
                out = model(**model_inputs(mb, dev), alpha=alpha)
                (out.loss.total / gas).backward()
            if master is not params:
                for p, m in zip(params, master):
                    m.grad, p.grad = (None if p.grad is None else p.grad.float()), None
            torch.nn.utils.clip_grad_norm_(master, cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if master is not params:
                with torch.no_grad():
                    for p, m in zip(params, master):
                        p.copy_(m)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    steps(kept[:warmup])
    return steps(kept) / len(kept), sum(p.numel() for p in model.parameters())


def bare_inputs(result: str) -> Path:
    """Where the worker leaves rank 0's timed batches for the bare step."""
    return Path(result).with_suffix(".bare.pt")


def bare(args: argparse.Namespace) -> None:
    """The bare step in a process of its own, after the worker's (``python -m trainer.bench --bare``, with the
    worker's config, overrides and OMP_NUM_THREADS): it never shares the machine's memory with the engine, so a
    real width fits. Adds ``bare_step_s``, ``efficiency_ratio``, ``params`` and ``dtype`` to the worker's result."""
    from trainer.config import load_config
    from trainer.dist import device
    from trainer.run_dir import RunDir
    from trainer.sample.tokenizer import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    saved = torch.load(bare_inputs(args.result), weights_only=False)
    tokenizer = load_tokenizer(RunDir(cfg.train.output_dir).model_config)  # the one the engine trained with
    dtype = getattr(torch, saved["dtype"])
    seconds, params = bare_step_seconds(cfg, tokenizer, dtype, saved["fused"], device(), saved["batches"],
                                        args.warmup, saved["alpha"])
    result = json.loads(Path(args.result).read_text())
    result.update(bare_step_s=seconds, efficiency_ratio=result["step_s"] / seconds, params=params,
                  dtype=saved["dtype"])
    Path(args.result).write_text(json.dumps(result, indent=2))


def worker(args: argparse.Namespace) -> None:
    from trainer.config import load_config
    from trainer.data import StreamState, resolve_shards
    from trainer.dist import all_reduce_sum, device, gather_objects, init_distributed
    from trainer.model.flops import ifas_sample_flops, mfu
    from trainer.model.loss import loss_alpha
    from trainer.sample import IGNORE_INDEX
    from trainer.training.engine import build_engine
    from trainer.training.inputs import prepare_tokenizer
    from trainer.training.loop import train_step, training_batches
    from trainer.training.memory import engine_state_bytes
    from trainer.training.timing import PhaseTimer

    cfg = load_config(args.config, args.overrides)
    info = init_distributed()
    dev = device()
    torch.manual_seed(cfg.train.seed)
    train_urls = resolve_shards([s.path for s in cfg.data.train_sources()])
    tokenizer = prepare_tokenizer(cfg, train_urls)
    model, tokenizer, engine, _ = build_engine(cfg, tokenizer, info, dev)
    _, _, batches = training_batches(cfg, train_urls, model, tokenizer, info, StreamState())
    gas, mbs, world = cfg.train.grad_accum, cfg.train.micro_batch_size, info.world_size
    alpha = loss_alpha(cfg.loss.mode, cfg.loss.alpha)  # as training passes it (None: the plain LM loss)

    def run(steps: int, timer: PhaseTimer | None) -> tuple[float, float, list]:
        kept, wait = [], 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            micro = [next(batches) for _ in range(gas)]
            wait += time.perf_counter() - t
            train_step(engine, micro, dev, alpha, world, timer=timer)
            kept.append(micro)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, wait, kept

    engine.train()
    run(args.warmup, None)
    step_time, wait, kept = run(args.steps, None)  # the step exactly as training runs it
    timer = PhaseTimer(dev)
    phased_time, _, _ = run(args.steps, timer)  # again, with synchronising phase timers
    step_s = step_time / args.steps

    # Loader headroom: a fresh stream, read as fast as it goes, on every rank at once.
    _, _, fresh = training_batches(cfg, train_urls, model, tokenizer, info, StreamState())
    next(fresh)  # workers started
    t0 = time.perf_counter()
    n_batches = max(8, args.steps)
    for _ in range(n_batches):
        next(fresh)
    delivered = n_batches * mbs / (time.perf_counter() - t0)

    flat = [mb for micro in kept for mb in micro]
    seq = sum(mb["attention_mask"].sum().item() for mb in flat) / (len(flat) * mbs)
    supervised = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum().item() for mb in flat) / (len(flat) * mbs)
    flops_per_sample = ifas_sample_flops(model, round(seq), round(supervised)).train
    peak = _matmul_peak(dev)

    if info.is_main:  # the bare step runs after this process, on rank 0's batches (``bare`` below)
        torch.save({"batches": kept, "alpha": alpha, "fused": engine.module.head_loss is not None,
                    "dtype": "bfloat16" if engine.bfloat16_enabled() else "float32"}, bare_inputs(args.result))

    rank_result = {
        "step_s": step_s, "data_wait_frac": wait / step_time,
        "phases_s": {k: v / args.steps for k, v in timer.seconds.items()},
        "phased_step_s": phased_time / args.steps, "loader_samples_per_s": delivered,
        "consumed_samples_per_s": gas * mbs / step_s, "zero3_bytes": engine_state_bytes(engine),
        "flops_per_sample": flops_per_sample, "matmul_peak_flops": peak, "seq_len": seq,
    }
    results = gather_objects(rank_result, info)
    tokens = all_reduce_sum(torch.tensor([float(sum(mb["attention_mask"].sum() for mb in flat))])).item()
    if info.is_main:
        slowest = max(r["step_s"] for r in results)
        summary = {
            "world_size": world, "micro_batch_size": mbs, "grad_accum": gas, "steps": args.steps,
            "device": str(dev), "threads_per_rank": torch.get_num_threads(), "step_s": slowest,
            "samples_per_s": world * gas * mbs / slowest,
            "tokens_per_s": tokens / (slowest * args.steps),
            "per_rank": results,
        }
        summary["data_headroom"] = min(r["loader_samples_per_s"] / r["consumed_samples_per_s"] for r in results)
        summary["data_wait_frac"] = max(r["data_wait_frac"] for r in results)
        achieved = summary["samples_per_s"] * results[0]["flops_per_sample"] / world
        summary["achieved_flops_per_rank"] = achieved
        summary["mfu_vs_matmul_peak"] = mfu(achieved, results[0]["matmul_peak_flops"])
        if dev.type == "cuda":
            name = torch.cuda.get_device_name(dev)
            peak_bf16 = next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
            summary["gpu"] = name
            summary["mfu"] = mfu(achieved, peak_bf16) if peak_bf16 else None
        Path(args.result).write_text(json.dumps(summary, indent=2))
