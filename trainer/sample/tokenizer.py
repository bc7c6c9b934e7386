"""Tokenizers: load a local one, or build the offline demo BPE; check the Yes/No contract.

The liveness score reads the logits of "Yes" and "No" at the first answer position, so each
must be exactly one token. Any tokenizer that breaks this is refused before training starts.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
JUDGMENT_WORDS = ("Yes", "No")
# The offline demo BPE's chat template (a real checkpoint brings its own, or is refused).
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_DEMO_SPECIAL = ["<|pad|>", "<|endoftext|>", IMAGE_TOKEN, "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]


class TokenizerError(ValueError):
    """The tokenizer cannot serve I-FAS (e.g. Yes/No are not single tokens)."""


def judgment_token_ids(tok: PreTrainedTokenizerBase, where: str = "the tokenizer") -> tuple[int, int]:
    """Return the ids of "Yes" and "No"; raise TokenizerError unless each is a single token."""
    ids = []
    for word in JUDGMENT_WORDS:
        pieces = tok.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            raise TokenizerError(
                f"{where} encodes {word!r} as {len(pieces)} tokens {pieces}; I-FAS needs 'Yes' and 'No' to be "
                f"single tokens (use another tokenizer, or add them to its vocabulary)"
            )
        ids.append(pieces[0])
    return ids[0], ids[1]


def build_demo_tokenizer(texts: Iterable[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on ``texts`` (the demo captions), offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_DEMO_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The judgment words appear both at a line start and after a space, many times, so the BPE
    # merges them into single tokens whatever the captions contain.
    corpus = list(texts) + [f"{w}. {w}" for w in JUDGMENT_WORDS] * 200
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    judgment_token_ids(tok, "the demo tokenizer")
    return tok


def load_tokenizer(path: str | Path, image_token: str | None = None) -> PreTrainedTokenizerBase:
    """Load a local tokenizer directory and make it fit for I-FAS (image token, pad token, chat template).

    ``image_token``: the placeholder the checkpoint family's processor falls back to when the tokenizer names
    none (Qwen-VL's ``<|image_pad|>``: its released tokenizer_config.json names no image token); it is then named
    in the tokenizer, so every copy saved from it keeps it. The chat template is the processor-level one
    (chat_template.jinja / chat_template.json) where the directory has one, as the checkpoint's processor uses
    it, else the tokenizer's own."""
    p = Path(path)
    if not p.is_dir():
        raise TokenizerError(f"tokenizer directory {p} does not exist; set model.tokenizer_path to a local directory")
    tok = AutoTokenizer.from_pretrained(str(p))
    if image_token is not None and not _named_image_token(tok):
        tok = AutoTokenizer.from_pretrained(str(p), extra_special_tokens={"image_token": image_token})
    ensure_image_token(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    judgment_token_ids(tok, f"the tokenizer at {p}")
    processor_template = processor_chat_template(p)
    if processor_template is not None:
        tok.chat_template = processor_template  # the processor's wins, as in transformers' processors
    if tok.chat_template is None:
        raise TokenizerError(
            f"{p} has no chat template (neither its tokenizer's nor a processor's chat_template.json/.jinja): I-FAS "
            "prompts a checkpoint in its own chat format; use its instruction-tuned release, or set "
            "model.tokenizer_path to a tokenizer directory that has the template")
    return tok


def _named_image_token(tok: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tok, "image_token", None) or getattr(tok, "context_image_token", None))


def processor_chat_template(p: Path) -> str | None:
    """The chat template a processor saved beside the tokenizer (chat_template.jinja or .json), if any."""
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text()
    if (p / "chat_template.json").is_file():
        try:
            return json.loads((p / "chat_template.json").read_text()).get("chat_template")
        except ValueError as exc:
            raise TokenizerError(f"{p / 'chat_template.json'} is not valid JSON ({exc}); copy it again from the "
                                 "checkpoint's release") from exc
    return None


def image_token_of(tok: PreTrainedTokenizerBase) -> str:
    """The placeholder the image tokens replace: the one a multimodal tokenizer names (``image_token``;
    InternVL's ``context_image_token``), else ``<image>``."""
    return getattr(tok, "image_token", None) or getattr(tok, "context_image_token", None) or IMAGE_TOKEN


def ensure_image_token(tok: PreTrainedTokenizerBase) -> int:
    """Add the image placeholder as a special token when missing; return its id."""
    token = image_token_of(tok)
    if token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [token]})
        log.info("added %s to the tokenizer (vocabulary now %d)", token, len(tok))
    return tok.convert_tokens_to_ids(token)
