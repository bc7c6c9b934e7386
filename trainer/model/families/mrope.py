"""What the I-FAS model runs for the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families (trainer/model/families/qwen_vl.py
has the rest): the flattened patches their vision tower reads, and their LLM with 3-D rotary positions (and
Qwen3-VL's deepstack features).
docs/architecture.md, "Checkpoint families", says how each piece follows the family's own code."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import einops
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel


class MRopeCausalLM(PreTrainedModel, GenerationMixin):
    """The family's text model with its LM head, as a causal LM (transformers has the pair only inside the
    image-text class). Weight names as there: ``model.*`` (the text model) and ``lm_head.weight``. Each family
    uses a subclass naming its text model class (``text_model_class``; QwenVLFamily.build_llm makes it)."""

    text_model_class: type[nn.Module]
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # as the families' own PreTrainedModel declares
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer"]
    _supports_flash_attn = _supports_sdpa = _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = self.text_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._prompt: dict[str, Any] | None = None  # while generating: the prompt's positions and other inputs
        self.post_init()

    @contextlib.contextmanager
    def prompt_inputs(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Generate from a prompt with these inputs: ``position_ids`` [3, B, S] (and Qwen3-VL's deepstack
        features). The prompt is run with them, each new token one past the prompt's largest position, as
        the family's own generation does."""
        self._prompt = inputs
        try:
            yield
        finally:
            self._prompt = None

    def _generation_positions(self, seq_len: int, past: int) -> torch.Tensor:
        prompt = self._prompt["position_ids"]
        delta = prompt.amax(dim=(0, 2)) + 1 - prompt.shape[-1]  # [B]
        steps = torch.arange(past, past + seq_len, device=delta.device)
        return (steps[None, :] + delta[:, None]).unsqueeze(0).expand(3, -1, -1)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_ids: torch.Tensor | None = None, **kwargs: Any):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if self._prompt is not None:  # generating: generate()'s own 1-D positions would be wrong
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            if past == 0:  # the prompt
                kwargs.update({k: v for k, v in self._prompt.items() if k != "position_ids"})
                position_ids = self._prompt["position_ids"]
            else:
                seq_len = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
                position_ids = self._generation_positions(seq_len, past)
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)


def patchify(pixel_values: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, S, S] images -> (flattened patches [B * (S/patch)^2, 3 * temporal * patch^2], grid_thw [B, 3]),
    ordered as the family's image processor orders them: merge x merge blocks of patches, row by row."""
    b, _, h, w = pixel_values.shape
    gh, gw = h // patch, w // patch
    frames = einops.repeat(pixel_values, "b c h w -> b t c h w", t=temporal)  # a still image: the frame repeated
    # rows (y) and columns (x) of merge blocks, then each block's rows (my) and columns (mx) of patches, then one
    # patch's channels, frames and pixels (py, px)
    flat = einops.rearrange(frames, "b t c (y my py) (x mx px) -> (b y x my mx) (c t py px)",
                            my=merge, mx=merge, py=patch, px=patch)
    # filled on the device: a tensor built from a Python list would be a host-to-device copy in every step
    grid = torch.ones(b, 3, dtype=torch.long, device=pixel_values.device)
    grid[:, 1].fill_(gh)
    grid[:, 2].fill_(gw)
    return flat, grid


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, rows: int,
                    cols: int) -> torch.Tensor:
    """[3, B, S] M-RoPE positions of prompts holding one image of ``rows`` x ``cols`` merged tokens (its
    first ``rows * cols`` image tokens; later image tokens, the GAC's, are text). Padding gets 0. Computed
    on the device, without a host sync in the step."""
    n_image = rows * cols
    kept = attention_mask.long()
    j = kept.cumsum(dim=1) - 1  # index among the sequence's kept tokens
    first = j.gather(1, (input_ids == image_token_id).long().argmax(dim=1, keepdim=True))  # the image's start
    k = j - first  # offset from it
    in_image = (k >= 0) & (k < n_image)
    text = torch.where(k >= n_image, j - n_image + max(rows, cols), j)  # after the image: on from its largest
    t = torch.where(in_image, first, text)
    h = torch.where(in_image, first + k.clamp(min=0) // cols, text)
    w = torch.where(in_image, first + k.clamp(min=0) % cols, text)
    return torch.stack([t, h, w]) * kept
