"""Explanations and their interpretability metrics.

An explanation is generated *after* the decided judgment: the judgment token ("Yes"/"No", from
the score and the threshold in use) is appended to the prompt and the model continues with its
interpretation. So the text a user reads always belongs to the decision they see, and a
contradiction ("screen moire" after a "Yes") is the model's own incoherence, not a mismatch
between the threshold and greedy decoding.

Metrics use the SCF spoof-keyword dictionary (``shards/data/keywords.json``): how often the
explanation of a spoof names a cue of its true attack type, how often it names only another
type's cues, how often a live explanation names live cues, and how often the explanation
contradicts the judgment (spoof cues after "Yes"; live cues and no spoof cue after "No").
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from shards.keywords import find_cues
from shards.schema import QUESTION
from trainer.dist import WorldInfo, device, gather_objects
from trainer.eval.scoring import ScoredSet
from trainer.logs import MetricsWriter, Tags

LIVE = "live"


@dataclass
class Explained:
    """One explained sample."""

    key: str
    attack: str  # true attack type ("none" for live)
    score: float
    judgment: str  # "Yes" / "No": the decision the explanation follows
    mode: str  # greedy | sampled
    text: str


@dataclass(frozen=True)
class Judged:
    """What the keyword dictionary finds in one explanation (the per-sample terms of ``explanation_metrics``;
    the GRPO rewards score answers with the same terms, trainer/training/grpo/rewards.py)."""

    own_cue: bool  # a cue of the true attack type (live cues for a live face)
    wrong_cue: bool  # a spoof naming only other attack types' cues
    contradiction: bool  # "Yes" followed by a spoof cue, or "No" by live cues and no spoof cue
    words: int


def judge_explanation(text: str, judgment: str, attack: str, keywords: Mapping[str, tuple[tuple[str, ...], ...]]
                      ) -> Judged:
    """``text`` explaining ``judgment`` ("Yes"/"No") of a sample whose true attack type is ``attack``
    ("none" for live)."""
    cues = find_cues(text, keywords)
    spoof_cues = {g for g in keywords if g != LIVE and cues.get(g)}
    own = bool(cues.get(LIVE)) if attack == "none" else attack in spoof_cues
    contradiction = bool(spoof_cues) if judgment == "Yes" else (not spoof_cues and bool(cues.get(LIVE)))
    return Judged(own, attack != "none" and bool(spoof_cues) and not own, contradiction, len(text.split()))


def explanation_metrics(records: Iterable[Explained], keywords: Mapping[str, tuple[tuple[str, ...], ...]]
                        ) -> dict[str, Any]:
    """Rates over ``records`` (NaN where no sample qualifies; JSON writers turn NaN into null).

    cue_hit: spoofs whose explanation names a cue of their own attack type (also per attack);
    wrong_cue: spoofs naming only other attack types' cues; live_cue_hit: lives naming a live cue;
    contradiction: "Yes" followed by a spoof cue, or "No" followed by live cues and no spoof cue.
    """
    records = list(records)
    hits: dict[str, list[bool]] = defaultdict(list)
    wrong, live_hits, contradictions, lengths = [], [], [], []
    for r in records:
        judged = judge_explanation(r.text, r.judgment, r.attack, keywords)
        lengths.append(judged.words)
        if r.attack == "none":
            live_hits.append(judged.own_cue)
        else:
            hits[r.attack].append(judged.own_cue)
            wrong.append(judged.wrong_cue)
        contradictions.append(judged.contradiction)
    rate = lambda xs: float(np.mean(xs)) if xs else math.nan  # noqa: E731
    all_hits = [h for v in hits.values() for h in v]
    return {
        "samples": len(records), "spoof_samples": len(all_hits), "live_samples": len(live_hits),
        "cue_hit_rate": rate(all_hits), "cue_hit_rate_per_attack": {a: rate(v) for a, v in sorted(hits.items())},
        "wrong_cue_rate": rate(wrong), "live_cue_rate": rate(live_hits), "contradiction_rate": rate(contradictions),
        "mean_words": rate(lengths), "empty_rate": rate([n == 0 for n in lengths]),
    }


# ----- generation -----

def clean_explanation(text: str) -> str:
    """The interpretation after the judgment token: drop the ". " that joins them in the answers."""
    return text.strip().lstrip(".").strip()


@torch.no_grad()
def generate_explanations(model, tokenizer, input_ids: torch.Tensor, pixel_values: torch.Tensor, live: list[bool],
                          mode: str = "greedy", max_new_tokens: int = 48, temperature: float = 0.7,
                          top_p: float = 0.9, seed: int = 0, synced: bool = False) -> list[str]:
    """Explanations for prompts ``input_ids`` [B, S] (one prompt, so no padding), each continuing
    after the judgment ``live[i]`` ("Yes"/"No"); greedy or sampled decoding. ``synced``: a ZeRO-3 model
    partitioned over ranks (every rank steps until all have finished)."""
    if mode not in ("greedy", "sampled"):
        raise ValueError(f"explanation mode must be greedy or sampled, got {mode!r}")
    dev = input_ids.device
    judgment = torch.tensor([model.arch.yes_token_id if x else model.arch.no_token_id for x in live], device=dev)
    ids = torch.cat([input_ids, judgment[:, None]], dim=1)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    if mode == "sampled":
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    new = model.generate(ids, torch.ones_like(ids), pixel_values, **kwargs)
    return [clean_explanation(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


# ----- which samples to explain -----

class SampleKeeper:
    """Keeps up to ``per_type`` samples of every attack type (live = "none") seen while scoring, so
    the explained sample covers each type without a second pass over the shards."""

    def __init__(self, per_type: int) -> None:
        self.per_type = per_type
        self.kept: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def offer(self, batch: dict[str, Any]) -> None:
        for i, meta in enumerate(batch["meta"]):
            attack = str(meta.get("attack", "none"))
            if len(self.kept[attack]) < self.per_type:
                self.kept[attack].append({"key": batch["keys"][i], "attack": attack,
                                          "pixel_values": batch["pixel_values"][i].clone(),
                                          "input_ids": batch["input_ids"][i].clone()})

    def any_one(self) -> list[dict[str, Any]]:
        """One kept sample (a rank that kept none makes lockstep calls on it); raises if nothing was kept."""
        first = next((v[0] for v in self.kept.values() if v), None)
        if first is None:
            raise ValueError("no sample kept to explain: the evaluation set gave this rank no sample")
        return [first]

    def select(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` kept samples, round-robin over attack types (sorted), so each type is represented."""
        queues = [list(v) for _, v in sorted(self.kept.items())]
        out: list[dict[str, Any]] = []
        while len(out) < n and any(queues):
            for q in queues:
                if q and len(out) < n:
                    out.append(q.pop(0))
        return out


