"""The I-FAS model: vision encoder + MLP projector + GAC + causal LLM, composed from transformers.

Image tokens (projected patch features) and GAC tokens replace the ``<image>`` placeholder
positions of the prompt. One forward returns the lopsided LM loss over the answer tokens and
the liveness score ``softmax([logit(Yes), logit(No)])[0]`` at the first answer position.

``trainer.model.build`` makes one for a run (from checkpoints or a tiny preset); ``save_pretrained``
writes a model directory (config, safetensors weights, tokenizer) that ``from_pretrained`` reads back,
and ``ifas-export`` writes the same directory from a ZeRO-3 checkpoint (trainer/model/export.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from trainer.model import mrope
from trainer.model.gac import GloballyAwareConnector
from trainer.model.loss import IGNORE_INDEX, LossParts, batch_token_weights, lopsided_lm_loss
from trainer.model.projector import Projector
from trainer.model.tokenizer import IMAGE_TOKEN, load_tokenizer
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES, WeightsError, load_weights, verify_weights, write_weights
from trainer.run_dir import CONFIG_NAME

log = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are ``dtype`` (a model built straight in bf16: no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelLoadError(ValueError):
    """A model directory is missing or malformed; the message names the path."""


@dataclass
class ArchConfig:
    """What IFASModel needs beyond the vision and text configs; saved in ifas_config.json."""

    image_token_id: int
    yes_token_id: int
    no_token_id: int
    vision_feature_layer: int = -2
    projector_merge: int = 1  # k: each image token merges k x k neighbouring patches
    pooling: str = "cls"
    has_class_token: bool = True
    gac: bool = True
    gac_prefix_queries: int = 4
    gac_heads: int = 4
    image_size: int = 128
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    # What the checkpoint family fixes (trainer/model/families.py; the defaults are LLaVA's and the demo's):
    family: str = "llava"
    projector_norm: bool = False  # a LayerNorm before the projector's first linear (InternVL)
    features_from_output: bool = False  # vision_feature_layer -1 is the encoder's output, after its final norm
    image_span: list[str] = field(default_factory=lambda: ["", ""])  # tokens around the image tokens (<img>, </img>)
    image_newline: bool = False  # LLaVA-NeXT/OneVision: the face again as one tile, each row closed by a newline
    family_extra: dict[str, int] = field(default_factory=dict)  # token ids the family-format export needs


def image_token_counts(vision_config: PretrainedConfig, projector_merge: int, gac: bool,
                       gac_prefix_queries: int, image_newline: bool = False,
                       image_size: int | None = None) -> tuple[int, int]:
    """(projector tokens, all image tokens) per image of an I-FAS model on this vision encoder:
    one projector token per ``projector_merge`` x ``projector_merge`` patches (with ``image_newline``
    twice, the second time with a newline token after each row: Projector), then the GAC's prefix
    queries and one token per vision layer (model/gac.py). ``image_size``: the input size where the
    encoder has none of its own (Qwen-VL)."""
    grid = side(image_size or vision_config.image_size) // side(vision_config.patch_size)
    if grid % projector_merge:
        raise ModelLoadError(f"model.projector_merge={projector_merge} does not divide the {grid}x{grid} patch grid")
    rows = grid // projector_merge
    patches = rows * rows + (rows * (rows + 1) if image_newline else 0)
    return patches, patches + (gac_prefix_queries + vision_config.num_hidden_layers if gac else 0)


def side(size: int | list[int] | tuple[int, ...]) -> int:
    """The side of a square image or patch size (InternVL's configs give [height, width])."""
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise ModelLoadError(f"only square images and patches are supported, the config gives {list(size)}")
    return int(size[0])


def check_native_size(config: PretrainedConfig, image_size: int | None) -> None:
    """model.image_size may only repeat the size a family's encoder was trained at (Qwen-VL has none)."""
    native = side(config.vision_config.image_size)
    if image_size not in (None, native):
        raise ModelLoadError(f"model.image_size={image_size}: a {config.model_type} checkpoint runs at its encoder's "
                             f"{native} x {native}; leave model.image_size unset (it is for Qwen-VL checkpoints)")


class IFASOutput(NamedTuple):
    loss: LossParts  # zeros when no labels were given
    scores: torch.Tensor  # [B] liveness score P(Yes) among {Yes, No}
    judgment_logits: torch.Tensor  # [B, 2] logits of Yes and No at the first answer position


def sub_config(saved: dict[str, Any]) -> PretrainedConfig:
    """A vision or text config from its ``to_dict()`` (as saved in ifas_config.json)."""
    saved = dict(saved)
    return AutoConfig.for_model(saved.pop("model_type"), **saved)


class IFASModel(nn.Module):
    def __init__(
        self,
        vision_config: PretrainedConfig,
        text_config: PretrainedConfig,
        arch: ArchConfig,
        attn_implementation: str = "sdpa",
        group_context: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """``group_context(group)``: the context each module group (vision, llm, projector, gac) is
        built in; trainer/model/build.py uses it to build checkpoint-loaded groups partitioned and
        without random init."""
        super().__init__()
        self.arch = arch
        made_in = group_context or (lambda group: contextlib.nullcontext())
        # the dtype in force here, not a checkpoint config's (from_config would build in config.dtype)
        dtype = torch.get_default_dtype()
        self.mrope = arch.family in mrope.MROPE_FAMILIES  # Qwen-VL: merger in the vision tower, 3-D positions
        built = dict(attn_implementation=attn_implementation, dtype=dtype)
        with made_in("vision"):
            self.vision = (mrope.build_vision(vision_config, **built) if self.mrope
                           else AutoModel.from_config(vision_config, **built))
        with made_in("llm"):
            self.llm = (mrope.MRopeCausalLM._from_config(text_config, **built) if self.mrope
                        else AutoModelForCausalLM.from_config(text_config, **built))
        self.llm.tie_weights()  # a build that skips the random init skips transformers' tying too
        self.vision_width = vdim = mrope.vision_width(vision_config) if self.mrope else vision_config.hidden_size
        tdim = text_config.hidden_size
        with made_in("projector"):
            self.projector = None if self.mrope else Projector(vdim, tdim, arch.projector_merge, arch.projector_norm,
                                                               arch.image_newline)
        with made_in("gac"):
            self.gac = (
                GloballyAwareConnector(
                    vdim, vision_config.num_hidden_layers, tdim, arch.gac_prefix_queries, arch.gac_heads, arch.pooling
                )
                if arch.gac
                else None
            )
        self.num_patch_tokens, self.num_image_tokens = image_token_counts(
            vision_config, arch.projector_merge, arch.gac, arch.gac_prefix_queries, arch.image_newline,
            arch.image_size)
        self.head_loss: nn.Module | None = None  # fused LM head + L-LM loss, see use_fused_loss

    def use_fused_loss(self, enabled: bool) -> None:
        """Compute the loss with the fused linear cross entropy (kernels/) instead of logits + CE.
        Call once the LM head is final (after any vocabulary resize) and before deepspeed.initialize."""
        if not enabled:
            self.head_loss = None
            return
        from kernels import FusedLMHeadLoss

        self.head_loss = FusedLMHeadLoss(self.llm.get_output_embeddings(), ignore_index=IGNORE_INDEX)

    # ----- module groups (freezing, per-group learning rates) -----
    def module_groups(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"vision": self.vision, "llm": self.llm}
        if self.projector is not None:  # Qwen-VL's merger is part of its vision tower
            groups["projector"] = self.projector
        if self.gac is not None:
            groups["gac"] = self.gac
        return groups

    # ----- forward -----
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> visual tokens [B, num_image_tokens, D_llm]."""
        return self._encode(pixel_values)[0]

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(visual tokens, Qwen3-VL's deepstack features [B, num_patch_tokens, D_llm] for its first LLM layers;
        none for the other families)."""
        if self.mrope:
            return self._encode_images_mrope(pixel_values)
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        states = out.hidden_states  # embeddings + one per layer
        last = self.arch.features_from_output and self.arch.vision_feature_layer == -1
        patches = out.last_hidden_state if last else states[self.arch.vision_feature_layer]
        if self.arch.has_class_token:
            patches = patches[:, 1:]
        return self._with_gac(self.projector(patches), states, patches), []

    def _with_gac(self, tokens: torch.Tensor, states: tuple[torch.Tensor, ...], patches: torch.Tensor) -> torch.Tensor:
        if len(states) != self.vision.config.num_hidden_layers + 1:
            raise ValueError(f"the {self.vision.config.model_type} encoder returned {len(states)} hidden states "
                             f"for {self.vision.config.num_hidden_layers} layers; the GAC needs every layer's")
        if self.gac is not None:
            tokens = torch.cat([tokens, self.gac(states[1:], patches)], dim=1)  # every layer's output
        return tokens

    def _encode_images_mrope(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Qwen-VL: flattened patches and their grid in, the merger's tokens out; the blocks' outputs
        (flattened over the batch) for the GAC."""
        vc = self.vision.config
        flat, grid = mrope.patchify(pixel_values, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
        out = self.vision(flat, grid_thw=grid, output_hidden_states=True)
        b = pixel_values.shape[0]
        states = tuple(h.reshape(b, -1, h.shape[-1]) for h in out.hidden_states)
        deepstack = [f.reshape(b, -1, f.shape[-1]) for f in getattr(out, "deepstack_features", None) or []]
        tokens = out.pooler_output.reshape(b, -1, out.pooler_output.shape[-1])
        return self._with_gac(tokens, states, states[-1]), deepstack

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The LLM's position ids: Qwen-VL's 3-D ones (trainer/model/mrope.py); None (1-D) otherwise."""
        if not self.mrope:
            return None
        rows = self.arch.image_size // self.vision.config.patch_size // self.arch.projector_merge
        return mrope.mrope_positions(input_ids, attention_mask, self.arch.image_token_id, rows, rows)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids, pixel_values)[0]

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(the LLM's input embeddings, the image tokens in place of the placeholders; where those are;
        deepstack features)"""
        embeds = self.llm.get_input_embeddings()(input_ids)
        visual, deepstack = self._encode(pixel_values.to(embeds.dtype))
        image_mask = input_ids == self.arch.image_token_id
        if int(image_mask.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError(
                f"the batch holds {int(image_mask.sum())} {IMAGE_TOKEN} positions but the images give "
                f"{visual.shape[0]}x{visual.shape[1]} tokens: build prompts with this model's num_image_tokens"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype)), image_mask, deepstack

    def _llm_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                    deepstack: list[torch.Tensor]) -> dict[str, Any]:
        """What the family's LLM takes beyond embeddings and mask: Qwen-VL's 3-D positions; Qwen3-VL's
        deepstack features, added at the projector's image tokens (not the GAC's) in its first layers."""
        if not self.mrope:
            return {}
        extra: dict[str, Any] = {"position_ids": self.positions(input_ids, attention_mask)}
        if deepstack:
            extra["visual_pos_masks"] = image_mask & (image_mask.cumsum(dim=1) <= self.num_patch_tokens)
            extra["deepstack_visual_embeds"] = [f.reshape(-1, f.shape[-1]) for f in deepstack]
        return extra

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        score_positions: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_groups: torch.Tensor | None = None,
        alpha: float = 0.7,
        n_judgment: float | None = None,
        n_interpretation: float | None = None,
    ) -> IFASOutput:
        """Loss over the answer tokens (when labels are given) and liveness scores.

        labels/label_groups [B, S] are aligned with input_ids (position t is predicted from t-1).
        score_positions [B]: index of the last prompt token, whose logits predict the judgment.
        n_judgment/n_interpretation: token counts of the global batch (see trainer.model.loss).
        """
        embeds, image_mask, deepstack = self._embed(input_ids, pixel_values)
        extra = self._llm_kwargs(input_ids, attention_mask, image_mask, deepstack)
        hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, **extra).last_hidden_state
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        score_hidden = hidden[batch, score_positions]
        judgment = torch.tensor([self.arch.yes_token_id, self.arch.no_token_id], device=hidden.device)
        if labels is not None and self.head_loss is not None:
            # one gather of the head (under ZeRO-3) for the judgment logits and the loss
            targets, groups, h = self._supervised(hidden, labels, label_groups)
            weights = batch_token_weights(groups, alpha, n_judgment, n_interpretation)
            loss, judgment_logits = self.head_loss(h, targets, weights, groups, probe=(score_hidden, judgment))
            return IFASOutput(loss, torch.softmax(judgment_logits, dim=-1)[:, 0], judgment_logits)
        lm_head = self.llm.get_output_embeddings()
        judgment_logits = lm_head(score_hidden)[:, judgment].float()
        scores = torch.softmax(judgment_logits, dim=-1)[:, 0]
        if labels is None:
            zero = judgment_logits.sum() * 0.0
            return IFASOutput(LossParts(zero, zero, zero), scores, judgment_logits)
        targets, groups, h = self._supervised(hidden, labels, label_groups)
        loss = lopsided_lm_loss(lm_head(h), targets, groups, alpha, n_judgment, n_interpretation)
        return IFASOutput(loss, scores, judgment_logits)

    @staticmethod
    def _supervised(hidden: torch.Tensor, labels: torch.Tensor, label_groups: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, groups, hidden states) of the answer positions: only they reach the LM head."""
        targets = labels[:, 1:].reshape(-1)
        groups = label_groups[:, 1:].reshape(-1)
        supervised = targets != IGNORE_INDEX
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[supervised]
        return targets[supervised], groups[supervised], h

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs: Any
    ) -> torch.Tensor:
        """Generate answer tokens (judgment + explanation) for prompts; returns only new tokens."""
        embeds, image_mask, deepstack = self._embed(input_ids, pixel_values)
        if not self.mrope:
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        if generate_kwargs.get("num_beams", 1) > 1 or generate_kwargs.get("num_return_sequences", 1) > 1 or \
                generate_kwargs.get("use_cache") is False:
            raise ValueError("Qwen-VL generation here runs one sequence per prompt with the KV cache (no num_beams, "
                             "num_return_sequences or use_cache=False): its 3-D positions are kept per prompt")
        with self.llm.prompt_inputs(self._llm_kwargs(input_ids, attention_mask, image_mask, deepstack)):
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ----- saving and loading -----
    def config_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """ifas_config.json; ``dtype``: the weights' dtype, recorded for from_pretrained and ifas-export."""
        return {
            "architecture": "IFASModel",
            "vision_config": self.vision.config.to_dict(),
            "text_config": self.llm.config.to_dict(),
            "arch": dataclasses.asdict(self.arch),
            **({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}),  # getattr(torch, ..)
        }

    def save_pretrained(
        self,
        directory: str | Path,
        tokenizer: PreTrainedTokenizerBase | None = None,
        tensors: Mapping[str, Any] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Write the model directory ``from_pretrained`` reads: config, safetensors weights (one file, or
        shards + index above ``max_shard_size``) and tokenizer, then read the weights back to check them.

        ``tensors`` replaces the live weights, tensor by tensor (e.g. DeepSpeed's lazy consolidation of
        a ZeRO-3 checkpoint); then ``self`` may be a skeleton on the meta device: only its names,
        shapes and tied weights are read. ``dtype``: the weights' dtype on disk (default: theirs), recorded
        in the config as the dtype ``from_pretrained`` loads. The one writer of model directories."""
        d = Path(directory)
        source = self.state_dict() if tensors is None else tensors
        dtype = dtype or next(iter(source.values())).dtype
        write_weights(self, source, d, max_shard_size, dtype)
        (d / CONFIG_NAME).write_text(json.dumps(self.config_dict(dtype), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))
        verify_weights(self, d)  # every tensor present once, with the model's shapes
        return d

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], attn_implementation: str = "sdpa",
                         group_context: Callable[[str], contextlib.AbstractContextManager] | None = None
                         ) -> "IFASModel":
        return cls(
            sub_config(cfg["vision_config"]),
            sub_config(cfg["text_config"]),
            ArchConfig(**cfg["arch"]),
            attn_implementation,
            group_context,
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None
    ) -> tuple["IFASModel", PreTrainedTokenizerBase]:
        """The model of an export directory, in ``dtype`` (default: the dtype its weights were saved in)."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise ModelLoadError(
                f"{d} is not an I-FAS model directory (no {CONFIG_NAME}); "
                f"export one with `ifas-export` or point to a training output's export/"
            )
        config = json.loads((d / CONFIG_NAME).read_text())
        with default_dtype(dtype or getattr(torch, config.get("dtype", "float32"))):
            # every weight is read from the files: no random init (minutes at 7B)
            model = cls.from_config_dict(config, attn_implementation, group_context=lambda group: no_init_weights())
        try:
            load_weights(model, d)  # model.safetensors, or shards + model.safetensors.index.json
        except WeightsError as exc:
            raise ModelLoadError(str(exc)) from exc
        return model, load_tokenizer(d)
