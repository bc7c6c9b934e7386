"""The GRPO stage's parts on a tiny model in one process: rewards, advantages, the rollout tensors, and the
objective with its gradients against a direct per-token computation (trainer/training/grpo/)."""
from __future__ import annotations

import math

import pytest
import torch

from shards.keywords import load_keywords
from trainer.config import GRPOConfig, ModelConfig
from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT, UNSUPERVISED
from trainer.sample.prompt import PromptBuilder
from trainer.training.grpo.objective import ADVANTAGE_EPS, group_advantages, grpo_loss
from trainer.training.grpo.rewards import PARTS, Answer, reward_parts, score_answers
from trainer.training.grpo.rollout import answer_tensors, sample_rollout

KEYWORDS = load_keywords()


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    from trainer.model.build import build_model

    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset="tiny", projector_merge=2), demo_tokenizer)
    return model.float(), tok


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5, 0.5, 0.5, 4.5], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    for g in range(2):
        r = rewards[4 * g:4 * g + 4]
        expected = (r - r.mean()) / (math.sqrt(((r - r.mean()) ** 2).mean()) + ADVANTAGE_EPS)
        assert torch.allclose(adv[4 * g:4 * g + 4], expected)
    assert torch.equal(group_advantages(torch.full((4,), 2.0), 2), torch.zeros(4))  # all alike: no signal


def test_reward_parts_follow_the_label_the_attack_type_and_the_format():
    yes, no = 11, 12
    parts = lambda answer, live, attack: reward_parts(answer, live, attack, yes, no, KEYWORDS, 3, 12)  # noqa: E731
    good_replay = Answer(no, "visible moire pattern and screen glare over the face", True)
    assert parts(good_replay, False, "replay") == {"judgment": 1.0, "cue": 1.0, "no_contradiction": 1.0,
                                                   "format": 1.0, "wrong_cue": 0.0}
    wrong_type = parts(Answer(no, "printed paper texture with ink dots", True), False, "replay")
    assert wrong_type["cue"] == 0.0 and wrong_type["wrong_cue"] == 1.0
    contradicting = parts(Answer(yes, "screen glare and moire everywhere", True), False, "replay")
    assert contradicting["judgment"] == 0.0 and contradicting["no_contradiction"] == 0.0
    live = parts(Answer(yes, "natural skin texture with pores", True), True, "none")
    assert live["cue"] == 1.0 and live["judgment"] == 1.0 and live["wrong_cue"] == 0.0
    assert parts(Answer(yes, "natural skin texture with pores", False), True, "none")["format"] == 0.0  # cut off
    assert parts(Answer(yes, "pores", True), True, "none")["format"] == 0.0  # under min_words
    no_judgment = parts(Answer(99, "natural skin texture with pores", True), True, "none")
    assert no_judgment["format"] == 0.0 and no_judgment["no_contradiction"] == 0.0
    cfg = GRPOConfig(reward_judgment=1.0, reward_cue=2.0, reward_no_contradiction=0.5, reward_format=0.25,
                     reward_wrong_cue=-1.0, min_words=3, max_words=12)
    table, total = score_answers([good_replay, Answer(no, "printed paper texture with ink dots", True)],
                                 [False, False], ["replay", "replay"], yes, no, KEYWORDS, cfg)
    assert table.shape == (2, len(PARTS))
    assert total.tolist() == [1.0 + 2.0 + 0.5 + 0.25, 1.0 + 0.5 + 0.25 - 1.0]


