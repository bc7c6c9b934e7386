"""Training-throughput benchmark (``python -m trainer.bench`` / ``make bench``).

Measures, on the machine it runs on, in one run, for world sizes 1 and 2 (ZeRO-3, the demo
model and data):

- the step-time breakdown of the real training step (data wait, forward, backward, optimizer
  step incl. ZeRO communication, the per-step count all-reduce), samples/s and tokens/s;
- trainer efficiency: that step vs the bare model's forward + backward + AdamW step on the same
  batches in the same processes (no DeepSpeed, no loader, no logging) - target <= 1.10x;
- data headroom: samples/s the shard loader delivers (decode, resize, tokenize, collate) with
  the configured workers vs samples/s the step consumes - target >= 3x, data wait <= 2%;
- ZeRO-3 memory: parameter + gradient + optimizer-state bytes held per rank - target at world
  size 2 <= 0.55x world size 1;
- model FLOPs per step (trainer.model.flops) and MFU against the device's peak (on CPU: against a
  measured fp32 matmul peak, stated as such).

Writes JSON and replaces the ``## Trainer`` section of BENCHMARKS.md. Each world size runs as
``deepspeed --num_gpus N --module trainer.bench --worker``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kernels.benchmarks_md import update_section
from trainer.config import PROJECT_ROOT as ROOT
from trainer.dist import finish_process, free_port, shutdown_distributed
from trainer.logs import setup_logging
from trainer.training.memory import model_state_bytes

log = logging.getLogger("ifas.bench")
# Dense bf16 peaks (FLOP/s) of accelerators the MFU target is stated for.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


# ----- measurements inside one rank -----

def _zero3_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters (its partition + persistent ones), fp32 gradient and
    master partitions, and optimizer states."""
    opt = engine.optimizer
    params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters())
    master = sum(t.numel() * t.element_size() for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    states = sum(v.numel() * v.element_size() for s in opt.optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    grads = master  # ZeRO-3 keeps one fp32 gradient partition the size of the master partition
    return {"params": params, "grads": grads, "master": master, "optimizer_states": states,
            "total": params + grads + master + states}


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


def worker(args: argparse.Namespace) -> None:
    from trainer.config import load_config
    from trainer.data import resolve_shards
    from trainer.dist import all_reduce_sum, device, gather_objects, init_distributed
    from trainer.model.build import build_model
    from trainer.model.flops import ifas_sample_flops, mfu
    from trainer.model.loss import IGNORE_INDEX, loss_alpha
    from trainer.stream import StreamState
    from trainer.training.engine import build_engine
    from trainer.training.inputs import prepare_tokenizer
    from trainer.training.loop import model_inputs, train_step, training_batches
    from trainer.training.timing import PhaseTimer

    cfg = load_config(args.config, args.overrides)
    info = init_distributed()
    dev = device()
    torch.manual_seed(cfg.train.seed)
    train_urls = resolve_shards([s.path for s in cfg.data.train_sources()])
    tokenizer = prepare_tokenizer(cfg, train_urls)
    model, tokenizer, engine, _ = build_engine(cfg, tokenizer, info, dev)
    torch.manual_seed(cfg.train.seed)
    bare_model, _ = build_model(cfg.model, tokenizer)  # the same initial weights, never seen by DeepSpeed
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

    # Bare: the same model and batches, plain torch (no DeepSpeed, loader or logging).
    bare_model.use_fused_loss(engine.module.head_loss is not None)
    bare_model.to(dev).train()
    bare_opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=cfg.optim.lr)

    def bare_steps(micros: list) -> float:
        t0 = time.perf_counter()
        for micro in micros:
            for mb in micro:
                out = bare_model(**model_inputs(mb, dev), alpha=alpha)
                (out.loss.total / gas).backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.optim.grad_clip)
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    bare_steps(kept[: args.warmup])
    bare_s = bare_steps(kept) / args.steps

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

    rank_result = {
        "step_s": step_s, "bare_step_s": bare_s, "data_wait_frac": wait / step_time,
        "phases_s": {k: v / args.steps for k, v in timer.seconds.items()},
        "phased_step_s": phased_time / args.steps, "loader_samples_per_s": delivered,
        "consumed_samples_per_s": gas * mbs / step_s, "zero3_bytes": _zero3_bytes(engine),
        "flops_per_sample": flops_per_sample, "matmul_peak_flops": peak, "seq_len": seq,
    }
    results = gather_objects(rank_result, info)
    tokens = all_reduce_sum(torch.tensor([float(sum(mb["attention_mask"].sum() for mb in flat))])).item()
    if info.is_main:
        slowest = max(r["step_s"] for r in results)
        summary = {
            "world_size": world, "micro_batch_size": mbs, "grad_accum": gas, "steps": args.steps,
            "params": sum(p.numel() for p in bare_model.parameters()), "device": str(dev),
            "step_s": slowest, "bare_step_s": max(r["bare_step_s"] for r in results),
            "samples_per_s": world * gas * mbs / slowest,
            "tokens_per_s": tokens / (slowest * args.steps),
            "per_rank": results,
        }
        summary["efficiency_ratio"] = summary["step_s"] / summary["bare_step_s"]
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


