"""Samples into batches: right-padded token tensors, stacked images, and the DataLoader that carries them
from the stream's reader workers to the training process."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data import DataLoader

from trainer.data.samples import Sample
from trainer.sample import IGNORE_INDEX, UNSUPERVISED
from trainer.sample.positions import supervised_rows

if TYPE_CHECKING:
    from trainer.data.stream import ShardStream


def collate(samples: list[Sample], pad_id: int) -> dict[str, Any]:
    """Right-pad token lists into tensors; keep keys/metadata as lists. The positions the model step needs
    (image tokens ``[B, K]``, supervised rows ``[R]``) are computed here, on the host, once per batch."""
    length = max(len(s["input_ids"]) for s in samples)

    def pad(name: str, value: int) -> torch.Tensor:
        return torch.tensor([s[name] + [value] * (length - len(s[name])) for s in samples], dtype=torch.long)

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": torch.tensor([[1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"]))
                                        for s in samples], dtype=torch.long),
        "labels": pad("labels", IGNORE_INDEX),
        "label_groups": pad("label_groups", UNSUPERVISED),
        "score_positions": torch.tensor([s["score_position"] for s in samples], dtype=torch.long),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "live": torch.tensor([s["live"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    batch["supervised_rows"] = supervised_rows(batch["labels"], batch["label_groups"])
    if all("image_positions" in s for s in samples):
        batch["image_positions"] = torch.tensor([s["image_positions"] for s in samples], dtype=torch.long)
    if "stream_pos" in samples[-1]:  # training streams: where the producing reader stands (a ReaderPosition)
        batch["stream_pos"] = samples[-1]["stream_pos"]
    return batch


def batch_rows(batch: dict[str, Any], keep: list[int] | slice) -> dict[str, Any]:
    """The samples ``keep`` of a collated batch (tensors and lists alike), its flat supervised rows recomputed
    (they index the whole batch's positions, so they cannot be sliced like the per-sample fields)."""
    picked = range(len(batch["keys"]))[keep] if isinstance(keep, slice) else keep
    out = {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in picked]) for k, v in batch.items()
           if k not in ("supervised_rows", "stream_pos")}
    out["supervised_rows"] = supervised_rows(out["labels"], out["label_groups"])
    return out


# Worker -> training process: every tensor crosses as its own shared-memory handle, and receiving
# one costs a socket handshake (~0.4 ms, measured). The integer tensors travel as one.
_TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "label_groups")  # [B, S] each
_SAMPLE_FIELDS = ("score_positions", "live")  # [B] each
_PACKED = _TOKEN_FIELDS + _SAMPLE_FIELDS + ("image_positions", "supervised_rows")


def _collate_packed(samples: list[Sample], pad_id: int) -> dict[str, Any]:
    batch = collate(samples, pad_id)
    fields = [k for k in _PACKED if k in batch]
    batch["packed_shape"] = [(k, tuple(batch[k].shape)) for k in fields]
    batch["packed_ints"] = torch.cat([batch.pop(k).reshape(-1) for k in fields])
    return batch


def _unpack(batch: dict[str, Any]) -> dict[str, Any]:
    ints = batch.pop("packed_ints")
    start = 0
    for name, shape in batch.pop("packed_shape"):
        n = torch.Size(shape).numel()
        batch[name] = ints[start:start + n].view(shape)
        start += n
    return batch


class BatchLoader:
    """The stream's DataLoader, yielding ``collate``'s batches (unpacked after the transfer)."""

    def __init__(self, stream: ShardStream, pad_id: int) -> None:
        # Pinned host memory lets the copy to the GPU overlap compute (model_inputs uses non_blocking).
        self.loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=stream.layout.num_workers,
                                 collate_fn=functools.partial(_collate_packed, pad_id=pad_id), drop_last=stream.train,
                                 pin_memory=torch.cuda.is_available(),
                                 prefetch_factor=4 if stream.layout.num_workers > 0 else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(_unpack, self.loader)


def make_loader(stream: ShardStream, pad_id: int) -> BatchLoader:
    return BatchLoader(stream, pad_id)
