"""Benchmark of data-parallel SCF captioning (``ifas-shards caption``) and its cost model for CelebA-Spoof.

    python -m shards.bench.caption [--images 1024] [--ranks 1 2] [--repeats 3] [--workdir /tmp/bench_caption]

1. Saves a tiny LLaVA captioner with real transformers classes (``save_tiny_captioner``; the tests use it too) and
   a synthetic shard set of ``--images`` samples.
2. Runs ``torchrun --nproc_per_node W -m shards.cli caption ...`` (OMP_NUM_THREADS=1 per rank) for each W in
   ``--ranks``, ``--repeats`` times interleaved (the fastest counts); images/s = images / the slowest rank's
   captioning seconds (from the ranks' done files), plus CPU seconds and the whole command's wall time; checks every
   merged set is byte-identical to the first one.
3. Cost model, in this process, in CPU seconds (one thread): generate() at two forced output lengths and two batch
   sizes gives the cost per image (prefill: vision tower, projector, prompt), per generated token, and the fixed
   cost of a decode step. FLOPs are counted as trainer/model/flops.py counts them (2 per weight per token, plus
   attention) for the tiny captioner and for the llava-1.5-7b release config (whose real processor counts the
   prompt tokens); the projection for CelebA-Spoof's ~625k images on 8 GPUs is made three ways (``project``).

Nothing in ``shards`` imports this module; the tests take ``save_tiny_captioner`` and ``same_shard_sets`` from it.
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

log = logging.getLogger("shards.bench.caption")

# The llava-1.5-7b-hf release's config, processor and tokenizer (no weights needed): $IFAS_HUB as the release tests
# read it (tests/trainer/model/test_hub_releases.py), or --release.
HUB = Path(os.environ.get("IFAS_HUB", Path(__file__).resolve().parents[2] / "shared" / "hub"))
LLAVA_7B = HUB / "llava-hf__llava-1.5-7b-hf"
CELEBA_SPOOF_IMAGES = 625_000
GPUS = 8
# Datasheet figures of one H100 SXM (dense bf16 FLOP/s, HBM bytes/s) and the MFU the project plans with
# (BENCHMARKS.md, "Scaling on paper").
GPU_PEAK, GPU_HBM, PLANNED_MFU = 989e12, 3.35e12, 0.45


def tiny_tokenizer():
    """A word-level tokenizer over the template captions' words (so random captions name spoof cues now and then),
    with the special tokens a LLaVA processor needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from shards.captions import CAPTIONS
    from shards.schema import CAPTION_PROMPT

    specials = ["<|pad|>", "<|endoftext|>", "<image>", "<unk>"]
    texts = [t.format(extra="") for options in CAPTIONS.values() for t in options] + [CAPTION_PROMPT]
    words = sorted({w for t in texts for w in t.split()})
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def save_tiny_captioner(directory: Path, hidden: int = 32, layers: int = 2, image_size: int = 32,
                        tokenizer=None) -> Path:
    """A LLaVA captioner (CLIP tower + Qwen2 LLM, random weights, seed 0) and its processor (``tokenizer``, else
    ``tiny_tokenizer()``), saved with save_pretrained: what ``ifas-shards caption --captioner`` loads."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
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
    return {"ranks": world, "images": images, "caption_s": seconds, "images_per_s": images / seconds, "wall_s": wall,
            "cpu_s": sum(d["cpu_seconds"] for d in done), "rank_cpu_s": max(d["cpu_seconds"] for d in done),
            "load_after": os.getloadavg()[0]}


def cpu_matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of one thread on a large fp32 matmul, in CPU seconds (as the cost model is measured)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.process_time()
    for _ in range(reps):
        a @ b
    return 2.0 * n**3 * reps / (time.process_time() - t0)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attention(layers: int, width: int, tokens: float) -> float:
    return 4.0 * layers * width * tokens  # scores and values, per token attending over ``tokens``


def captioner_flops(model, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(FLOPs of one image's prefill, FLOPs per generated token) of a LLaVA model (meta device is enough): 2 per
    weight per token (embedding tables are lookups), plus attention; the LM head runs on the last position only."""
    vc, tc, m = model.config.vision_config, model.config.text_config, model.model
    patches = (vc.image_size // vc.patch_size) ** 2
    vision_weights = sum(p.numel() for n, p in m.vision_tower.named_parameters() if "position_embedding" not in n)
    vision = (2.0 * vision_weights + _attention(vc.num_hidden_layers, vc.hidden_size, patches + 1)) * (patches + 1)
    projector = 2.0 * _numel(m.multi_modal_projector) * patches
    llm = _numel(m.language_model) - m.language_model.get_input_embeddings().weight.numel()
    head = _numel(model.lm_head)
    prefill = (vision + projector + (2.0 * llm + _attention(tc.num_hidden_layers, tc.hidden_size, prompt_tokens))
               * prompt_tokens + 2.0 * head)
    context = prompt_tokens + new_tokens / 2  # mean length attended over while generating
    return prefill, 2.0 * (llm + head) + _attention(tc.num_hidden_layers, tc.hidden_size, context)


def _prompt_tokens(processor, image_size: int) -> int:
    from PIL import Image

    from shards.scf import captioner_prompt
    from shards.schema import CAPTION_PROMPT

    image = Image.new("RGB", (image_size, image_size))
    return processor(images=[image], text=[captioner_prompt(processor, CAPTION_PROMPT)],
                     return_tensors="pt")["input_ids"].shape[1]


def cost_model(captioner: Path, batch_size: int, tokens: tuple[int, int], repeats: int = 5) -> dict:
    """The tiny captioner's cost, measured in this process in CPU seconds (one thread; other work on a shared
    machine does not inflate it): generate() at two forced output lengths
    gives prefill and per-step seconds; at batch 1 and ``batch_size`` the per-step seconds split into a fixed part
    per decode step (dispatch: it does not shrink with the batch) and a part per image. FLOPs counted alongside."""
    import torch
    from PIL import Image

    from shards.scf import Captioner

    torch.set_num_threads(1)
    cap = Captioner(captioner, "cpu")
    size = cap.model.config.vision_config.image_size
    images = [Image.new("RGB", (size, size), (40 * i % 255, 90, 160)) for i in range(batch_size)]

    def seconds(batch: int, n: int) -> float:
        inputs = cap.processor(images=images[:batch], text=[cap.prompt] * batch, return_tensors="pt", padding=True)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            with torch.no_grad():
                cap.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=cap.tokenizer.pad_token_id)
            best = min(best, time.process_time() - t0)
        return best

    seconds(batch_size, 2)  # warm-up
    step, prefill = {}, {}
    for b in (1, batch_size):
        short, long = seconds(b, tokens[0]), seconds(b, tokens[1])
        step[b] = (long - short) / (tokens[1] - tokens[0])
        prefill[b] = short - tokens[0] * step[b]
    per_image = (step[batch_size] - step[1]) / (batch_size - 1)
    prompt = cap.processor(images=images[:1], text=[cap.prompt], return_tensors="pt")["input_ids"].shape[1]
    f_prefill, f_token = captioner_flops(cap.model, prompt, tokens[1])
    return {"prefill_s": prefill[batch_size] / batch_size, "per_token_s": step[batch_size] / batch_size,
            "step_fixed_s": step[1] - per_image, "step_per_image_s": per_image, "prompt_tokens": prompt,
            "layers": cap.model.config.text_config.num_hidden_layers, "prefill_flops": f_prefill,
            "token_flops": f_token}