# ----- the driver -----

def _ensure_data(data_dir: Path) -> Path:
    """Three synthetic domains for the benchmark, made by ``ifas-shards synth`` unless already there."""
    if not (data_dir / "domain_c" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "shards.cli", "synth", "--out", str(data_dir), "--samples-per-domain",
                        "400", "--domains", "domain_a", "domain_b", "domain_c", "--overwrite", "--workers", "2"],
                       cwd=ROOT, check=True)
    return data_dir


def scaling_table(per_rank_step_s: float, flops_per_sample: float, mfu: float = 0.45,
                  peak: float = 989e12, nvlink_gbs: float = 450.0, ib_gbs: float = 50.0) -> str:
    """Memory per GPU and step time on paper for 2B/8B full fine-tunes on 8/64 GPUs (ZeRO-3, bf16)."""
    rows = ["| params | GPUs | ZeRO-3 model states / GPU | activations (ckpt) / GPU | compute / step | "
            "ZeRO comm / step | suggested settings |", "|---|---|---|---|---|---|---|"]
    tokens_per_gpu = 8 * 2048  # 8 samples x 2048 tokens per GPU per step (448 px image + answer)
    for params in (2e9, 8e9):
        for gpus in (8, 64):
            states = model_state_bytes(int(params), gpus, "bf16")
            layers, hidden = (28, 2048) if params < 4e9 else (32, 4096)
            acts = 2 * tokens_per_gpu * hidden * layers * 2  # one bf16 hidden state per layer, checkpointed
            compute = 6 * params * tokens_per_gpu / (peak * mfu)
            bw = nvlink_gbs if gpus <= 8 else ib_gbs
            comm = 3 * 2 * params * (gpus - 1) / gpus / (bw * 1e9)  # 2 all-gathers + 1 reduce-scatter, bf16
            advice = ("defaults" if params < 4e9 and gpus <= 8 else
                      "overlap_comm true, stage3_prefetch_bucket_size 5e8, reduce_bucket_size 5e8"
                      + ("; hpZ (zero_hpz_partition_size 8) to keep all-gathers on NVLink" if gpus > 8 else ""))
            rows.append(f"| {params / 1e9:.0f}B | {gpus} | {states / 2**30:.1f} GiB | {acts / 2**30:.1f} GiB | "
                        f"{compute:.2f} s | {comm:.2f} s | {advice} |")
    return "\n".join(rows)


