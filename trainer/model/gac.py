"""Globally Aware Connector (GAC) of I-FAS (docs/architecture.md, "Method").

The per-layer global token g_l of every vision-encoder layer (class token, or mean over patches
for encoders without one) is layer-normalised and projected to queries Q_V; learnable prefix
queries Q_P are prepended; one block of self-attention, cross-attention to the patch features
and an MLP follows; the result is projected to the LLM width. Shallow layers carry texture cues
(moire, blur), deep layers semantics, so the LLM sees both.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import kernels


class GloballyAwareConnector(nn.Module):
    def __init__(
        self, vision_dim: int, num_layers: int, text_dim: int, num_prefix_queries: int, num_heads: int, pooling: str
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"GAC pooling must be cls or mean, got {pooling!r}")
        self.pooling = pooling
        self.backend = "auto"  # the pooling kernel's (model.kernel_backend; IFASModel.use_kernels sets it)
        self.num_layers = num_layers
        # One LayerNorm affine per tapped layer: layer statistics differ a lot with depth.
        self.pool_norm_weight = nn.Parameter(torch.ones(num_layers, vision_dim))
        self.pool_norm_bias = nn.Parameter(torch.zeros(num_layers, vision_dim))
        self.layer_proj = nn.Linear(vision_dim, vision_dim)
        self.prefix_queries = nn.Parameter(torch.randn(num_prefix_queries, vision_dim) * 0.02)
        self.norm_self = nn.LayerNorm(vision_dim)
        self.self_attn = nn.MultiheadAttention(vision_dim, num_heads, batch_first=True)
        self.norm_query = nn.LayerNorm(vision_dim)
        self.norm_patches = nn.LayerNorm(vision_dim)
        self.cross_attn = nn.MultiheadAttention(vision_dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(vision_dim)
        self.mlp = nn.Sequential(
            nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(), nn.Linear(4 * vision_dim, vision_dim)
        )
        self.out_proj = nn.Linear(vision_dim, text_dim)

    @property
    def num_tokens(self) -> int:
        return self.prefix_queries.shape[0] + self.num_layers

    def forward(
        self, layer_states: Sequence[torch.Tensor] | torch.Tensor, patch_features: torch.Tensor
    ) -> torch.Tensor:
        """layer_states: L tensors [B, N, Dv] (or one [L, B, N, Dv]), patch_features [B, Np, Dv] -> [B, P+L, Dt]."""
        pooled = kernels.multi_layer_pool_layernorm(
            layer_states, self.pool_norm_weight, self.pool_norm_bias, mode=self.pooling, backend=self.backend
        )  # [B, L, Dv]
        q_v = self.layer_proj(pooled)
        q_p = self.prefix_queries.unsqueeze(0).expand(q_v.shape[0], -1, -1)
        q = torch.cat([q_p, q_v], dim=1)
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_patches(patch_features)
        q = q + self.cross_attn(self.norm_query(q), kv, kv, need_weights=False)[0]
        q = q + self.mlp(self.norm_mlp(q))
        return self.out_proj(q)