def project(tiny: dict, new_tokens: int, batch_size: int, cpu_peak: float, release: Path = LLAVA_7B) -> dict:
    """Seconds per image of the llava-1.5-7b release on one GPU, three ways, and CelebA-Spoof hours on GPUS GPUs."""
    import torch
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_pretrained(release)
    with torch.device("meta"):
        big = LlavaForConditionalGeneration(config)
    prompt = _prompt_tokens(AutoProcessor.from_pretrained(release), config.vision_config.image_size)
    f_prefill, f_token = captioner_flops(big, prompt, new_tokens)
    params = sum(p.numel() for p in big.parameters())
    compute = GPU_PEAK * PLANNED_MFU
    weight_reads = 2.0 * params / GPU_HBM  # bf16 weights read once per decode step, for the whole batch
    # (a) the tiny model's measured seconds scaled by FLOPs, and by GPU peak / this core's matmul peak: the 7B
    # would keep the tiny model's utilisation of its device.
    scaled = (tiny["prefill_s"] * f_prefill / tiny["prefill_flops"]
              + new_tokens * tiny["per_token_s"] * f_token / tiny["token_flops"]) * cpu_peak / GPU_PEAK
    # (b) roofline: prefill at the planned MFU, a decode step bound by compute or by its weight reads
    roofline = f_prefill / compute + new_tokens * max(f_token / compute, weight_reads / batch_size)
    # (c) (b) plus the measured fixed cost of a decode step, which eager generate() pays per layer (one
    # launch per op) whatever the batch: scaled by the layer count, it bounds the step from below.
    dispatch = tiny["step_fixed_s"] * config.text_config.num_hidden_layers / tiny["layers"]
    step = max(dispatch, weight_reads) + batch_size * f_token / compute
    dispatch_bound = f_prefill / compute + new_tokens * step / batch_size
    ways = {"scaled": scaled, "roofline": roofline, "dispatch": dispatch_bound}
    return {"params": params, "prompt_tokens": prompt, "prefill_flops": f_prefill, "token_flops": f_token,
            "dispatch_step_s": dispatch, "weight_reads_s": weight_reads,
            "s_per_image": ways, "hours": {k: CELEBA_SPOOF_IMAGES * v / GPUS / 3600 for k, v in ways.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.bench.caption", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="runs per world size, interleaved; the fastest counts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128, help="tiny captioner width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--projected-tokens", type=int, default=64, help="caption length of the 7B projection")
    ap.add_argument("--workdir", default="/tmp/bench_caption")
    ap.add_argument("--release", type=Path, default=LLAVA_7B,
                    help="llava-1.5-7b-hf folder without weights: config.json, processor and tokenizer files")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.release / "config.json").is_file():
        ap.error(f"{args.release / 'config.json'} not found: pass --release DIR (llava-hf/llava-1.5-7b-hf's config, "
                 "processor and tokenizer files; no weights), or set IFAS_HUB to the folder holding it")
    import shutil

    from shards.synth.domains import generate_domain

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    captioner = save_tiny_captioner(work / "captioner", hidden=args.hidden, layers=args.layers)
    src = generate_domain(work / "src", "domain_a", args.images, image_size=64, samples_per_shard=32)
    # Interleaved repeats, the fastest of each world size kept: other jobs share this machine's cores.
    out = {(w, i): work / f"ranks{w}-{i}" / "scf" for i in range(args.repeats) for w in args.ranks}
    every = [run_ranks(w, src, out[w, i], captioner, args.batch_size, args.max_new_tokens)
             for i in range(args.repeats) for w in args.ranks]
    first = out[args.ranks[0], 0]  # every merged set (same name "scf": the manifest records it) must equal it
    identical = all(same_shard_sets(first, d) for d in out.values())
    runs = [max((r for r in every if r["ranks"] == w), key=lambda r: r["images_per_s"]) for w in args.ranks]
    for r in runs:
        r["speedup"] = r["images_per_s"] / runs[0]["images_per_s"]
        r["all_images_per_s"] = [x["images_per_s"] for x in every if x["ranks"] == r["ranks"]]
        # what the wall-clock speedup would be with a free core per rank
        r["cpu_speedup"] = runs[0]["rank_cpu_s"] / r["rank_cpu_s"]
    cpu_peak = cpu_matmul_peak()
    tiny = cost_model(captioner, args.batch_size, (4, 4 + args.max_new_tokens))
    result = {"runs": runs, "identical": identical, "tiny": tiny, "cpu_peak_flops": cpu_peak,
              "projection": project(tiny, args.projected_tokens, args.batch_size, cpu_peak, args.release)}
    print(format_result(result, args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


def format_result(res: dict, args: argparse.Namespace) -> str:
    lines = ["| ranks | images | captioning s (slowest rank) | images/s (best; all runs) | vs 1 rank | "
             "CPU s: slowest rank / all | vs 1 rank, in CPU s | command wall s | load avg after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        every = ", ".join(f"{x:.1f}" for x in r["all_images_per_s"])
        lines.append(f"| {r['ranks']} | {r['images']} | {r['caption_s']:.1f} | {r['images_per_s']:.1f} ({every}) | "
                     f"{r['speedup']:.2f}x | {r['rank_cpu_s']:.1f} / {r['cpu_s']:.1f} | {r['cpu_speedup']:.2f}x | "
                     f"{r['wall_s']:.1f} | {r['load_after']:.1f} |")
    lines.append(f"\nevery merged shard set byte-identical (manifests but for created_by): {res['identical']}")
    t, p = res["tiny"], res["projection"]
    lines += [
        "",
        f"tiny captioner (hidden {args.hidden}, {args.layers} layers, one thread, batch {args.batch_size}): "
        f"prefill {t['prefill_s'] * 1e3:.2f} ms/image ({t['prompt_tokens']} prompt tokens, "
        f"{t['prefill_flops'] / 1e6:.2f} MFLOP); {t['per_token_s'] * 1e3:.3f} ms per generated token and image "
        f"({t['token_flops'] / 1e6:.3f} MFLOP); a decode step costs {t['step_fixed_s'] * 1e3:.3f} ms + "
        f"{t['step_per_image_s'] * 1e3:.3f} ms per image; this core's fp32 matmul peak "
        f"{res['cpu_peak_flops'] / 1e9:.1f} GFLOP/s",
        f"llava-1.5-7b ({p['params'] / 1e9:.2f} B parameters, {p['prompt_tokens']} prompt tokens, "
        f"{args.projected_tokens} generated, batch {args.batch_size}): {p['prefill_flops'] / 1e12:.2f} TFLOP "
        f"prefill, {p['token_flops'] / 1e9:.2f} GFLOP per token; decode step >= {p['weight_reads_s'] * 1e3:.1f} ms "
        f"(weight reads), >= {p['dispatch_step_s'] * 1e3:.1f} ms (dispatch, scaled from the tiny model)",
        "",
        f"| way | s per image per GPU | CelebA-Spoof ({CELEBA_SPOOF_IMAGES} images) on {GPUS} GPUs |",
        "|---|---|---|",
    ]
    names = {"scaled": "(a) tiny measurement x FLOPs ratio x GPU/CPU peak",
             "roofline": f"(b) roofline: prefill at {PLANNED_MFU:.0%} MFU, decode weight-read bound",
             "dispatch": "(c) (b) + measured per-step dispatch cost x layers"}
    for k, name in names.items():
        lines.append(f"| {name} | {p['s_per_image'][k]:.3f} | {p['hours'][k]:.2f} h |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
