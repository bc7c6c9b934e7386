"""Pretrained weights streamed into a built I-FAS model, one tensor at a time (docs/architecture.md,
"Loading checkpoints at scale").

A :class:`CheckpointPart` is a directory of safetensors weights saved from some transformers class, and
where its tensors go in the I-FAS model. A checkpoint key is first translated the way transformers'
own ``from_pretrained`` would translate it (old and new LLaVA layouts, a CLIPModel file read as its
vision tower) against that class built on the meta device, then by a prefix map into an I-FAS name.
Everything is checked from the file headers before a tensor is read: every parameter under the
part's target prefixes must be covered, with the model's shape (an embedding may have more rows than
the checkpoint's: the new vocabulary rows start at the mean of the checkpoint's rows).

Under ZeRO-3 (a model built inside ``deepspeed.zero.Init``) each parameter is gathered on its own
with ``modifier_rank=0``: rank 0 reads the tensor from the memory-mapped file and copies it in,
leaving the context broadcasts it and keeps each rank's partition; the other ranks read nothing.
Beyond the partitions, a rank holds one full tensor at a time.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import torch
from safetensors import safe_open
from torch import nn

from trainer.model.weights import tied_aliases, weight_files

log = logging.getLogger("ifas.model")


class CheckpointError(ValueError):
    """A pretrained checkpoint does not fit the model it should seed; the message names the directory."""


@dataclass
class CheckpointPart:
    directory: Path
    prefixes: dict[str, str]  # prefix in the reference model's state dict -> prefix in the I-FAS model
    reference: nn.Module | None = None  # the class the checkpoint was saved from, on the meta device
    # (None: the keys are I-FAS names already, e.g. an ifas-export directory)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also when it is a ZeRO-3 partition (built under ``deepspeed.zero.Init``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _translate(part: CheckpointPart, keys: list[str]) -> dict[str, str]:
    """checkpoint key -> I-FAS name, for the keys this part maps; others are left out (e.g. CLIP's text tower)."""
    renamed = {k: k for k in keys}
    if part.reference is not None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(part.reference)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = part.reference.state_dict()
        for key in keys:
            name, converter = rename_source_key(key, renamings, converters, part.reference.base_model_prefix, meta)
            if converter is not None:
                raise CheckpointError(f"{part.directory}: {key} needs transformers' conversion {converter!r} "
                                      f"(tensors merged or split), which this loader does not do")
            renamed[key] = name
    out = {}
    for key, name in renamed.items():
        for source, target in part.prefixes.items():
            if name.startswith(source):
                out[key] = target + name[len(source):]
                break
    return out


@dataclass
class _Copy:
    file: Path
    key: str
    target: str  # the I-FAS state-dict entry (the first name of a tied group)


def _entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by state-dict name (tied names included)."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def plan_loading(model: nn.Module, parts: list[CheckpointPart], vocabulary: Collection[str] = ()) -> list[_Copy]:
    """Which tensor of which file fills which entry of ``model``, checked from the headers alone.
    ``vocabulary``: the entries (embedding, LM head) that may have more rows than the checkpoint's."""
    aliases = tied_aliases(model)
    entries = _entries(model)
    plan: dict[str, _Copy] = {}
    for part in parts:
        shapes: dict[str, tuple[int, ...]] = {}
        files: dict[str, Path] = {}
        for f in weight_files(part.directory, hint="is it a complete checkpoint directory?"):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    shapes[k], files[k] = tuple(fh.get_slice(k).get_shape()), f
        unused = 0
        for key, name in _translate(part, list(shapes)).items():
            if name not in aliases:
                unused += 1
                continue
            stored = aliases[name]
            if stored in plan:  # the config ties this tensor to one already planned: as transformers, keep that
                log.warning("%s: %s is ignored: the config ties %s to %s", part.directory, key, name, stored)
                continue
            want, have = full_shape(entries[name]), shapes[key]
            grows_rows = (name in vocabulary and len(want) == len(have) and want[1:] == have[1:]
                          and want[0] > have[0])
            if want != have and not grows_rows:
                raise CheckpointError(f"{part.directory}: {key} has shape {list(have)}, the model's {name} wants "
                                      f"{list(want)}; is the checkpoint's config.json the one its weights came from?")
            plan[stored] = _Copy(files[key], key, stored)
        targets = tuple(part.prefixes.values())
        missing = [n for n in dict(model.named_parameters()) if n.startswith(targets) and aliases[n] not in plan]
        if missing:
            raise CheckpointError(f"{part.directory} lacks {len(missing)} tensor(s) the model needs, e.g. "
                                  f"{missing[:3]}; is it a complete checkpoint of the model its config.json names?")
        log.info("%s: %d tensors to load (%d in the files not used)", part.directory, len(shapes) - unused, unused)
    return list(plan.values())


def _fill(target: torch.Tensor, source: torch.Tensor) -> None:
    rows = source.shape[0]
    target[:rows].copy_(source)
    if target.shape[0] > rows:  # new vocabulary rows (e.g. an added <image> token): the mean embedding
        mean = source.sum(dim=0, dtype=torch.float32) / rows  # no fp32 copy of the whole table
        target[rows:].copy_(mean.to(target.dtype).expand_as(target[rows:]))


def load_pretrained(model: nn.Module, parts: list[CheckpointPart], vocabulary: Collection[str] = ()) -> None:
    """Copy the parts' tensors into ``model`` (plain or ZeRO-3 partitioned); ``vocabulary`` as in
    :func:`plan_loading`."""
    plan = plan_loading(model, parts, vocabulary)
    entries = _entries(model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    by_file = itertools.groupby(sorted(plan, key=lambda c: str(c.file)), key=lambda c: c.file)
    with torch.no_grad():
        for file, copies in by_file:
            # one file open at a time: its memory-mapped pages are released before the next one is read
            with safe_open(str(file), framework="pt") as fh:
                for copy in copies:
                    target = entries[copy.target]
                    if hasattr(target, "ds_id"):  # a ZeRO-3 partition: gather, fill on rank 0, re-partition
                        import deepspeed

                        with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                            if rank == 0:
                                _fill(target.data, fh.get_tensor(copy.key))
                    else:  # replicated (no ZeRO-3, or a buffer): every rank fills its own copy
                        _fill(target.data, fh.get_tensor(copy.key))
