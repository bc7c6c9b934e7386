"""Where a batch's supervised rows are, computed once per batch on the host (the loader's collate), so the
model's step reads no count or position back from the device (docs/architecture.md, "No host syncs in the
step")."""
from __future__ import annotations

import torch

from trainer.sample import IGNORE_INDEX, INTERPRETATION, JUDGMENT


def supervised_rows(labels: torch.Tensor, label_groups: torch.Tensor) -> torch.Tensor:
    """Flat indices into the ``[B * S]`` hidden states of the positions whose next token is supervised
    (position t predicts the label at t + 1; a judgment or interpretation token), ascending. Long ``[R]``."""
    b, s = labels.shape
    nxt, groups = labels[:, 1:], label_groups[:, 1:]
    supervised = (nxt != IGNORE_INDEX) & ((groups == JUDGMENT) | (groups == INTERPRETATION))
    rows, cols = supervised.nonzero(as_tuple=True)
    return rows * s + cols


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[B, K]`` positions of each row's image tokens, for batches that do not carry them (the model's
    ``generate``); reads the device. Raises where rows hold different numbers of them."""
    mask = input_ids == image_token_id
    counts = mask.sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"the rows of the batch hold different numbers of image tokens: {counts.tolist()}")
    return mask.nonzero(as_tuple=True)[1].view(input_ids.shape[0], -1)
