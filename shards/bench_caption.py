"""Benchmark of data-parallel SCF captioning (``ifas-shards caption``) and its cost model for CelebA-Spoof.

    python -m shards.bench_caption [--images 1024] [--ranks 1 2] [--max-new-tokens 32] [--workdir /tmp/bench_caption]

1. Saves a tiny LLaVA captioner with real transformers classes (``save_tiny_captioner``; the tests use it too) and
   a synthetic shard set of ``--images`` samples.
2. Runs ``torchrun --nproc_per_node W -m shards.cli caption ...`` (OMP_NUM_THREADS=1 per rank) for each W in
   ``--ranks``; images/s = images / the slowest rank's captioning seconds (from the ranks' done files), plus the
   whole command's wall time; checks every merged set is byte-identical to the first one.
3. Cost model, in this process (one thread): seconds per image of batched generation at two forced output lengths
   give the per-image cost (prefill: vision tower, projector, prompt) and the cost per generated token. Both are
   scaled by FLOPs (counted from the model, as trainer/model/flops.py counts them) to the llava-1.5-7b release
   config (its real processor counts the prompt tokens) and to CelebA-Spoof's ~625k images on 8 GPUs.

This is a tool on top of both packages (it builds the tokenizer and counts FLOPs with trainer's code); nothing in
``shards`` imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("shards.bench_caption")

LLAVA_7B = Path("/work/shared/hub/llava-hf__llava-1.5-7b-hf")  # the release's config, processor and tokenizer
CELEBA_SPOOF_IMAGES = 625_000
GPUS = 8
# Datasheet figures of one H100 SXM (dense bf16 FLOP/s, HBM bytes/s) and the MFU the project plans with
# (BENCHMARKS.md, "Scaling on paper").
GPU_PEAK, GPU_HBM, PLANNED_MFU = 989e12, 3.35e12, 0.45


def save_tiny_captioner(directory: Path, hidden: int = 32, layers: int = 2, image_size: int = 32) -> Path:
    """A LLaVA captioner (CLIP tower + Qwen2 LLM, random weights, seed 0) and its processor, saved with
    save_pretrained: what ``ifas-shards caption --captioner`` loads."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    from trainer.sample.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer(["a printed photo on paper", "a face on a screen", "a real person"], vocab_size=300)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=8)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"))
    )
    model.save_pretrained(directory)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    ).save_pretrained(directory)
    return Path(directory)


def same_shard_sets(a: Path, b: Path) -> bool:
    """Byte-identical tar files, and manifests equal but for ``created_by`` (command line and time)."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("created_by")
    tars = sorted(p.name for p in a.glob("*.tar"))
    return ma == mb and tars == sorted(p.name for p in b.glob("*.tar")) and all(
        (a / t).read_bytes() == (b / t).read_bytes() for t in tars)


def run_ranks(world: int, src: Path, out: Path, captioner: Path, batch_size: int, max_new_tokens: int) -> dict:
    """``ifas-shards caption`` under torchrun with ``world`` CPU ranks; images, slowest rank's seconds, wall."""
    from shards.caption_parallel import RANKS_DIR

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "-m", "shards.cli", "caption", str(src), "--out", str(out), "--captioner", str(captioner),
           "--device", "cpu", "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    done = [json.loads(p.read_text()) for p in sorted((out / RANKS_DIR).glob(f"*-of-{world}.done"))]
    images, seconds = sum(d["captioned"] for d in done), max(d["seconds"] for d in done)
    return {"ranks": world, "images": images, "caption_s": seconds, "images_per_s": images / seconds, "wall_s": wall}


