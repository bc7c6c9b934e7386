"""Rollouts: G sampled answers per image from the current policy, through the model's own generate path
(batched, with the KV cache), scored by the verifiable rewards (rewards.py), with the rollout policy's and the
reference's log-probabilities of every sampled token.

ZeRO-3 (DESIGN's hang trap): every rank makes the same number of generate calls (one per micro-batch, every
rank the same number of micro-batches), and each call runs in lockstep (``synced_gpus``: a rank whose answers
all ended keeps stepping the partitioned forward until every rank's have, up to grpo.max_new_tokens).
The sampling randomness of a call is seeded from (train.seed, step, rank, micro-batch), so it is part of what
a checkpoint's step number restores: a resumed run draws exactly the answers the unbroken run drew.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from trainer.config import GRPOConfig
from trainer.eval.explain import clean_explanation
from trainer.model.generation import model_for_generation
from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT, UNSUPERVISED
from trainer.training.grpo.objective import group_advantages
from trainer.training.grpo.rewards import Answer, score_answers, split_rewards


def rollout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The sampling seed of one generate call (distinct per step, rank and micro-batch)."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**63)


@dataclass
class Rollout:
    """One micro-batch of sampled answers (B images x G answers = N rows), ready for the policy update."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel_values, score_positions, labels, label_groups
    ref_logp: torch.Tensor | None  # [N, S] the reference's log-probs of the labels (None: kl_coef 0)
    old_logp: torch.Tensor | None  # [N, S] the rollout policy's (None: one update per rollout, it is the policy's)
    advantages: torch.Tensor  # [N] of the total reward, or with grpo.split_advantages the explanation's
    rewards: torch.Tensor  # [N] total
    parts: torch.Tensor  # [N, len(PARTS)] 0/1 per reward part
    lengths: torch.Tensor  # [N] answer tokens (judgment + explanation + end of text)
    texts: list[str]
    judgment_advantages: torch.Tensor | None = None  # [N] with grpo.split_advantages: the judgment token's

    def token_advantages(self) -> torch.Tensor:
        """[N, S] the advantage each label is credited with."""
        if self.judgment_advantages is None:
            return self.advantages[:, None].expand_as(self.inputs["labels"])
        groups = self.inputs["label_groups"]
        dev = groups.device
        return torch.where(groups == JUDGMENT, self.judgment_advantages.to(dev)[:, None],
                           self.advantages.to(dev)[:, None])


def answer_tensors(prompt: torch.Tensor, new: torch.Tensor, eos_id: int, pad_id: int
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """prompt [N, P] + generated [N, L] -> (input_ids, attention_mask, labels, label_groups, score_positions),
    the answer lengths [N] (up to and with the first end of text) and whether each answer ended."""
    is_eos = new == eos_id
    kept = (is_eos.cumsum(dim=1) - is_eos.long()) == 0  # up to and with the first end of text
    answer = torch.where(kept, new, torch.full_like(new, pad_id))
    n, p = prompt.shape
    groups = torch.full_like(new, INTERPRETATION)
    groups[:, 0] = JUDGMENT
    groups = torch.where(kept, groups, torch.full_like(new, UNSUPERVISED))
    tensors = {
        "input_ids": torch.cat([prompt, answer], dim=1),
        "attention_mask": torch.cat([torch.ones_like(prompt), kept.long()], dim=1),
        "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), torch.where(kept, new, IGNORE_INDEX)], dim=1),
        "label_groups": torch.cat([torch.full_like(prompt, UNSUPERVISED), groups], dim=1),
        "score_positions": torch.full((n,), p - 1, dtype=torch.long, device=prompt.device),
    }
    return tensors, kept.sum(dim=1), is_eos.any(dim=1)


@torch.no_grad()
def label_logprobs(engine, inputs: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    return engine(**inputs, logprob_temperature=temperature).token_logprobs.detach()


@torch.no_grad()
def sample_rollout(engine, ref_engine, batch: dict[str, Any], prompt_ids: list[int], tokenizer, keywords,
                   cfg: GRPOConfig, seed: int, synced: bool, dev: torch.device) -> Rollout:
    """G answers per image of ``batch`` (a training micro-batch: its images, labels and attack types)."""
    model = getattr(engine, "module", engine)  # a DeepSpeed engine, or a plain model (tests)
    g = cfg.group_size
    pixels = batch["pixel_values"].to(dev).repeat_interleave(g, dim=0)
    prompt = torch.tensor(prompt_ids, device=dev).expand(pixels.shape[0], -1).contiguous()
    torch.manual_seed(seed)
    engine.eval()
    try:
        with model_for_generation(engine, cfg.gather_for_generation) as policy:
            new = policy.generate(prompt, torch.ones_like(prompt), pixels, do_sample=True, temperature=cfg.temperature,
                                  top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=1,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  synced_gpus=synced)
        inputs, lengths, finished = answer_tensors(prompt, new, tokenizer.eos_token_id, tokenizer.pad_token_id)
        inputs["pixel_values"] = pixels
        ref_logp = label_logprobs(ref_engine, inputs, cfg.temperature) if ref_engine is not None else None
        old_logp = label_logprobs(engine, inputs, cfg.temperature) if cfg.updates_per_rollout > 1 else None
    finally:
        engine.train()
    new, lengths, finished = new.cpu(), lengths.cpu(), finished.cpu()
    texts = [clean_explanation(tokenizer.decode(row[1:n], skip_special_tokens=True)) for row, n in zip(new, lengths)]
    answers = [Answer(int(row[0]), text, bool(f)) for row, text, f in zip(new, texts, finished)]
    live = [bool(v) for v in batch["live"].tolist() for _ in range(g)]
    attacks = [str(m.get("attack", "none")) for m in batch["meta"] for _ in range(g)]
    parts, rewards = score_answers(answers, live, attacks, model.arch.yes_token_id, model.arch.no_token_id,
                                   keywords, cfg)
    if not cfg.split_advantages:
        return Rollout(inputs, ref_logp, old_logp, group_advantages(rewards, g), rewards, parts, lengths, texts)
    judgment, explanation = split_rewards(parts, cfg)
    return Rollout(inputs, ref_logp, old_logp, group_advantages(explanation, g), rewards, parts, lengths, texts,
                   group_advantages(judgment, g))
