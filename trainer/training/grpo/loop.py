"""The GRPO run (``train.stage=grpo``; ``ifas-train`` dispatches here): the SFT loop's data stream,
checkpoints, stop signals and periodic evaluation (trainer/training/loop.py), with a rollout + policy update
per step. The reference is the starting model (model.init_from), built partitioned as the policy is and
frozen. A checkpoint holds the policy's ZeRO-3 states, the data streams' positions and the step, and the
rollouts' randomness is seeded by the step (rollout.py): a resumed run continues exactly.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from shards.keywords import load_keywords
from trainer.config import ConfigError, RunConfig
from trainer.data import StreamState
from trainer.dist import all_reduce_sum, device, gather_objects, init_distributed, world_info_from_env
from trainer.eval.periodic import PeriodicEvaluator
from trainer.logs import MetricsWriter, log_system_scalars, setup_logging
from trainer.model.build import build_model
from trainer.process import keep_host_heap_small
from trainer.run_dir import RunDir
from trainer.training.checkpoint import Checkpointer
from trainer.training.engine import build_engine, deepspeed_config
from trainer.training.grpo.rewards import PARTS
from trainer.training.grpo.rollout import Rollout, rollout_seed, sample_rollout
from trainer.training.grpo.step import grpo_step
from trainer.training.loop import save_then_evaluate, training_batches
from trainer.training.stop import StopRequest

log = logging.getLogger("ifas.train")


def build_reference(cfg: RunConfig, tokenizer, dev: torch.device):
    """The frozen reference policy: model.init_from built again, partitioned under ZeRO-3 like the policy (no
    optimizer states), in an inference engine."""
    import deepspeed

    ds = deepspeed_config(cfg, dev.type == "cuda")
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    zero = ds.setdefault("zero_optimization", {})
    zero3 = zero.get("stage") == 3
    if not zero3:  # ZeRO-1/2 shard optimizer states only, which a frozen model has none of
        zero["stage"] = 0
    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
    model, _ = build_model(cfg.model, tokenizer, dtype=dtype, zero3_config=ds if zero3 else None)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


class RolloutWindow:
    """Sums over the steps since the last log line, in one float64 device tensor (one all-reduce to log)."""

    FIELDS = ("loss", "policy", "kl", "clipped", "answers", "reward", *(f"reward_{p}" for p in PARTS),
              "adv_abs", "adv_sq", "flat_groups", "answer_tokens")

    def __init__(self, dev: torch.device) -> None:
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=dev)
        self.steps, self.seconds = 0, 0.0

    def add(self, step_sums: torch.Tensor, rollouts: list[Rollout], group_size: int) -> None:
        adv = torch.cat([r.advantages for r in rollouts]).double()
        rewards = torch.cat([r.rewards for r in rollouts])
        parts = torch.cat([r.parts for r in rollouts]).sum(dim=0)
        flat = (rewards.view(-1, group_size).std(dim=1, correction=0) == 0).sum()
        host = torch.cat([torch.tensor([float(len(adv)), float(rewards.sum())]), parts,
                          torch.stack([adv.abs().sum(), (adv ** 2).sum(), flat.double(),
                                       torch.cat([r.lengths for r in rollouts]).sum().double()])])
        self.sums[:4] += step_sums
        self.sums[4:] += host.to(self.sums.device)
        self.steps += 1

    def record(self, step: int) -> dict[str, float]:
        """Means over the window, every rank's answers counted (collective)."""
        t = dict(zip(self.FIELDS, all_reduce_sum(self.sums.clone()).cpu().tolist()))
        n, steps = max(t["answers"], 1.0), max(self.steps, 1)
        rec = {"step": step, "loss": t["loss"] / steps, "policy_loss": t["policy"] / steps, "kl": t["kl"] / steps,
               "clip_frac": t["clipped"] / max(t["answer_tokens"], 1.0), "reward": t["reward"] / n,
               **{f"reward_{p}": t[f"reward_{p}"] / n for p in PARTS},
               "rollout_judgment_acc": t["reward_judgment"] / n, "adv_abs_mean": t["adv_abs"] / n,
               "adv_std": (t["adv_sq"] / n) ** 0.5, "answer_length": t["answer_tokens"] / n,
               "steps_per_s": self.steps / max(self.seconds, 1e-9)}
        self.sums.zero_()
        self.steps, self.seconds = 0, 0.0
        return rec


