"""Prompt/label masks and the lopsided LM loss against hand-computed values."""

import math

import pytest
import torch

from trainer.model.loss import lopsided_lm_loss
from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT, UNSUPERVISED
from trainer.sample.prompt import PromptBuilder
from trainer.sample.tokenizer import IMAGE_TOKEN


def test_loss_hand_computed():
    ln = math.log
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # judgment, target 0: CE = ln 3
            [ln(4), 0.0, 0.0],  # interpretation, target 0: CE = ln(6/4)
            [ln(4), 0.0, 0.0],  # interpretation, target 1: CE = ln 6
            [5.0, -3.0, 1.0],
        ]
    )  # unsupervised
    targets = torch.tensor([0, 0, 1, IGNORE_INDEX])
    groups = torch.tensor([JUDGMENT, INTERPRETATION, INTERPRETATION, UNSUPERVISED])
    parts = lopsided_lm_loss(logits, targets, groups, alpha=0.7)
    assert parts.judgment.item() == pytest.approx(0.7 * ln(3), rel=1e-6)
    assert parts.interpretation.item() == pytest.approx(0.3 * (ln(1.5) + ln(6)) / 2, rel=1e-6)
    assert parts.total.item() == pytest.approx(parts.judgment.item() + parts.interpretation.item())
    # Global counts replace the local ones: twice the tokens elsewhere halves each mean.
    half = lopsided_lm_loss(logits, targets, groups, alpha=0.7, n_judgment=2, n_interpretation=4)
    assert half.total.item() == pytest.approx(parts.total.item() / 2, rel=1e-6)


def test_empty_groups_contribute_zero():
    logits = torch.randn(3, 5)
    targets = torch.tensor([1, 2, 3])
    only_interp = lopsided_lm_loss(logits, targets, torch.full((3,), INTERPRETATION), alpha=0.7)
    assert only_interp.judgment.item() == 0.0 and torch.isfinite(only_interp.total)
    nothing = lopsided_lm_loss(logits, torch.full((3,), IGNORE_INDEX), torch.zeros(3, dtype=torch.long))
    assert nothing.total.item() == 0.0


def test_prompt_masks(demo_tokenizer):
    builder = PromptBuilder(demo_tokenizer, num_image_tokens=5, max_length=64)
    tok = demo_tokenizer
    live = builder.encode(True, "natural skin texture")
    spoof = builder.encode(False, "halftone dots on paper")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for enc, word in ((live, "Yes"), (spoof, "No")):
        n_prompt = len(builder.prompt_ids)
        assert enc.input_ids[:n_prompt] == builder.prompt_ids
        assert enc.input_ids.count(image_id) == 5
        assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert enc.label_groups[:n_prompt] == [UNSUPERVISED] * n_prompt
        # the judgment is exactly one token, right after the prompt, predicted from score_position
        assert enc.score_position == n_prompt - 1
        assert enc.labels[n_prompt] == tok.convert_tokens_to_ids(word) == enc.input_ids[n_prompt]
        assert enc.label_groups[n_prompt] == JUDGMENT
        assert set(enc.label_groups[n_prompt + 1 :]) == {INTERPRETATION}
        assert enc.labels[-1] == tok.eos_token_id
        assert tok.decode(enc.labels[n_prompt + 1 :], skip_special_tokens=True).startswith(".")
    assert (
        tok.decode(spoof.labels[len(builder.prompt_ids) + 1 :], skip_special_tokens=True) == ". halftone dots on paper"
    )


def test_caption_truncated_to_max_length(demo_tokenizer):
    builder = PromptBuilder(demo_tokenizer, num_image_tokens=5, max_length=40)
    enc = builder.encode(False, "screen moire " * 50)
    assert len(enc.input_ids) == 40 and len(enc.labels) == 40 == len(enc.label_groups)


def test_judgment_only_answers(demo_tokenizer):
    builder = PromptBuilder(demo_tokenizer, num_image_tokens=5, max_length=64, answer_style="judgment")
    enc = builder.encode(True, "ignored caption")
    assert enc.label_groups[len(builder.prompt_ids) :] == [JUDGMENT, INTERPRETATION]  # "Yes" + EOS


def test_prompt_too_long_is_refused(demo_tokenizer):
    with pytest.raises(ValueError, match="data.max_length"):
        PromptBuilder(demo_tokenizer, num_image_tokens=100, max_length=50)