def captioner_flops(model, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(FLOPs of one image's prefill, FLOPs per generated token) of a LLaVA model (meta device is enough)."""
    from trainer.model.flops import linear_params, patch_embed_params, transformer_forward_flops

    vc, tc, m = model.config.vision_config, model.config.text_config, model.model
    patches = (vc.image_size // vc.patch_size) ** 2
    vision = transformer_forward_flops(linear_params(m.vision_tower), vc.num_hidden_layers, vc.hidden_size,
                                       patches + 1) + 2.0 * patch_embed_params(m.vision_tower) * patches
    projector = 2.0 * linear_params(m.multi_modal_projector) * patches
    llm, head = linear_params(m.language_model), linear_params(model.lm_head)
    prefill = vision + projector + transformer_forward_flops(llm, tc.num_hidden_layers, tc.hidden_size,
                                                             prompt_tokens) + 2.0 * head  # logits: last position
    context = prompt_tokens + new_tokens / 2  # mean length attended over while generating
    return prefill, 2.0 * (llm + head) + 4.0 * tc.num_hidden_layers * tc.hidden_size * context


def _prompt_tokens(processor, image_size: int) -> int:
    from PIL import Image

    from shards.scf import captioner_prompt
    from shards.schema import CAPTION_PROMPT

    image = Image.new("RGB", (image_size, image_size))
    return processor(images=[image], text=[captioner_prompt(processor, CAPTION_PROMPT)],
                     return_tensors="pt")["input_ids"].shape[1]


def cost_model(captioner: Path, batch_size: int, tokens: tuple[int, int], repeats: int = 3) -> dict:
    """Seconds per image = prefill + tokens x per-token, measured at the tiny size (one thread), and FLOPs."""
    import torch
    from PIL import Image

    from shards.scf import Captioner

    torch.set_num_threads(1)
    cap = Captioner(captioner, "cpu")
    size = cap.model.config.vision_config.image_size
    images = [Image.new("RGB", (size, size), (40 * i % 255, 90, 160)) for i in range(batch_size)]
    inputs = cap.processor(images=images, text=[cap.prompt] * batch_size, return_tensors="pt", padding=True)

    def seconds(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                cap.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=cap.tokenizer.pad_token_id)
            best = min(best, time.perf_counter() - t0)
        return best / batch_size

    seconds(2)  # warm-up
    short, long = seconds(tokens[0]), seconds(tokens[1])
    per_token = (long - short) / (tokens[1] - tokens[0])
    prefill = short - tokens[0] * per_token
    prompt = inputs["input_ids"].shape[1]
    f_prefill, f_token = captioner_flops(cap.model, prompt, tokens[1])
    return {"prefill_s": prefill, "per_token_s": per_token, "prompt_tokens": prompt,
            "prefill_flops": f_prefill, "token_flops": f_token}


def project(tiny: dict, new_tokens: int, batch_size: int, cpu_peak: float) -> dict:
    """Per-image seconds of the 7B release on one GPU, and CelebA-Spoof hours on ``GPUS`` GPUs, two ways."""
    import torch
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_pretrained(LLAVA_7B)
    with torch.device("meta"):
        big = LlavaForConditionalGeneration(config)
    prompt = _prompt_tokens(AutoProcessor.from_pretrained(LLAVA_7B), config.vision_config.image_size)
    f_prefill, f_token = captioner_flops(big, prompt, new_tokens)
    params = sum(p.numel() for p in big.parameters())
    # (a) the tiny captioner's measured seconds scaled by the FLOPs ratio and by GPU peak / this core's matmul
    # peak: the 7B keeps the tiny model's (low, overhead-bound) utilisation of its device.
    scale = cpu_peak / GPU_PEAK
    scaled = (tiny["prefill_s"] * f_prefill / tiny["prefill_flops"]
              + new_tokens * tiny["per_token_s"] * f_token / tiny["token_flops"]) * scale
    # (b) prefill at the planned MFU; each decode step reads the bf16 weights once for the whole batch
    roofline = f_prefill / (GPU_PEAK * PLANNED_MFU) + new_tokens * max(
        f_token / (GPU_PEAK * PLANNED_MFU), 2.0 * params / (GPU_HBM * batch_size))
    hours = {k: CELEBA_SPOOF_IMAGES * s / GPUS / 3600 for k, s in (("scaled", scaled), ("roofline", roofline))}
    return {"params": params, "prompt_tokens": prompt, "prefill_flops": f_prefill, "token_flops": f_token,
            "scaled_s_per_image": scaled, "roofline_s_per_image": roofline,
            "scaled_hours": hours["scaled"], "roofline_hours": hours["roofline"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.bench_caption", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128, help="tiny captioner width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--projected-tokens", type=int, default=64, help="caption length of the 7B projection")
    ap.add_argument("--workdir", default="/tmp/bench_caption")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import shutil

    from shards.synth.domains import generate_domain
    from trainer.bench.throughput import _matmul_peak

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    captioner = save_tiny_captioner(work / "captioner", hidden=args.hidden, layers=args.layers)
    src = generate_domain(work / "src", "domain_a", args.images, image_size=64, samples_per_shard=32)
    out = {w: work / f"ranks{w}" / "scf" for w in args.ranks}  # one name: the manifest records it
    runs = [run_ranks(w, src, out[w], captioner, args.batch_size, args.max_new_tokens) for w in args.ranks]
    for r in runs:
        r["speedup"] = r["images_per_s"] / runs[0]["images_per_s"]
        r["identical_to_first"] = same_shard_sets(out[args.ranks[0]], out[r["ranks"]])
    import torch

    torch.set_num_threads(1)
    cpu_peak = _matmul_peak(torch.device("cpu"))
    tiny = cost_model(captioner, args.batch_size, (4, 4 + args.max_new_tokens))
    result = {"runs": runs, "tiny": tiny, "cpu_peak_flops": cpu_peak,
              "projection": project(tiny, args.projected_tokens, args.batch_size, cpu_peak)}
    print(format_result(result, args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["identical_to_first"] for r in runs) else 1


def format_result(res: dict, args: argparse.Namespace) -> str:
    lines = ["| ranks | images | captioning s (slowest rank) | images/s | vs 1 rank | command wall s | merged set "
             "identical |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['ranks']} | {r['images']} | {r['caption_s']:.1f} | {r['images_per_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['wall_s']:.1f} | {r['identical_to_first']} |")
    t, p = res["tiny"], res["projection"]
    lines += [
        "",
        f"tiny captioner (hidden {args.hidden}, {args.layers} layers, one thread, batch {args.batch_size}): "
        f"prefill {t['prefill_s'] * 1e3:.2f} ms/image ({t['prompt_tokens']} prompt tokens, "
        f"{t['prefill_flops'] / 1e6:.2f} MFLOP), {t['per_token_s'] * 1e3:.3f} ms per generated token and image "
        f"({t['token_flops'] / 1e6:.3f} MFLOP); this core's fp32 matmul peak {res['cpu_peak_flops'] / 1e9:.1f} "
        "GFLOP/s",
        f"llava-1.5-7b ({p['params'] / 1e9:.2f} B parameters, {p['prompt_tokens']} prompt tokens, "
        f"{args.projected_tokens} generated): {p['prefill_flops'] / 1e12:.2f} TFLOP prefill, "
        f"{p['token_flops'] / 1e9:.2f} GFLOP per token",
        f"  (a) tiny measurement scaled by FLOPs and peak: {p['scaled_s_per_image']:.3f} s/image/GPU -> "
        f"CelebA-Spoof ({CELEBA_SPOOF_IMAGES} images) on {GPUS} GPUs {p['scaled_hours']:.1f} h",
        f"  (b) prefill at {PLANNED_MFU:.0%} MFU, decode bound by weight reads (batch {args.batch_size}): "
        f"{p['roofline_s_per_image']:.3f} s/image/GPU -> {p['roofline_hours']:.2f} h",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