def train_grpo(cfg: RunConfig, train_urls: list[str], eval_urls: list[str], tokenizer) -> dict[str, Any]:
    from tqdm import tqdm

    keep_host_heap_small()
    run = RunDir(cfg.train.output_dir)
    info = world_info_from_env()
    checkpointer = Checkpointer(run.checkpoints, cfg.train.keep_last, info.is_main)
    layout = {"world_size": info.world_size, "num_workers": cfg.data.num_workers}
    saved_layout = checkpointer.saved_layout() if cfg.train.resume else None
    if saved_layout is not None and saved_layout != layout:
        raise ConfigError(f"{run.checkpoints} was written by {saved_layout['world_size']} rank(s) x "
                          f"{max(saved_layout['num_workers'], 1)} loader worker(s); a GRPO run resumes on the same "
                          "layout: launch it so, or start a new train.output_dir")
    info = init_distributed(cfg.train.collective_timeout_s)
    setup_logging(info.rank, force=True)
    dev = device()
    torch.manual_seed(cfg.train.seed)
    stop_request = StopRequest()
    model, tokenizer, engine, optimizer = build_engine(cfg, tokenizer, info, dev)
    reference = build_reference(cfg, tokenizer, dev) if cfg.grpo.kl_coef > 0 else None
    if info.is_main:
        run.preempted.unlink(missing_ok=True)

    start_step, stream_state = 0, StreamState()
    client = checkpointer.load(engine, layout) if cfg.train.resume else None
    if client is not None:
        start_step = client["step"]
        stream_state = StreamState.from_state_dict(client["data"]["streams"][info.rank])
        log.info("resumed from step %d", start_step)
    builder, transform, batches = training_batches(cfg, train_urls, model, tokenizer, info, stream_state)

    def save(step: int) -> None:
        streams = gather_objects(stream_state.state_dict(), info)
        checkpointer.save(engine, step, {"step": step, "config": cfg.to_dict(), "data": {
            "world_size": info.world_size, "num_workers": cfg.data.num_workers, "streams": streams}}, layout)

    writer = MetricsWriter(run.tensorboard if info.is_main else None)
    evaluator = (PeriodicEvaluator(cfg, {"held-out": eval_urls}, builder, transform, info, tokenizer.pad_token_id,
                                   writer, run.root, tokenizer=tokenizer) if eval_urls else None)
    keywords = load_keywords()
    keys_log = None
    if cfg.train.log_sample_keys:  # each step's sample keys and sampled answers (what resume tests compare)
        run.sample_keys.mkdir(parents=True, exist_ok=True)
        keys_log = open(run.sample_keys / f"rank{info.rank}.jsonl", "a")
    history: list[dict[str, Any]] = []
    window = RolloutWindow(dev)
    last_step = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not info.is_main, desc="grpo", unit="step")
    engine.train()
    done = start_step
    for step in range(start_step, last_step):
        if stop_request.requested():
            log.warning("stop requested by a signal: saving a checkpoint at step %d and exiting", done)
            save(done)
            if info.is_main:
                run.preempted.write_text(f"{done}\n")
            batches.close()
            return {"history": history, "preempted": True}
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        rollouts = [sample_rollout(engine, reference, mb, builder.prompt_ids, tokenizer, keywords, cfg.grpo,
                                   rollout_seed(cfg.train.seed, step, info.rank, i), info.world_size > 1, dev)
                    for i, mb in enumerate(micro)]
        lr_used = [g["lr"] for g in optimizer.param_groups]
        sums = grpo_step(engine, rollouts, cfg.grpo, info.world_size)
        for mb in micro:
            stream_state.update(mb["stream_pos"])
        done = step + 1
        window.add(sums, rollouts, cfg.grpo.group_size)
        if keys_log is not None:
            keys_log.write(json.dumps({"step": done, "keys": [k for mb in micro for k in mb["keys"]],
                                       "answers": [t for r in rollouts for t in r.texts], "loss": float(sums[0])})
                           + "\n")
            keys_log.flush()
        window.seconds += time.perf_counter() - t0
        bar.update(1)
        if done % cfg.train.log_every == 0 or done == last_step:
            rec = {**window.record(done), "lr": lr_used[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0)}
            history.append(rec)
            log_system_scalars(writer, done, info, dev,
                               lrs={g.get("name", "group"): lr for g, lr in zip(optimizer.param_groups, lr_used)})
            writer.train_window(rec, done)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", cue=f"{rec['reward_cue']:.2f}", kl=f"{rec['kl']:.4f}")
        save_then_evaluate(cfg, done, last_step, save, evaluator, engine, checkpointer)
    bar.close()
    stop_request.close()
    batches.close()  # the loader workers end here, not at the process's end
    if keys_log is not None:
        keys_log.close()
    result: dict[str, Any] = {"history": history}
    if evaluator is not None and cfg.eval.at_end and done == cfg.train.max_steps:
        result["eval"] = evaluator.run(engine, done, final=True)["held-out"]
    writer.close()
    if info.is_main:
        run.train_result.write_text(json.dumps({
            "history": history, "eval": result["eval"].as_dict() if "eval" in result else None,
            "explanations": evaluator.explained.get("held-out", {}).get("metrics") if evaluator else None},
            indent=2, default=str))
    return result
