"""A toy checkpoint family added through the ``Family`` interface alone (docs/architecture.md, "Adding a family"):
nothing in trainer/ names it. Its checkpoints are LLaVA-shaped under their own ``model_type`` ("toy_vl"), and its
connector differs from every shipped family's: LLaVA's MLP on 2 x 2 average-pooled patches (a quarter of the
image tokens). The registry line is ``register(ToyFamily())``.

Run as a script it is launch/train.sh with the toy family registered (the ranks of a launched run must register
it too, as a plugin module would):

    deepspeed --num_gpus 2 tests/trainer/model/toy_family.py model.path=<toy checkpoint> ...
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from trainer.model.arch import ModelLoadError, side
from trainer.model.families import register
from trainer.model.families.base import Family

POOL = 2  # patches per image token, per side


class ToyVLConfig(LlavaConfig):
    model_type = "toy_vl"


class ToyVLForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = ToyVLConfig


AutoConfig.register("toy_vl", ToyVLConfig, exist_ok=True)


class PooledProjector(nn.Module):
    """LLaVA's projector (its parameter names, so its weights load) on average-pooled patches."""

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, d = patches.shape
        g = int(round(n**0.5))
        grid = patches.transpose(1, 2).reshape(b, d, g, g)
        pooled = F.avg_pool2d(grid, POOL).flatten(2).transpose(1, 2)  # [B, (g / POOL)^2, D]
        return self.linear_2(self.act(self.linear_1(pooled)))


class ToyFamily(Family):
    name = "toy_vl"
    model_types = ("toy_vl",)
    model_class = "ToyVLForConditionalGeneration"

    def arch(self, config, tokenizer, image_size):
        if image_size not in (None, config.vision_config.image_size):
            raise ModelLoadError("a toy_vl checkpoint runs at its encoder's size")
        return {"vision_feature_layer": config.vision_feature_layer, "projector_merge": 1}

    def transformers_class(self) -> type:
        return ToyVLForConditionalGeneration  # not in transformers' namespace

    def build_projector(self, vision_width, text_width, arch):
        return PooledProjector(vision_width, text_width)

    def image_token_counts(self, vision_config, projector_merge, gac, gac_prefix_queries, image_size=None):
        grid = side(image_size or vision_config.image_size) // side(vision_config.patch_size)
        patches = (grid // POOL) ** 2
        return patches, patches + (gac_prefix_queries + vision_config.num_hidden_layers if gac else 0)


def save_toy_checkpoint(directory: Path, tokenizer) -> ToyVLForConditionalGeneration:
    """A tiny random toy_vl checkpoint with its tokenizer (naming <image>, with a chat template) and CLIP's
    image processor."""
    from tests.helpers import save_image_processor  # here: this module also runs as the launcher's script

    torch.manual_seed(11)
    config = ToyVLConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=64, patch_size=16),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                tie_word_embeddings=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    model = ToyVLForConditionalGeneration(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_image_processor(directory, config.vision_config.image_size)
    return model


if __name__ == "__main__":
    register(ToyFamily())
    launcher = Path(__file__).resolve().parents[3] / "launch" / "train.sh"  # its Python part: the real entry
    sys.argv = [str(launcher), *sys.argv[1:]]
    runpy.run_path(str(launcher), run_name="__main__")
