"""The family-format export: a model without GAC written as its checkpoint family's transformers class
(``ifas-export --format hf``), which ``AutoModelForImageTextToText`` and ``AutoProcessor`` load, e.g.
``LlavaForConditionalGeneration`` + ``LlavaProcessor`` for SCF's fine-tuned captioner."""
from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from trainer.model.arch import DEFAULT_FAMILY
from trainer.model.families import family_named
from trainer.model.families.base import NotFamilyCompatible
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES, verify_weights, write_weights


def check_family_compatible(arch: Mapping[str, Any]) -> None:
    """Raise NotFamilyCompatible unless the family's class can hold the model (``arch``: ifas_config.json's)."""
    family_named(arch.get("family", DEFAULT_FAMILY)).check_exportable(arch)


def is_family_compatible(arch: Mapping[str, Any]) -> bool:
    try:
        check_family_compatible(arch)
    except NotFamilyCompatible:
        return False
    return True


def to_family_name(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for ours, theirs in prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise NotFamilyCompatible(f"weight {name!r} has no place in the family's class")


class FamilyNamedTensors(Mapping):
    """A read-only view of this project's state dict (or DeepSpeed's lazy one) under the family's names."""

    def __init__(self, tensors: Mapping[str, Any], prefixes: tuple[tuple[str, str], ...]) -> None:
        self._ours = {to_family_name(k, prefixes): k for k in tensors}
        self._tensors = tensors

    def __getitem__(self, name: str) -> Any:
        return self._tensors[self._ours[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ours)

    def __len__(self) -> int:
        return len(self._ours)


def save_family_processor(ifas_config: Mapping[str, Any], tokenizer, chat_template: str | None,
                          directory: str | Path) -> None:
    """Write the family's processor for the model (images prepared as ImageTransform does) to ``directory``;
    ``chat_template``: a processor-level template to keep (e.g. the base checkpoint's)."""
    family = family_named(ifas_config["arch"].get("family", DEFAULT_FAMILY))
    family.save_processor(ifas_config, tokenizer, chat_template, directory)


def write_family(ifas_config: Mapping[str, Any], tensors: Mapping[str, Any], processor_dir: str | Path,
                 directory: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, dtype=None) -> None:
    """Write a model without GAC (its config dict and state dict, or DeepSpeed's lazy one; cast to ``dtype``
    if given) in its family's transformers format: weights streamed through trainer.model.weights, config,
    the processor files of ``processor_dir`` (save_family_processor's) and a generation config that stops
    at the EOS every trained answer ends with; then check the weights against the config."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    check_family_compatible(ifas_config["arch"])
    family = family_named(ifas_config["arch"].get("family", DEFAULT_FAMILY))
    config = family.hf_config(ifas_config)
    with torch.device("meta"):
        skeleton = family.transformers_class()(config)
    write_weights(skeleton, FamilyNamedTensors(tensors, family.prefixes), directory, max_shard_size, dtype)
    if dtype is not None:  # what from_pretrained(dtype="auto") loads, on every level of the config
        config.dtype = config.text_config.dtype = config.vision_config.dtype = dtype
    config.save_pretrained(str(directory))
    for f in Path(processor_dir).iterdir():
        if f.is_file():
            shutil.copyfile(f, Path(directory) / f.name)
    tok = AutoTokenizer.from_pretrained(str(processor_dir))
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(str(directory))
    verify_weights(skeleton, directory)  # read back: every tensor present once, with the family's shapes


