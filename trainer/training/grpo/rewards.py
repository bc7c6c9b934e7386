"""Verifiable rewards of a sampled answer (judgment token + explanation), from the sample's label and
attack type alone: no judge model. The cue and contradiction terms are the explanation metrics' own
(trainer/eval/explain.py ``judge_explanation`` over the SCF keyword dictionary shards/data/keywords.json),
so what the stage optimises is what the evaluation reports.

Parts (each 0/1, weighted by the grpo: section; the total is their weighted sum):
- judgment: the first answer token is the true judgment ("Yes" for a live face, "No" for a spoof);
- cue: the explanation names a cue of the sample's own attack type (live cues for a live face);
- no_contradiction: the explanation does not contradict the answer's own judgment;
- format: the answer starts with a judgment token, ends (end of text) within the length cap, and its
  explanation has grpo.min_words..grpo.max_words words;
- wrong_cue: a spoof whose explanation names only another attack type's cues (a penalty weight <= 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from trainer.config import GRPOConfig
from trainer.eval.explain import judge_explanation

PARTS = ("judgment", "cue", "no_contradiction", "format", "wrong_cue")


@dataclass(frozen=True)
class Answer:
    """One sampled answer, decoded."""

    first_token: int  # the judgment position's token
    text: str  # the explanation after the judgment token, cleaned (trainer.eval.explain.clean_explanation)
    finished: bool  # it ended with end of text within grpo.max_new_tokens


def reward_parts(answer: Answer, live: bool, attack: str, yes_id: int, no_id: int,
                 keywords: Mapping[str, tuple[tuple[str, ...], ...]], min_words: int, max_words: int
                 ) -> dict[str, float]:
    """The 0/1 value of each part for one answer to a sample (``live``, true ``attack``; "none" for live)."""
    starts_with_judgment = answer.first_token in (yes_id, no_id)
    judgment = "Yes" if answer.first_token == yes_id else "No"
    judged = judge_explanation(answer.text, judgment, attack, keywords)
    return {
        "judgment": float(answer.first_token == (yes_id if live else no_id)),
        "cue": float(judged.own_cue),
        "no_contradiction": float(starts_with_judgment and not judged.contradiction),
        "format": float(starts_with_judgment and answer.finished and min_words <= judged.words <= max_words),
        "wrong_cue": float(judged.wrong_cue),
    }


def weights_of(cfg: GRPOConfig) -> torch.Tensor:
    """The parts' weights, in PARTS order."""
    return torch.tensor([cfg.reward_judgment, cfg.reward_cue, cfg.reward_no_contradiction, cfg.reward_format,
                         cfg.reward_wrong_cue], dtype=torch.float64)


def split_rewards(parts: torch.Tensor, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(the judgment part's weighted reward [N], the other parts' [N]): what the judgment token and the
    explanation tokens are credited with under grpo.split_advantages."""
    weighted = parts * weights_of(cfg)
    judgment = PARTS.index("judgment")
    return weighted[:, judgment], weighted.sum(dim=1) - weighted[:, judgment]


def score_answers(answers: list[Answer], live: list[bool], attacks: list[str], yes_id: int, no_id: int,
                  keywords: Mapping[str, tuple[tuple[str, ...], ...]], cfg: GRPOConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts [N, len(PARTS)] 0/1, total reward [N]) of answers to samples with labels ``live`` and ``attacks``
    (one per answer)."""
    parts = torch.tensor([[reward_parts(a, lv, at, yes_id, no_id, keywords, cfg.min_words, cfg.max_words)[p]
                           for p in PARTS] for a, lv, at in zip(answers, live, attacks)], dtype=torch.float64)
    return parts, parts @ weights_of(cfg)