def test_answer_tensors_supervise_up_to_the_first_end_of_text():
    eos, pad = 2, 0
    prompt = torch.tensor([[5, 6, 7], [5, 6, 7]])
    new = torch.tensor([[20, 30, eos, eos], [21, 31, 32, 33]])  # the first ended (padded with eos), not the second
    t, lengths, finished = answer_tensors(prompt, new, eos, pad)
    assert lengths.tolist() == [3, 4] and finished.tolist() == [True, False]
    assert t["input_ids"].tolist() == [[5, 6, 7, 20, 30, eos, pad], [5, 6, 7, 21, 31, 32, 33]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    i = IGNORE_INDEX
    assert t["labels"].tolist() == [[i, i, i, 20, 30, eos, i], [i, i, i, 21, 31, 32, 33]]
    u, j, e = UNSUPERVISED, JUDGMENT, INTERPRETATION
    assert t["label_groups"].tolist() == [[u, u, u, j, e, e, u], [u, u, u, j, e, e, e]]
    assert t["score_positions"].tolist() == [2, 2]


def _fake_rollout(model, tok, n: int, answer_len: int, seed: int):
    """n answers of random tokens (some ended early) after the I-FAS prompt, with random images."""
    g = torch.Generator().manual_seed(seed)
    builder = PromptBuilder(tok, model.num_image_tokens, 512, image_span=model.arch.image_span)
    prompt = torch.tensor(builder.prompt_ids).expand(n, -1)
    words = torch.randint(20, len(tok), (n, answer_len), generator=g)
    words[words == model.arch.image_token_id] = 21
    words[:, 0] = torch.where(torch.rand(n, generator=g) < 0.5, model.arch.yes_token_id, model.arch.no_token_id)
    words[0, 3:] = tok.eos_token_id  # a short answer
    inputs, _, _ = answer_tensors(prompt, words, tok.eos_token_id, tok.pad_token_id)
    size = model.arch.image_size
    inputs["pixel_values"] = torch.randn(n, 3, size, size, generator=g)
    return inputs, g


def test_grpo_loss_and_gradients_equal_a_direct_per_token_computation(tiny):
    model, tok = tiny
    temperature, clip_eps, kl_coef, alpha = 0.8, 0.2, 0.1, 0.7
    inputs, g = _fake_rollout(model, tok, n=4, answer_len=7, seed=1)
    answer_adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 3.5]), 2).float()
    judgment_adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2).float()
    # split advantages: the judgment token credited with its own, the explanation with the answer's
    advantages = torch.where(inputs["label_groups"] == JUDGMENT, judgment_adv[:, None], answer_adv[:, None])
    with torch.no_grad():
        base = model(**inputs, logprob_temperature=temperature).token_logprobs
    old = base + 0.3 * torch.randn(base.shape, generator=g)  # ratios away from 1: some clip
    ref = base + 0.5 * torch.randn(base.shape, generator=g)
    groups = inputs["label_groups"]
    n_j, n_i = float((groups == JUDGMENT).sum()), float((groups == INTERPRETATION).sum())

    model.zero_grad()
    logp = model(**inputs, logprob_temperature=temperature).token_logprobs
    loss = grpo_loss(logp, old, ref, advantages, groups, alpha, n_j, n_i, clip_eps, kl_coef)
    loss.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert int(loss.clipped) > 0

    # direct: full logits at every position, one token at a time
    model.zero_grad()
    embeds, _, _ = model.embed(inputs["input_ids"], inputs["pixel_values"])
    hidden = model.llm.base_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    logits = model.llm.get_output_embeddings()(hidden)
    total = torch.zeros(())
    for b in range(4):
        for t in range(1, inputs["input_ids"].shape[1]):
            group = int(groups[b, t])
            if group == UNSUPERVISED:
                continue
            lp = torch.log_softmax(logits[b, t - 1] / temperature, dim=-1)[inputs["labels"][b, t]]
            ratio = torch.exp(lp - old[b, t])
            a = judgment_adv[b] if group == JUDGMENT else answer_adv[b]
            pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
            kl = torch.exp(ref[b, t] - lp) - (ref[b, t] - lp) - 1
            weight = alpha / n_j if group == JUDGMENT else (1 - alpha) / n_i
            total = total + weight * (pg + kl_coef * kl)
    total.backward()
    assert loss.total.item() == pytest.approx(total.item(), rel=1e-5, abs=1e-7)
    direct = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert direct.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, direct[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_batches_with_global_counts_sum_to_the_whole_batch(tiny):
    """What makes 2 ranks equal 1: each part normalised by the global token counts, the parts' losses and
    gradients add up to the whole batch's."""
    model, tok = tiny
    inputs, g = _fake_rollout(model, tok, n=4, answer_len=6, seed=2)
    adv = torch.randn(4, generator=g)
    groups = inputs["label_groups"]
    n_j, n_i = (groups == JUDGMENT).sum(), (groups == INTERPRETATION).sum()

    def run(rows):
        part = {k: v[rows] for k, v in inputs.items()}
        logp = model(**part, logprob_temperature=1.0).token_logprobs
        loss = grpo_loss(logp, logp.detach(), logp.detach() - 0.1, adv[rows], part["label_groups"], None, n_j, n_i,
                         0.2, 0.05)
        loss.total.backward()
        return loss.total.detach()

    model.zero_grad()
    whole = run(slice(0, 4))
    whole_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    halves = run(slice(0, 2)) + run(slice(2, 4))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-5)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rollouts_are_seeded_and_scored_by_their_own_text(tiny, small_shards):
    from trainer.data import ImageTransform, SampleMaker, ShardStream, StreamLayout, make_loader, resolve_shards

    model, tok = tiny
    builder = PromptBuilder(tok, model.num_image_tokens, 128, image_span=model.arch.image_span)
    stream = ShardStream(resolve_shards([str(small_shards["domain_a"])]),
                         SampleMaker(builder, ImageTransform.for_model(model.arch)), StreamLayout(), batch_size=2,
                         train=False)
    batch = next(iter(make_loader(stream, tok.pad_token_id)))
    cfg = GRPOConfig(group_size=3, max_new_tokens=6, kl_coef=0.0)
    dev = torch.device("cpu")
    first = sample_rollout(model, None, batch, builder.prompt_ids, tok, KEYWORDS, cfg, 5, False, dev)
    again = sample_rollout(model, None, batch, builder.prompt_ids, tok, KEYWORDS, cfg, 5, False, dev)
    other = sample_rollout(model, None, batch, builder.prompt_ids, tok, KEYWORDS, cfg, 6, False, dev)
    assert torch.equal(first.inputs["input_ids"], again.inputs["input_ids"]) and first.texts == again.texts
    assert not torch.equal(first.inputs["input_ids"], other.inputs["input_ids"])
    assert first.inputs["input_ids"].shape[0] == 6 and first.ref_logp is None and first.old_logp is None
    assert not (first.inputs["labels"] == model.arch.image_token_id).any()  # never generated
    live = [bool(v) for v in batch["live"].tolist() for _ in range(3)]
    attacks = [m["attack"] for m in batch["meta"] for _ in range(3)]
    for i, text in enumerate(first.texts):
        answer = Answer(int(first.inputs["labels"][i, len(builder.prompt_ids)]), text,
                        bool((first.inputs["labels"][i] == tok.eos_token_id).any()))
        expected = reward_parts(answer, live[i], attacks[i], model.arch.yes_token_id, model.arch.no_token_id,
                                KEYWORDS, cfg.min_words, cfg.max_words)
        assert first.parts[i].tolist() == [expected[p] for p in PARTS]
    weighted = first.parts * torch.tensor([cfg.reward_judgment, cfg.reward_cue, cfg.reward_no_contradiction,
                                           cfg.reward_format, cfg.reward_wrong_cue], dtype=torch.float64)
    assert torch.allclose(first.rewards, weighted.sum(dim=1))
    assert torch.allclose(first.judgment_advantages, group_advantages(weighted[:, 0], 3))
    assert torch.allclose(first.advantages, group_advantages(weighted[:, 1:].sum(dim=1), 3))
    tokens = first.token_advantages()
    at_judgment = first.inputs["label_groups"] == JUDGMENT
    assert torch.equal(tokens[at_judgment], first.judgment_advantages)  # one judgment token per answer
    whole = sample_rollout(model, None, batch, builder.prompt_ids, tok, KEYWORDS,
                           GRPOConfig(group_size=3, max_new_tokens=6, kl_coef=0.0, split_advantages=False), 5, False,
                           dev)
    assert whole.judgment_advantages is None and torch.allclose(whole.advantages, group_advantages(whole.rewards, 3))
