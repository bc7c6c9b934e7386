"""One GRPO step: ``grpo.updates_per_rollout`` optimizer steps over this rank's rollouts (one micro-batch of
rollouts per DeepSpeed micro-step, train.grad_accum of them per optimizer step)."""
from __future__ import annotations

import torch

from trainer.config import GRPOConfig
from trainer.dist import all_reduce_sum
from trainer.sample import INTERPRETATION, JUDGMENT
from trainer.training.grpo.objective import grpo_loss
from trainer.training.grpo.rollout import Rollout


def global_counts(rollouts: list[Rollout], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Judgment and explanation answer tokens of the global batch (all ranks, all micro-batches; collective)."""
    groups = [r.inputs["label_groups"] for r in rollouts]
    counts = torch.stack([sum((g == JUDGMENT).sum() for g in groups), sum((g == INTERPRETATION).sum() for g in groups)])
    n_judgment, n_interp = all_reduce_sum(counts.to(dev, torch.float64))
    return n_judgment, n_interp


def grpo_step(engine, rollouts: list[Rollout], cfg: GRPOConfig, world: int) -> torch.Tensor:
    """Update the policy on ``rollouts``; returns [loss, policy, kl, clipped tokens] summed over the micro-batches
    of the last update (this rank's share of the global-batch values, detached)."""
    dev = rollouts[0].inputs["input_ids"].device
    n_judgment, n_interp = global_counts(rollouts, dev)
    # DeepSpeed averages gradients over ranks and micro-steps; the loss is already a global-batch sum, so scale
    # back up to make the update exactly its gradient (as the SFT step does, trainer/training/loop.py)
    scale = world * len(rollouts)
    for _ in range(cfg.updates_per_rollout):
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        for r in rollouts:
            logp = engine(**r.inputs, logprob_temperature=cfg.temperature).token_logprobs
            old = r.old_logp if r.old_logp is not None else logp.detach()  # on-policy: the ratio is 1
            ref = r.ref_logp if r.ref_logp is not None else logp.detach()  # kl_coef 0: no reference
            loss = grpo_loss(logp, old, ref, r.token_advantages().to(dev), r.inputs["label_groups"], cfg.alpha,
                             n_judgment, n_interp, cfg.clip_eps, cfg.kl_coef)
            engine.backward(loss.total * scale)
            engine.step()
            sums += torch.stack([loss.total.detach(), loss.policy, loss.kl, loss.clipped]).double()
    return sums
