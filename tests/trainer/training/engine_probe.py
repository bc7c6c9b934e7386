"""Builds a run's engine at the launched world size exactly as ``ifas-train`` does (Checkpointer.prepare before the
process group, build_engine, Checkpointer.load), then records what the tests compare, on rank 0:

- ``groups``: every optimizer parameter group's hyperparameters; ``sub_steps`` (and ``sub_steps_after`` the update
  below): AdamW's step per ZeRO-3 sub-group;
- ``states``: every trainable parameter's AdamW exp_avg and exp_avg_sq, gathered to full tensors;
- ``weights_after``: the full fp32 weights after one more update on a fixed global batch of 4 samples (rank r
  takes its slice of it, so every world size computes the same update up to reduction order);
- ``memory``: after that update, the engine's own state bytes per rank and dtypes, and what
  trainer.training.memory predicts.

    deepspeed --num_gpus N tests/trainer/training/engine_probe.py RESULT.pt [launch/train.sh's arguments]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[0] = str(ROOT)  # launched as a script: this checkout's trainer and tests, not this script's folder

GLOBAL_BATCH = 4


def fixed_batch(cfg, model, tokenizer, urls: list[str]) -> dict:
    """The first GLOBAL_BATCH samples of the training shards, in order, with their answers."""
    from trainer.data import ImageTransform, SampleMaker, ShardStream, StreamLayout, make_loader
    from trainer.sample.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, model.num_image_tokens, cfg.data.max_length, image_span=model.arch.image_span)
    transform = ImageTransform.for_model(model.arch)
    stream = ShardStream(urls, SampleMaker(builder, transform), StreamLayout(), batch_size=GLOBAL_BATCH, train=False)
    return next(iter(make_loader(stream, tokenizer.pad_token_id)))


def sub_steps(zero) -> list[float]:
    """AdamW's step of every ZeRO-3 sub-group (a flat fp32 partition the optimizer steps on its own)."""
    return [float(zero.optimizer.state[flat]["step"]) for flat in zero.fp32_partitioned_groups_flat
            if "step" in zero.optimizer.state.get(flat, {})]


def main(argv: list[str]) -> None:
    import deepspeed

    from trainer.config import load_config
    from trainer.data import batch_rows
    from trainer.dist import device, init_distributed, shutdown_distributed, world_info_from_env
    from trainer.model.loss import loss_alpha
    from trainer.run_dir import RunDir
    from trainer.training.checkpoint import Checkpointer
    from trainer.training.engine import build_engine, deepspeed_config
    from trainer.training.inputs import check_inputs, prepare_tokenizer
    from trainer.training.loop import train_step
    from trainer.training.memory import StateDtypes, engine_state_bytes, model_state_bytes

    args = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher puts it first
    result_path = args[0]
    config = args[args.index("--config") + 1] if "--config" in args else None
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    cfg = load_config(config, overrides)
    train_urls, _ = check_inputs(cfg)
    tokenizer = prepare_tokenizer(cfg, train_urls)
    env = world_info_from_env()
    checkpointer = Checkpointer(RunDir(cfg.train.output_dir).checkpoints, cfg.train.keep_last, env.is_main)
    layout = {"world_size": env.world_size, "num_workers": cfg.data.num_workers}
    checkpointer.prepare(layout, env)
    info = init_distributed(cfg.train.collective_timeout_s)
    dev = device()
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, engine, optimizer = build_engine(cfg, tokenizer, info, dev,
                                                       load_universal=checkpointer.needs_universal(layout))
    client = checkpointer.load(engine, layout)
    zero = engine.optimizer
    n_params = sum(p.ds_numel for p in model.parameters() if p.requires_grad)
    result = {
        "step": client["step"] if client else 0,
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "sub_steps": sub_steps(zero),
        "states": {},
    }
    for name, p in model.named_parameters():  # collective: every rank, the same order
        if p.requires_grad and client is not None:  # (a fresh engine has no optimizer states before its first step)
            result["states"][name] = {key: deepspeed.utils.safe_get_full_optimizer_state(p, key)
                                      for key in ("exp_avg", "exp_avg_sq")}
    batch = fixed_batch(cfg, model, tokenizer, train_urls)
    per_rank = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    micro = batch_rows(batch, rows)
    engine.train()
    train_step(engine, [micro], dev, loss_alpha(cfg.loss.mode, cfg.loss.alpha), info.world_size)
    result["sub_steps_after"] = sub_steps(zero)
    result["weights_after"] = {name: deepspeed.utils.safe_get_full_fp32_param(p) for name, p in
                               model.named_parameters() if p.requires_grad}
    result["memory"] = {"engine": engine_state_bytes(engine), "dtypes": StateDtypes.of_engine(engine),
                        "config_dtypes": StateDtypes.of_deepspeed_config(deepspeed_config(cfg, dev.type == "cuda")),
                        "grad_buffer_dtype": str(zero.grad_partitions_flat_buffer.dtype),
                        "predicted": model_state_bytes(n_params, info.world_size, StateDtypes.of_engine(engine)),
                        "trainable_parameters": n_params}
    if info.is_main:
        torch.save(result, result_path)
    shutdown_distributed()


if __name__ == "__main__":
    from trainer.dist import finish_process

    main(sys.argv[1:])
    sys.exit(finish_process(0))  # past gloo's teardown abort at interpreter exit (trainer/dist.py)
