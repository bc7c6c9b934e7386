"""One GRPO update on a fixed global batch of rollouts, at the launched world size, exactly as ``ifas-train``
builds the policy engine (train.stage=grpo); rank r takes its slice of the images (with their G answers each),
and rank 0 saves the full fp32 weights after the update (so 1 and 2 ranks compare).

    deepspeed --num_gpus N tests/trainer/training/grpo_probe.py RESULT.pt [launch/train.sh's overrides]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[0] = str(ROOT)  # launched as a script: this checkout's trainer and tests, not this script's folder

GROUP = 2  # answers per image
ANSWER_TOKENS = 6


def fixed_rollout(model, tokenizer, prompt_ids: list[int], pixels: torch.Tensor, rank: int, world: int):
    """The rank's share of one fixed global batch: random answers (some ended early), rewards, a reference."""
    from trainer.sample import IGNORE_INDEX
    from trainer.training.grpo.objective import group_advantages
    from trainer.training.grpo.rollout import Rollout, answer_tensors

    n = pixels.shape[0] * GROUP
    g = torch.Generator().manual_seed(0)
    words = torch.randint(20, len(tokenizer), (n, ANSWER_TOKENS), generator=g)
    words[words == model.arch.image_token_id] = 21
    words[:, 0] = torch.where(torch.rand(n, generator=g) < 0.5, model.arch.yes_token_id, model.arch.no_token_id)
    words[::3, 2:] = tokenizer.eos_token_id
    inputs, lengths, _ = answer_tensors(torch.tensor(prompt_ids).expand(n, -1), words, tokenizer.eos_token_id,
                                        tokenizer.pad_token_id)
    inputs["pixel_values"] = pixels.repeat_interleave(GROUP, dim=0)
    rewards = torch.rand(n, generator=g, dtype=torch.float64) * 3
    ref = torch.where(inputs["labels"] != IGNORE_INDEX, -4.0 + torch.rand(inputs["labels"].shape, generator=g), 0.0)
    rows = slice(rank * n // world, (rank + 1) * n // world)
    return Rollout({k: v[rows] for k, v in inputs.items()}, ref[rows], None, group_advantages(rewards, GROUP)[rows],
                   rewards[rows], torch.zeros(n, 5)[rows], lengths[rows], [])


def main(argv: list[str]) -> None:
    import deepspeed

    from tests.trainer.training.engine_probe import fixed_batch
    from trainer.config import load_config
    from trainer.dist import all_reduce_sum, device, init_distributed, shutdown_distributed
    from trainer.sample.prompt import PromptBuilder
    from trainer.training.engine import build_engine
    from trainer.training.grpo.step import grpo_step
    from trainer.training.inputs import check_inputs, prepare_tokenizer

    args = [a for a in argv if not a.startswith("--local_rank")]
    result_path, overrides = args[0], [a for a in args[1:] if "=" in a]
    cfg = load_config(None, overrides)
    train_urls, _ = check_inputs(cfg)
    tokenizer = prepare_tokenizer(cfg, train_urls)
    info = init_distributed(cfg.train.collective_timeout_s)
    dev = device()
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, engine, _ = build_engine(cfg, tokenizer, info, dev)
    builder = PromptBuilder(tokenizer, model.num_image_tokens, cfg.data.max_length, image_span=model.arch.image_span)
    pixels = fixed_batch(cfg, model, tokenizer, train_urls)["pixel_values"]
    rollout = fixed_rollout(model, tokenizer, builder.prompt_ids, pixels, info.rank, info.world_size)
    engine.train()
    sums = grpo_step(engine, [rollout], cfg.grpo, info.world_size)
    loss = float(all_reduce_sum(sums.clone())[0])  # the global batch's loss
    weights = {name: deepspeed.utils.safe_get_full_fp32_param(p) for name, p in model.named_parameters()}
    if info.is_main:
        torch.save({"weights": weights, "loss": loss}, result_path)
    shutdown_distributed()


if __name__ == "__main__":
    from trainer.dist import finish_process

    main(sys.argv[1:])
    sys.exit(finish_process(0))  # past gloo's teardown abort at interpreter exit (trainer/dist.py)
