"""The I-FAS VQA prompt, answer tokenisation and label masks.

A sample becomes ``prompt + answer``: the prompt is the tokenizer's chat template around
``<image>`` (expanded to the model's image-token count) and the fixed question; the answer is
the judgment ("Yes"/"No", one token) followed by the interpretation (". " + caption + EOS).
``labels`` hold the answer token ids (IGNORE_INDEX elsewhere); ``label_groups`` mark each
label as judgment or interpretation for the lopsided loss.

For the captioner's fine-tuning (SCF step 5, ``data.task=caption``) the prompt is the captioner's
own (``shards.scf.captioner_prompt``, tokenised as its processor does) and the answer is the caption
alone: every answer token is interpretation, there is no judgment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from shards.schema import QUESTION
from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT, UNSUPERVISED
from trainer.sample.tokenizer import image_token_of, judgment_token_ids

log = logging.getLogger(__name__)


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    label_groups: list[int]
    score_position: int  # last prompt token: its logits predict the judgment
    image_positions: list[int]  # where the image tokens go (the same in every sample of one builder)


def render_prompt(tokenizer: PreTrainedTokenizerBase) -> str:
    """The I-FAS question in the checkpoint's chat template. Multimodal templates (LLaVA's, InternVL's)
    take the message as parts ({"type": "image"}, {"type": "text"}) and place the image token themselves;
    text-only templates take a string, into which the image token goes first."""
    image_token = image_token_of(tokenizer)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    try:
        text = tokenizer.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
        if text.count(image_token) == 1 and QUESTION in text:
            return text
        why = f"it placed {text.count(image_token)} {image_token} token(s)"
    except (TemplateError, TypeError, ValueError) as exc:  # a template written for string content fails on parts
        why = f"it fails on them ({type(exc).__name__}: {exc})"
    log.info("the chat template does not take image parts (%s): the prompt is '%s' + newline + the question as "
             "one string", why, image_token)
    plain = [{"role": "user", "content": f"{image_token}\n{QUESTION}"}]
    return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)


class PromptBuilder:
    """Tokenises prompts and answers for one tokenizer and one image-token count."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        max_length: int,
        answer_style: str = "caption",
        caption_prompt: str | None = None,
        image_span: tuple[str, str] | list[str] = ("", ""),
    ) -> None:
        """``caption_prompt``: the full prompt text of a captioner (captioning task); None = I-FAS.
        ``image_span``: the tokens the checkpoint's processor puts around the image tokens (InternVL's
        ``<img>`` and ``</img>``; ArchConfig.image_span), none by default."""
        self.tokenizer = tokenizer
        self.yes_id, self.no_id = judgment_token_ids(tokenizer)
        image_token = image_token_of(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.answer_style = answer_style
        self.captioning = caption_prompt is not None
        self.max_length = max_length
        if self.captioning:  # special tokens (e.g. BOS) added as the captioner's processor adds them
            ids = tokenizer(caption_prompt, add_special_tokens=True)["input_ids"]
        else:
            text = render_prompt(tokenizer)
            # special tokens (e.g. Llama's BOS) as the checkpoint's processor adds them to the templated text
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise ValueError(
                f"the prompt template produced {ids.count(self.image_token_id)} {image_token} tokens, expected 1"
            )
        at = ids.index(self.image_token_id)
        start, end = ([tokenizer.convert_tokens_to_ids(t)] if t else [] for t in image_span)
        # The prompt is the same for every sample: tokenise it once.
        self.prompt_ids = ids[:at] + start + [self.image_token_id] * num_image_tokens + end + ids[at + 1 :]
        first = at + len(start)
        self.image_positions = list(range(first, first + num_image_tokens))
        if len(self.prompt_ids) + 1 > max_length:
            raise ValueError(
                f"data.max_length={max_length} leaves no room for the answer: the prompt alone "
                f"takes {len(self.prompt_ids)} tokens ({num_image_tokens} image tokens); raise it"
            )

    def answer_ids(self, live: bool, caption: str) -> tuple[list[int], list[int]]:
        """Token ids of the answer and their groups (judgment first, then interpretation)."""
        judgment = [] if self.captioning else [self.yes_id if live else self.no_id]
        interp: list[int] = []
        if self.captioning and caption:
            interp = self.tokenizer.encode(caption.strip(), add_special_tokens=False)
        elif self.answer_style == "caption" and caption:
            interp = self.tokenizer.encode(". " + caption.strip(), add_special_tokens=False)
        interp = interp + [self.tokenizer.eos_token_id]
        interp = interp[: self.max_length - len(self.prompt_ids) - len(judgment)]
        return judgment + interp, [JUDGMENT] * len(judgment) + [INTERPRETATION] * len(interp)

    def encode(self, live: bool, caption: str) -> EncodedSample:
        answer, groups = self.answer_ids(live, caption)
        n_prompt = len(self.prompt_ids)
        return EncodedSample(
            input_ids=self.prompt_ids + answer,
            labels=[IGNORE_INDEX] * n_prompt + answer,
            label_groups=[UNSUPERVISED] * n_prompt + groups,
            score_position=n_prompt - 1,
            image_positions=self.image_positions,
        )

    def encode_prompt(self) -> EncodedSample:
        """Prompt only (evaluation, prediction): no labels."""
        n = len(self.prompt_ids)
        return EncodedSample(list(self.prompt_ids), [IGNORE_INDEX] * n, [UNSUPERVISED] * n, n - 1, self.image_positions)
