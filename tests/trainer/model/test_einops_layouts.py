"""The layouts written with einops (Qwen-VL's patchify, InternVL's pixel shuffle in the projector, LLaVA-NeXT's
newline tile, the GAC pooling's layer stack) give exactly what the index arithmetic they replaced gave: that
arithmetic is written out here as the reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from trainer.model.families.mrope import patchify
from trainer.model.projector import Projector


def patchify_by_permute(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> torch.Tensor:
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.unsqueeze(1).expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(b * gh * gw, c * temporal * patch * patch)


@pytest.mark.parametrize("patch, temporal, merge, side", [(14, 2, 2, 56), (16, 2, 2, 64), (4, 1, 1, 12)])
def test_patchify_is_the_permute_it_replaced(patch, temporal, merge, side):
    pixels = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    flat, grid = patchify(pixels, patch, temporal, merge)
    assert torch.equal(flat, patchify_by_permute(pixels, patch, temporal, merge))
    assert grid.tolist() == [[1, side // patch, side // patch]] * 3


def merged_by_view(x: torch.Tensor, k: int) -> torch.Tensor:
    b, n, d = x.shape
    g = int(round(n**0.5))
    return x.view(b, g // k, k, g // k, k, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (g // k) ** 2, k * k * d)


def tile_by_view(tokens: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    b, n, d = tokens.shape
    g = int(round(n**0.5))
    tile = torch.cat([tokens.view(b, g, g, d), newline.expand(b, g, 1, d)], dim=2).reshape(b, g * (g + 1), d)
    return torch.cat([tokens, tile], dim=1)


@pytest.mark.parametrize("merge, newline", [(2, False), (3, False), (1, True)])
def test_projector_layouts_are_the_views_they_replaced(merge, newline):
    torch.manual_seed(0)
    proj = Projector(5, 7, merge=merge, newline=newline)
    x = torch.randn(2, 36, 5)
    mlp = lambda t: proj.linear_2(proj.act(proj.linear_1(proj.layer_norm(t))))  # noqa: E731
    tokens = mlp(merged_by_view(x, merge) if merge > 1 else x)
    want = tile_by_view(tokens, proj.image_newline) if newline else tokens
    assert torch.equal(proj(x), want)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_gac_pooling_stacks_and_returns_layers_as_before(mode):
    layers = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weight, bias = torch.randn(3, 8), torch.randn(3, 8)
    got = kernels.multi_layer_pool_layernorm(layers, weight, bias, mode=mode, backend="torch")
    stacked = torch.stack([h[:, :1] for h in layers] if mode == "cls" else layers)
    x = stacked[:, :, 0] if mode == "cls" else stacked.mean(dim=2)
    y = torch.nn.functional.layer_norm(x, (8,)) * weight[:, None] + bias[:, None]
    torch.testing.assert_close(got, y.transpose(0, 1), rtol=1e-6, atol=1e-6)
