"""The projector from vision features to LLM tokens (LLaVA's MLP, with InternVL's patch merge and norm and
LLaVA-NeXT/OneVision's newline tokens as options): the same parameter names as those families' own
modules, so their weights load directly (trainer/model/families/)."""
from __future__ import annotations

import einops
import torch
from torch import nn


class Projector(nn.Module):
    """LLaVA's two-layer MLP projector (same parameter names, so LLaVA weights load directly).

    With ``merge`` k > 1, each k x k block of neighbouring patches is concatenated into one token
    first (as InternVL/Qwen2-VL do), so the LLM reads k^2 times fewer image tokens; the channels are
    concatenated row of the block first, exactly as InternVL's pixel shuffle orders them. ``norm``: a
    LayerNorm over the merged features first (InternVL's ``multi_modal_projector.layer_norm``).

    ``newline``: LLaVA-NeXT/OneVision's "anyres" image for a face: the whole image, then the image as its
    one tile, each row of tokens closed by the learned ``image_newline`` (what those models compute for a
    square image when the tile grid is 1 x 1; the tile's pixels are the whole image's, so the vision
    tower runs once).
    """

    def __init__(self, vision_dim: int, text_dim: int, merge: int = 1, norm: bool = False,
                 newline: bool = False) -> None:
        super().__init__()
        self.merge = merge
        self.layer_norm = nn.LayerNorm(vision_dim * merge * merge) if norm else nn.Identity()
        self.linear_1 = nn.Linear(vision_dim * merge * merge, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)
        self.image_newline = nn.Parameter(torch.randn(text_dim) / text_dim**0.5) if newline else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, Dv] patch features on a square grid -> [B, N / k^2, Dt]."""
        k = self.merge
        if k > 1:  # each k x k block of the patch grid: its rows (ky) of patches, then columns (kx), then channels
            g = int(round(x.shape[1] ** 0.5))
            x = einops.rearrange(x, "b (y ky x kx) d -> b (y x) (ky kx d)", y=g // k, x=g // k, ky=k, kx=k)
        tokens = self.linear_2(self.act(self.linear_1(self.layer_norm(x))))
        if self.image_newline is None:
            return tokens
        g = int(round(tokens.shape[1] ** 0.5))
        rows = einops.rearrange(tokens, "b (y x) d -> b y x d", y=g)
        newline = einops.repeat(self.image_newline.to(tokens.dtype), "d -> b y 1 d", b=tokens.shape[0], y=g)
        tile = einops.rearrange(torch.cat([rows, newline], dim=2), "b y x d -> b (y x) d")  # each row + a newline
        return torch.cat([tokens, tile], dim=1)
