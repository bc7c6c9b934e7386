"""The GRPO objective on per-token log-probabilities (docs/architecture.md, "GRPO stage").

For answer i of a group of G answers to one image, with reward r_i:

    A_i = (r_i - mean_G(r)) / (std_G(r) + eps)                      group-normalised advantage (with
                                                                    grpo.split_advantages, the judgment token's
                                                                    from the judgment reward, the explanation's
                                                                    from the other parts)
    rho_t = exp(logp_t - logp_old_t)                                policy ratio (logp_old: the rollout's policy)
    pg_t = -min(rho_t * A_i, clip(rho_t, 1 - clip_eps, 1 + clip_eps) * A_i)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1               k3 estimator of KL(policy || reference)
    L = sum_t w_t * (pg_t + kl_coef * kl_t)

with the token weights of the lopsided LM loss (trainer/model/loss.py ``lopsided_token_weights``): alpha over
the judgment tokens and 1 - alpha over the explanation tokens, each a mean over its tokens of the GLOBAL batch
(all ranks, all micro-batches), or with alpha None one mean over every answer token. So, as for SFT, the
gradient does not depend on how the batch is split over ranks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.model.loss import lopsided_token_weights

ADVANTAGE_EPS = 1e-4  # a group whose answers all score alike has advantage 0, not 0/0


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards of N / group_size consecutive groups -> their group-normalised advantages (population std)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, correction=0, keepdim=True)
    return ((grouped - mean) / (std + ADVANTAGE_EPS)).reshape(-1)


class GRPOLoss(NamedTuple):
    total: torch.Tensor  # what backward takes: this micro-batch's share of the global-batch loss
    policy: torch.Tensor  # sum_t w_t * pg_t (detached)
    kl: torch.Tensor  # sum_t w_t * kl_t (detached, without kl_coef)
    clipped: torch.Tensor  # answer tokens whose ratio the clip bounded (detached count)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              groups: torch.Tensor, alpha: float | None, n_judgment: float | torch.Tensor,
              n_interpretation: float | torch.Tensor, clip_eps: float, kl_coef: float) -> GRPOLoss:
    """logp/old_logp/ref_logp [B, S]: each label's log-probability under the policy (with gradient), the rollout
    policy and the reference; advantages [B] (one per answer) or [B, S] (one per label); groups [B, S]:
    JUDGMENT / INTERPRETATION / UNSUPERVISED per label; n_judgment/n_interpretation: the global batch's token
    counts."""
    weights = lopsided_token_weights(groups, alpha, n_judgment, n_interpretation)
    active = weights > 0
    adv = advantages.to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    w = weights.to(logp.dtype)
    policy, kl_sum = (w * pg).sum(), (w * kl).sum()
    clipped = ((clipped_ratio * adv < ratio * adv) & active).sum()  # min() took the clipped term
    return GRPOLoss(policy + kl_coef * kl_sum, policy.detach(), kl_sum.detach(), clipped.detach())