def _section(results: list[dict[str, Any]], command: str, config: str) -> str:
    by_ws = {r["world_size"]: r for r in results}
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import deepspeed
    import transformers

    lines = [
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"Machine: {cpu}, {os.cpu_count()} cores; device {results[0]['device']}"
             f"{' (' + results[0]['gpu'] + ')' if 'gpu' in results[0] else ''}. torch {torch.__version__}, "
             f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}. Model: I-FAS of "
             f"`{config}` ({results[0]['params'] / 1e6:.2f}M parameters), micro-batch "
             f"{results[0]['micro_batch_size']} per rank, ZeRO-3 (`launch/ds_zero3.json`)"
             f"{', one rank per core, OMP_NUM_THREADS=1' if results[0]['device'] == 'cpu' else ''}.", "",
             "| world size | step (s) | bare step (s) | trainer / bare | samples/s | tokens/s | data wait | "
             "loader / consumed | fwd / bwd / opt+comm (s) | model FLOP/s per rank | vs matmul peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ws, r in sorted(by_ws.items()):
        ph = r["per_rank"][0]["phases_s"]
        lines.append(
            f"| {ws} | {r['step_s']:.3f} | {r['bare_step_s']:.3f} | {r['efficiency_ratio']:.2f} | "
            f"{r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {100 * r['data_wait_frac']:.1f}% | "
            f"{r['data_headroom']:.1f}x | {ph.get('forward', 0):.3f} / {ph.get('backward', 0):.3f} / "
            f"{ph.get('optimizer_step', 0) + ph.get('comm_counts', 0):.3f} | "
            f"{r['achieved_flops_per_rank'] / 1e9:.1f} GFLOP/s | {100 * r['mfu_vs_matmul_peak']:.1f}% |")
    mem = {ws: r["per_rank"][0]["zero3_bytes"]["total"] for ws, r in by_ws.items()}
    lines += ["", "ZeRO-3 model-state bytes per rank (params + grads + fp32 master + optimizer states): " +
              ", ".join(f"world size {ws}: {b / 2**20:.2f} MiB" for ws, b in sorted(mem.items()))]
    targets = []
    for ws, r in sorted(by_ws.items()):
        targets.append(("trainer step <= 1.10x bare", ws, f"{r['efficiency_ratio']:.2f}x",
                        r["efficiency_ratio"] <= 1.10))
        targets.append(("loader >= 3x consumed", ws, f"{r['data_headroom']:.1f}x", r["data_headroom"] >= 3))
        targets.append(("data wait <= 2% of step", ws, f"{100 * r['data_wait_frac']:.1f}%",
                        r["data_wait_frac"] <= 0.02))
    if 1 in mem and 2 in mem:
        ratio = mem[2] / mem[1]
        targets.append(("ZeRO-3 bytes per rank at ws 2 <= 0.55x ws 1", 2, f"{ratio:.2f}x", ratio <= 0.55))
    gpu_mfu = [r.get("mfu") for r in results if r.get("mfu") is not None]
    lines += ["", "| target | world size | measured | pass |", "|---|---|---|---|"]
    lines += [f"| {t} | {ws} | {v} | {'pass' if ok else 'FAIL'} |" for t, ws, v, ok in targets]
    lines.append(f"| MFU >= 45% (~1B MLLM, 448 px, one H200) | 1 | "
                 f"{f'{100 * gpu_mfu[0]:.1f}%' if gpu_mfu else 'not measured (no GPU in this run)'} | "
                 f"{('pass' if gpu_mfu[0] >= 0.45 else 'FAIL') if gpu_mfu else '-'} |")
    if any(not ok for t, _, _, ok in targets if t.startswith("trainer step")):
        lines += ["", "Why the trainer/bare target fails here: with a model this small, ZeRO-3's per-submodule "
                  "fetch/release hooks (run on every module, every forward and backward, whatever its size) cost "
                  "about as much as the matmuls, and at world size 2 the two ranks also share two cores with the "
                  "gradient reduce-scatter. The hook cost does not grow with the model, so it fades on real model "
                  "sizes; DeepSpeed's leaf-module option (hooks per transformer layer) would cut it here but fails on "
                  "CPU in deepspeed 0.19.8 (its ZeRO-3 `zero_grad` calls `record_stream` on CPU gradients left by "
                  "leaf modules: RuntimeError 'unknown parameter type')."]
    first = by_ws[min(by_ws)]
    lines += ["", "### Scaling on paper", "",
              "Assumptions: bf16 weights with fp32 gradient partitions, master weights and AdamW moments "
              "(18 bytes/parameter, partitioned over all GPUs by ZeRO-3; trainer/training/memory.py); "
              "8 samples x 2048 tokens per GPU per step; "
              "activation checkpointing at layer boundaries (one bf16 hidden state per layer kept); "
              "compute at the 45% MFU target of an H200 (989 TFLOP/s dense bf16); ZeRO-3 moves 3x the bf16 "
              "parameters per step (all-gather in forward and backward, reduce-scatter of gradients) over "
              "NVLink (~450 GB/s) within a node and InfiniBand (~50 GB/s per GPU) across nodes; communication "
              "overlaps compute only with `overlap_comm` and prefetching on.", "",
              scaling_table(first["step_s"], first["per_rank"][0]["flops_per_sample"]), "",
              "Above 8 GPUs the all-gathers cross InfiniBand and approach the compute time at 8B: turn on "
              "prefetching and overlap, raise bucket sizes, and consider hpZ/ZeRO++ (secondary partition per node). "
              "Offload (`offload_optimizer`) is only worth it when the model states do not fit, e.g. 8B on one 8-GPU "
              "node with long sequences."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(ROOT / "launch" / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench" / "data"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "trainer_bench.json"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update")
    parser.add_argument("--no-markdown", action="store_true", help="do not update the markdown file")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--scale", action="store_true",
                        help="run the scale rehearsal instead (trainer/scale_rehearsal.py, section 'Scale "
                             "rehearsal'): its own checkpoint, config and data; --world-sizes and overrides apply")
    parser.add_argument("--label", default="current", help="--scale: the row label (e.g. before/after a change)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.scale:
        return scale_main(args, argv)
    if args.worker:
        try:
            worker(args)
        finally:
            shutdown_distributed()
        return finish_process(0)
    data = _ensure_data(Path(args.data))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ws in [int(w) for w in args.world_sizes.split(",")]:
            result = Path(tmp) / f"ws{ws}.json"
            domains = f"[{data}/domain_a,{data}/domain_b,{data}/domain_c]"
            overrides = [f"data.train_shards={domains}", f"eval.dev_shards={domains}",
                         f"train.output_dir={tmp}/run{ws}", *args.overrides]
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ws),
                   "--master_port", str(free_port()), "--module", "trainer.bench", "--worker",
                   "--result", str(result), "--config", args.config,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            log.info("world size %d: %s", ws, " ".join(cmd))
            proc = subprocess.run(cmd, cwd=ROOT, env=env)
            if proc.returncode != 0 or not result.is_file():
                log.error("the world-size-%d run failed (exit %d)", ws, proc.returncode)
                return 1
            results.append(json.loads(result.read_text()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    command = "python -m trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    section = _section(results, command.strip(), os.path.relpath(args.config, ROOT))
    print(section)
    if not args.no_markdown:  # GPU figures get their own section: a GPU run never replaces the CPU one
        on_gpu = results[0]["device"] != "cpu"
        update_section(Path(args.markdown), "trainer-gpu" if on_gpu else "trainer",
                       "Trainer on GPU" if on_gpu else "Trainer", section)
    return 0


def scale_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--scale``: rehearse on a real-width checkpoint; keeps other labels' figures in the JSON file."""
    from trainer import scale_rehearsal

    work = ROOT / "runs" / "scale"
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[args.label] = scale_rehearsal.run(work, [int(w) for w in args.world_sizes.split(",")], args.overrides)
    store.write_text(json.dumps(results, indent=2))
    command = "python -m trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = scale_rehearsal.section(results, command.strip())
    print(text)
    if not args.no_markdown:
        update_section(Path(args.markdown), "scale-rehearsal", "Scale rehearsal", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
