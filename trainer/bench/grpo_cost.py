"""Cost of a GRPO step (``python -m trainer.bench.grpo_cost``): measured on this machine, projected to 7B on 8 GPUs.

Measured, one process, on the model of an SFT run or export (the demo's by default): for one micro-batch of
images x G answers, the wall time of each phase of a step (rollout generation, the reference's log-probs, the
policy's forward + backward) and the token counts that drive the cost at any size: prompt tokens, answer tokens,
and decode steps per generate call (a call runs until its longest answer ends). The projection puts those
measured counts into a roofline of the 7B model (CLIP-L/336 + Qwen2-7B, counted by trainer/model/flops.py on
the meta device) on 8 GPUs: compute phases at the MFU target of BENCHMARKS.md "Scaling on paper", each decode
step bounded below by reading the gathered bf16 weights from HBM, the policy gathered once per generate call
over NVLink (trainer/model/generation.py), ZeRO-3's parameter traffic for the update and the reference.
The figures go to BENCHMARKS.md "GRPO stage" (``--write``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import PROJECT_ROOT, GRPOConfig

PEAK, MFU, HBM_GBS, NVLINK_GBS = 989e12, 0.45, 3350.0, 450.0  # H100 SXM bf16 dense; the project's MFU target


def measure(model_dir: str, shards: str, images: int, cfg: GRPOConfig, repeats: int) -> dict[str, Any]:
    """Phase times and token counts of ``repeats`` GRPO micro-batches on the CPU, median per phase."""
    from shards.keywords import load_keywords
    from trainer.data import ImageTransform, SampleMaker, ShardStream, StreamLayout, make_loader, resolve_shards
    from trainer.model.export import model_dir as resolve_model
    from trainer.model.ifas import IFASModel
    from trainer.sample.prompt import PromptBuilder
    from trainer.training.grpo.objective import grpo_loss
    from trainer.training.grpo.rollout import answer_tensors

    path = resolve_model(model_dir, None, Path("/tmp/ifas_grpo_cost"), _single())
    model, tok = IFASModel.from_pretrained(path)
    builder = PromptBuilder(tok, model.num_image_tokens, 512, image_span=model.arch.image_span)
    stream = ShardStream(resolve_shards([shards]), SampleMaker(builder, ImageTransform.for_model(model.arch)),
                         StreamLayout(), batch_size=images, train=False)
    load_keywords()
    rows: list[dict[str, float]] = []
    for i, batch in zip(range(repeats), make_loader(stream, tok.pad_token_id)):
        pixels = batch["pixel_values"].repeat_interleave(cfg.group_size, dim=0)
        prompt = torch.tensor(builder.prompt_ids).expand(pixels.shape[0], -1).contiguous()
        torch.manual_seed(i)
        t0 = time.perf_counter()
        new = model.generate(prompt, torch.ones_like(prompt), pixels, do_sample=True, temperature=cfg.temperature,
                             top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=1,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        t1 = time.perf_counter()
        inputs, lengths, _ = answer_tensors(prompt, new, tok.eos_token_id, tok.pad_token_id)
        inputs["pixel_values"] = pixels
        with torch.no_grad():
            ref = model(**inputs, logprob_temperature=cfg.temperature).token_logprobs
        t2 = time.perf_counter()
        logp = model(**inputs, logprob_temperature=cfg.temperature).token_logprobs
        groups = inputs["label_groups"]
        loss = grpo_loss(logp, logp.detach(), ref, torch.randn(len(lengths)), groups, None, 1.0,
                         float((groups > 0).sum()), cfg.clip_eps, cfg.kl_coef)
        loss.total.backward()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        rows.append({"generate_s": t1 - t0, "reference_s": t2 - t1, "update_s": t3 - t2,
                     "decode_steps": float(new.shape[1]), "answer_tokens": float(lengths.float().mean())})
    median = {k: float(torch.tensor([r[k] for r in rows]).median()) for k in rows[0]}
    return {**median, "prompt_tokens": len(builder.prompt_ids), "answers": images * cfg.group_size,
            "images": images, "group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
            "model": str(path), "repeats": len(rows)}


def _single():
    from trainer.dist import WorldInfo

    return WorldInfo(rank=0, local_rank=0, world_size=1)


def project_7b(measured: dict[str, Any], images_per_gpu: int, gpus: int = 8) -> dict[str, float]:
    """Seconds per GRPO step per phase at 7B on ``gpus`` GPUs, ``images_per_gpu`` x G answers each, with the
    measured answer length and decode steps (the prompt: the 7B model's own image tokens + the template)."""
    from trainer.bench.tables import checkpoint_configs
    from trainer.model.arch import ArchConfig
    from trainer.model.flops import ifas_sample_flops
    from trainer.model.ifas import IFASModel

    vision, text = checkpoint_configs()["CLIP-L/336 + Qwen2-7B-Instruct"]
    with torch.device("meta"):
        model = IFASModel(vision, text, ArchConfig(image_token_id=0, yes_token_id=1, no_token_id=2,
                                                   image_size=vision.image_size))
    params = sum(p.numel() for p in model.parameters())
    template = measured["prompt_tokens"] - _demo_image_tokens(measured)
    prompt = model.num_image_tokens + template
    answer, steps = measured["answer_tokens"], measured["decode_steps"]
    n = images_per_gpu * measured["group_size"]
    seq = ifas_sample_flops(model, int(prompt + answer), int(answer))
    prefill = ifas_sample_flops(model, int(prompt), 0)
    compute = PEAK * MFU
    weights_bytes = 2.0 * params  # bf16, gathered for generation
    decode_step = max(weights_bytes / (HBM_GBS * 1e9), 2.0 * params * n / compute)
    gather = weights_bytes * (gpus - 1) / gpus / (NVLINK_GBS * 1e9)
    return {
        "parameters": float(params), "prompt_tokens": float(prompt), "answers_per_gpu": float(n),
        "generate_s": n * prefill.forward / compute + steps * decode_step + gather,
        "reference_s": n * seq.forward / compute,
        "update_s": n * seq.train / compute,
        # ZeRO-3 traffic: the reference's forward gathers its parameters once, the update gathers twice and
        # reduce-scatters once (overlappable with compute when overlap_comm is on)
        "zero_comm_s": 4 * weights_bytes * (gpus - 1) / gpus / (NVLINK_GBS * 1e9),
    }


def _demo_image_tokens(measured: dict[str, Any]) -> int:
    from trainer.model.ifas import IFASModel

    config = json.loads((Path(measured["model"]) / "ifas_config.json").read_text())
    with torch.device("meta"):
        return IFASModel.from_config_dict(config).num_image_tokens


def section(measured: dict[str, Any], projected: dict[str, float], command: str) -> str:
    phases = ("generate_s", "reference_s", "update_s")
    cpu_total = sum(measured[p] for p in phases)
    gpu_total = sum(projected[p] for p in phases)
    rows = ["| phase | measured, demo model, 1 CPU process (s) | share | 7B on 8 GPUs, per step (s) | share |",
            "|---|---|---|---|---|"]
    names = {"generate_s": "rollout generation (prefill + decode, KV cache)", "reference_s": "reference log-probs",
             "update_s": "policy forward + backward"}
    for p in phases:
        rows.append(f"| {names[p]} | {measured[p]:.3f} | {measured[p] / cpu_total:.0%} | {projected[p]:.2f} | "
                    f"{projected[p] / gpu_total:.0%} |")
    rows.append(f"| total | {cpu_total:.3f} | | {gpu_total:.2f} (+ {projected['zero_comm_s']:.2f} ZeRO-3 traffic, "
                "overlappable) | |")
    return "\n".join([
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({_machine()}, torch "
        f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}): one micro-batch of "
        f"{measured['images']} images x G={measured['group_size']} answers (`max_new_tokens` "
        f"{measured['max_new_tokens']}), median of {measured['repeats']}. Measured token counts: prompt "
        f"{measured['prompt_tokens']} tokens, answers {measured['answer_tokens']:.1f} tokens on average, "
        f"{measured['decode_steps']:.0f} decode steps per generate call (the longest answer of the call).",
        "",
        "\n".join(rows),
        "",
        f"7B projection: I-FAS on CLIP-L/336 + Qwen2-7B ({projected['parameters'] / 1e9:.2f}B parameters, "
        f"{projected['prompt_tokens']:.0f} prompt tokens), {projected['answers_per_gpu']:.0f} answers per GPU per "
        f"step (the demo's micro-batch), the measured answer length and decode steps; compute at {MFU:.0%} MFU of "
        f"{PEAK / 1e12:.0f} TFLOP/s bf16, each decode step at least one read of the gathered bf16 weights at "
        f"{HBM_GBS / 1e3:.2f} TB/s, the policy all-gathered once per generate call and ZeRO-3's traffic at "
        f"{NVLINK_GBS:.0f} GB/s NVLink. On paper (no GPU measured here).",
    ])


def _machine() -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.bench.grpo_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo", help="an SFT run directory or export")
    parser.add_argument("--shards", default="data/demo/domain_a")
    parser.add_argument("--images", type=int, default=2, help="images per micro-batch (the demo's micro-batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md's GRPO cost section")
    args = parser.parse_args(argv)
    from trainer.config import load_config

    cfg = load_config(PROJECT_ROOT / "launch" / "configs" / "demo_grpo.yaml").grpo
    torch.manual_seed(0)
    measured = measure(args.model, args.shards, args.images, cfg, args.repeats)
    projected = project_7b(measured, args.images)
    body = section(measured, projected, "python -m trainer.bench.grpo_cost" + (" --write" if args.write else ""))
    print(body)
    if args.write:
        from kernels.benchmarks_md import update_section

        update_section(PROJECT_ROOT / "BENCHMARKS.md", "grpo-cost", "GRPO stage", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
