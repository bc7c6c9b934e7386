"""Model weights on disk: ``model.safetensors``, or, above a shard size, the Hugging Face sharded layout
(``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).

Writing takes tensors one at a time from any name -> tensor mapping (DeepSpeed's lazy ZeRO-3 reader
gives tensor-like objects that gather on ``.contiguous()``), so it holds about one shard in memory and
never a second copy of the model. Reading copies tensor by tensor into a built model. Tied weights
(e.g. embeddings shared with the LM head) are stored once, under their first name in the model's
state dict; either name is accepted when reading.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from shards.io import parse_size, umask_mode

log = logging.getLogger("ifas.weights")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the Hugging Face default ("5GB")


class WeightsError(ValueError):
    """Weights on disk do not match the model (or are missing); the message names the file."""


class TensorLike(Protocol):
    shape: Any
    dtype: torch.dtype

    def contiguous(self) -> torch.Tensor: ...


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """state-dict name -> the name it is stored under, for every entry (tied names map to the first)."""
    first: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(t), name)
    return out


def _stored_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries that are written (one per tied group), with their (possibly meta) tensors."""
    aliases = tied_aliases(model)
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if aliases[name] == name}


def _check(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], where: str) -> dict[str, str]:
    """Check that ``shapes`` (name -> shape, names possibly tied aliases) covers the model exactly;
    returns name -> stored name."""
    aliases = tied_aliases(model)
    stored = _stored_entries(model)
    unexpected = sorted(n for n in shapes if n not in aliases)
    covered = {aliases[n] for n in shapes if n in aliases}
    missing = sorted(set(stored) - covered)
    if unexpected or missing:
        raise WeightsError(f"{where} does not fit the model: missing {missing[:5]} ({len(missing)}), "
                           f"unexpected {unexpected[:5]} ({len(unexpected)}); was it written for another config?")
    seen: dict[str, str] = {}
    for name in shapes:
        if name in aliases and seen.setdefault(aliases[name], name) != name:
            raise WeightsError(f"{where} holds both {seen[aliases[name]]} and {name}, which the model ties; "
                               f"was it written for an untied config?")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(stored[aliases[name]].shape):
            raise WeightsError(f"{where}: {name} has shape {tuple(shape)}, the model wants "
                               f"{tuple(stored[aliases[name]].shape)}")
    return {n: aliases[n] for n in shapes}


def _same(a: TensorLike, b: TensorLike) -> bool:
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.numel() > 0 and a.data_ptr() == b.data_ptr())


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def write_weights(model: nn.Module, tensors: Mapping[str, TensorLike], directory: str | Path,
                  max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> list[Path]:
    """Write the weights of ``model`` (a skeleton is enough, e.g. built on the meta device: only names,
    shapes and tying are read) taken from ``tensors``, cast to ``dtype`` if given (one tensor at a
    time); returns the files written."""
    try:
        limit = parse_size(max_shard_bytes)
    except ValueError as exc:
        raise WeightsError(f"max shard size: {exc}") from exc
    stored = _stored_entries(model)
    aliases = tied_aliases(model)
    first: dict[str, str] = {}
    keys = []  # tied names that hold the very same tensor are one entry (DeepSpeed returns both names)
    for key in tensors:
        kept = first.setdefault(aliases[key], key) if key in aliases else key
        if kept == key or not _same(tensors[kept], tensors[key]):
            keys.append(key)
    mapping = _check(model, {n: tuple(tensors[n].shape) for n in keys}, "the consolidated checkpoint")
    source = {stored_name: key for key, stored_name in mapping.items()}  # stored name -> key in ``tensors``
    shards: list[list[str]] = [[]]
    size = total = 0
    for name in stored:
        t = tensors[source[name]]
        nbytes = int(torch.Size(t.shape).numel()) * (dtype or t.dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in [*d.glob("model-*-of-*.safetensors"), d / WEIGHTS_NAME, d / INDEX_NAME]:
        stale.unlink(missing_ok=True)  # an earlier export with another layout
    names = [WEIGHTS_NAME] if len(shards) == 1 else [SHARD_NAME.format(index=i + 1, count=len(shards))
                                                       for i in range(len(shards))]
    files = []
    for file, members in zip(names, shards):
        # cast tensor by tensor: the source's copy of a shard never lives beside the cast one
        part = {name: _cast(tensors[source[name]].contiguous(), dtype) for name in members}
        tmp = d / (file + ".tmp")
        save_file(part, str(tmp), metadata={"format": "pt"})
        umask_mode(tmp)  # safetensors writes 0600
        tmp.replace(d / file)
        files.append(d / file)
        del part  # one shard at a time
        log.info("wrote %s (%d tensors)", d / file, len(members))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file for file, members in zip(names, shards) for name in members}}
        (d / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def weight_files(directory: str | Path, hint: str = "export the model with ifas-export") -> list[Path]:
    """The weight files of a model directory: the index's shards, or the single file (``hint``: the fix
    an error message suggests)."""
    d = Path(directory)
    if (d / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((d / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise WeightsError(f"{d / INDEX_NAME} is not a safetensors index ({exc}); {hint}") from exc
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise WeightsError(f"{d / INDEX_NAME} lists shards that are missing: {absent[:3]}; "
                               "copy the whole directory")
        return files
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    raise WeightsError(f"{d} holds no weights ({WEIGHTS_NAME} or {INDEX_NAME}); {hint}")


def verify_weights(model: nn.Module, directory: str | Path) -> dict[Path, dict[str, str]]:
    """Check from the file headers alone (no tensor is read) that ``directory``'s weights cover
    ``model`` exactly with the right shapes; returns file -> {name in file: stored name}."""
    plan: dict[Path, dict[str, tuple[int, ...]]] = {}
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as fh:
            plan[f] = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    all_shapes = {k: s for shapes in plan.values() for k, s in shapes.items()}
    mapping = _check(model, all_shapes, str(directory))
    return {f: {k: mapping[k] for k in shapes} for f, shapes in plan.items()}


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy ``directory``'s weights (single file or shards) into ``model``, one tensor at a time."""
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for f, names in verify_weights(model, directory).items():
            with safe_open(str(f), framework="pt") as fh:
                for name, stored in names.items():
                    targets[stored].copy_(fh.get_tensor(name))