def to_uint8_image(pixels: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """[3, S, S] -> HWC uint8, for TensorBoard: the loader's uint8 pixels as they are, normalised ones (predict's)
    with the model's normalisation undone."""
    if pixels.dtype == torch.uint8:
        return pixels.cpu().permute(1, 2, 0).numpy()
    x = pixels.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def log_examples(writer: MetricsWriter, set_name: str, records: list[Explained], images: Mapping[str, np.ndarray],
                 step: int = 0, limit: int = 8) -> None:
    """Image + question + answer triples under ``explain/<set>/<n>`` (image and text share the tag)."""
    by_key: dict[str, list[Explained]] = defaultdict(list)
    for r in records:
        by_key[r.key].append(r)
    for n, (key, rs) in enumerate(list(by_key.items())[:limit]):
        tag = Tags.example(set_name, n)
        if key in images:
            writer.image(tag, images[key], step)
        answers = "\n\n".join(f"**A ({r.mode}):** {r.judgment}. {r.text}" for r in rs)
        writer.text(tag, f"`{key}` (truth: {rs[0].attack}, score {rs[0].score:.3f})\n\n**Q:** {QUESTION}\n\n"
                         f"{answers}", step)


def records_as_dicts(records: Iterable[Explained]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def explain_set(model, tokenizer, keeper: "SampleKeeper", scored: ScoredSet, threshold: float, modes: list[str],
                max_new_tokens: int, batch_size: int, info: WorldInfo, seed: int = 0, synced: bool = False):
    """Explain this rank's kept samples (judgment = score >= threshold) in each decoding mode;
    every rank's records and images gathered. ``synced``: ``model`` is partitioned over the ranks (ZeRO-3):
    every rank then makes as many generate calls as the rank with the most samples (repeating its last batch,
    whose extra answers are dropped) and steps them in lockstep, or the collectives would hang."""
    dev = device()
    score_of = scored.by_key()
    chosen = keeper.select(keeper.per_type)  # this rank's share of the samples to explain
    starts = list(range(0, len(chosen), batch_size))
    calls = max(gather_objects(len(starts), info)) if synced else len(starts)
    records, images = [], {}
    for call in range(calls):
        start = starts[min(call, len(starts) - 1)] if starts else 0
        group = chosen[start:start + batch_size] or keeper.any_one()
        ids = torch.stack([g["input_ids"] for g in group]).to(dev)
        pixels = torch.stack([g["pixel_values"] for g in group]).to(dev)
        live = [score_of.get(g["key"], 1.0) >= threshold for g in group]
        for mode in modes:
            texts = generate_explanations(model, tokenizer, ids, pixels, live, mode, max_new_tokens,
                                          seed=seed + info.rank * 1000 + start, synced=synced)
            if call < len(starts):
                records += [Explained(g["key"], g["attack"], score_of[g["key"]], "Yes" if lv else "No", mode, t)
                            for g, lv, t in zip(group, live, texts)]
        if call < len(starts):
            for g in group:
                images[g["key"]] = to_uint8_image(g["pixel_values"], model.arch.image_mean, model.arch.image_std)
    gathered = gather_objects((records, images), info)
    return [r for rs, _ in gathered for r in rs], {k: v for _, im in gathered for k, v in im.items()}
