"""The I-FAS model: vision encoder + MLP projector + GAC + causal LLM, composed from transformers.

Image tokens (projected patch features) and GAC tokens replace the ``<image>`` placeholder
positions of the prompt. One forward returns the lopsided LM loss over the answer tokens and
the liveness score ``softmax([logit(Yes), logit(No)])[0]`` at the first answer position.

Weights come from (a) a local LLaVA-architecture checkpoint directory, (b) a vision-encoder
directory plus an LLM directory, or (c) a named tiny preset built offline. ``save_pretrained``
writes a directory (config, safetensors weights, tokenizer) that ``from_pretrained`` reads back.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from trainer.config import ModelConfig
from trainer.gac import GloballyAwareConnector
from trainer.loss import IGNORE_INDEX, LossParts, batch_token_weights, lopsided_lm_loss
from trainer.tokenizer import IMAGE_TOKEN, ensure_image_token, judgment_token_ids, load_tokenizer
from trainer.weights import WeightsError, load_weights, write_weights

log = logging.getLogger(__name__)

CONFIG_NAME = "ifas_config.json"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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


class IFASOutput(NamedTuple):
    loss: LossParts  # zeros when no labels were given
    scores: torch.Tensor  # [B] liveness score P(Yes) among {Yes, No}
    judgment_logits: torch.Tensor  # [B, 2] logits of Yes and No at the first answer position


def tiny_configs(preset: str, vocab_size: int) -> tuple[PretrainedConfig, PretrainedConfig]:
    """Named tiny configs built offline, for the demo and the tests."""
    from transformers import CLIPVisionConfig, Qwen2Config, SiglipVisionConfig

    vision_kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     image_size=128, patch_size=16)
    if preset == "tiny":
        vision = CLIPVisionConfig(**vision_kw)
    elif preset == "tiny-siglip":
        vision = SiglipVisionConfig(**vision_kw)
    else:
        raise ModelLoadError(f"unknown model preset {preset!r}; known presets: tiny, tiny-siglip")
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    return vision, text


def _has_class_token(vision_config: PretrainedConfig) -> bool:
    # CLIP-style ViTs prepend a class token; SigLIP and similar pool over patches instead.
    return "siglip" not in vision_config.model_type


class Projector(nn.Module):
    """LLaVA's two-layer MLP projector (same parameter names, so LLaVA weights load directly).

    With ``merge`` k > 1, each k x k block of neighbouring patches is concatenated into one token
    first (as InternVL/Qwen2-VL do), so the LLM reads k^2 times fewer image tokens.
    """

    def __init__(self, vision_dim: int, text_dim: int, merge: int = 1) -> None:
        super().__init__()
        self.merge = merge
        self.linear_1 = nn.Linear(vision_dim * merge * merge, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, Dv] patch features on a square grid -> [B, N / k^2, Dt]."""
        k = self.merge
        if k > 1:
            b, n, d = x.shape
            g = int(round(n ** 0.5))
            x = x.view(b, g // k, k, g // k, k, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (g // k) ** 2, k * k * d)
        return self.linear_2(self.act(self.linear_1(x)))


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
    ) -> None:
        super().__init__()
        self.arch = arch
        self.vision = AutoModel.from_config(vision_config, attn_implementation=attn_implementation)
        self.llm = AutoModelForCausalLM.from_config(text_config, attn_implementation=attn_implementation)
        vdim, tdim = vision_config.hidden_size, text_config.hidden_size
        self.projector = Projector(vdim, tdim, arch.projector_merge)
        self.gac = (
            GloballyAwareConnector(vdim, vision_config.num_hidden_layers, tdim, arch.gac_prefix_queries,
                                   arch.gac_heads, arch.pooling)
            if arch.gac else None
        )
        grid = vision_config.image_size // vision_config.patch_size
        if grid % arch.projector_merge:
            raise ModelLoadError(f"model.projector_merge={arch.projector_merge} does not divide the {grid}x{grid} patch grid")
        self.num_patch_tokens = (grid // arch.projector_merge) ** 2
        self.num_image_tokens = self.num_patch_tokens + (self.gac.num_tokens if self.gac is not None else 0)
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
        groups: dict[str, nn.Module] = {"vision": self.vision, "projector": self.projector, "llm": self.llm}
        if self.gac is not None:
            groups["gac"] = self.gac
        return groups

    # ----- forward -----
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> visual tokens [B, num_image_tokens, D_llm]."""
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        states = out.hidden_states  # embeddings + one per layer
        patches = states[self.arch.vision_feature_layer]
        if self.arch.has_class_token:
            patches = patches[:, 1:]
        tokens = self.projector(patches)
        if self.gac is not None:
            tokens = torch.cat([tokens, self.gac(states[1:], patches)], dim=1)  # every layer's output
        return tokens

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        visual = self.encode_images(pixel_values.to(embeds.dtype)).to(embeds.dtype)
        image_mask = input_ids == self.arch.image_token_id
        if int(image_mask.sum()) != visual.shape[0] * visual.shape[1]:
            raise ValueError(
                f"the batch holds {int(image_mask.sum())} {IMAGE_TOKEN} positions but the images give "
                f"{visual.shape[0]}x{visual.shape[1]} tokens: build prompts with this model's num_image_tokens"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual)

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
        n_judgment/n_interpretation: token counts of the global batch (see trainer.loss).
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        lm_head = self.llm.get_output_embeddings()
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        judgment_logits = lm_head(hidden[batch, score_positions])[:, [self.arch.yes_token_id, self.arch.no_token_id]]
        judgment_logits = judgment_logits.float()
        scores = torch.softmax(judgment_logits, dim=-1)[:, 0]
        if labels is None:
            zero = judgment_logits.sum() * 0.0
            return IFASOutput(LossParts(zero, zero, zero), scores, judgment_logits)
        targets = labels[:, 1:].reshape(-1)
        groups = label_groups[:, 1:].reshape(-1)
        supervised = targets != IGNORE_INDEX  # only answer positions reach the LM head
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[supervised]
        targets, groups = targets[supervised], groups[supervised]
        if self.head_loss is not None:
            weights = batch_token_weights(groups, alpha, n_judgment, n_interpretation)
            loss = self.head_loss(h, targets, weights, groups)
        else:
            loss = lopsided_lm_loss(lm_head(h), targets, groups, alpha, n_judgment, n_interpretation)
        return IFASOutput(loss, scores, judgment_logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Generate answer tokens (judgment + explanation) for prompts; returns only new tokens."""
        embeds = self.embed(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ----- saving and loading -----
    def config_dict(self) -> dict[str, Any]:
        return {
            "architecture": "IFASModel",
            "vision_config": self.vision.config.to_dict(),
            "text_config": self.llm.config.to_dict(),
            "arch": dataclasses.asdict(self.arch),
        }

    def save_pretrained(self, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config, weights (safetensors) and tokenizer; ``state_dict`` overrides the live weights
        (e.g. consolidated from a ZeRO-3 checkpoint)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            missing, unexpected = self.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise ModelLoadError(f"consolidated weights do not fit the model: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        write_weights(self, self.state_dict(), d)  # one safetensors file, or shards for big models
        (d / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], attn_implementation: str = "sdpa") -> "IFASModel":
        return cls(sub_config(cfg["vision_config"]), sub_config(cfg["text_config"]), ArchConfig(**cfg["arch"]),
                   attn_implementation)

    @classmethod
    def from_pretrained(cls, directory: str | Path, attn_implementation: str = "sdpa"
                        ) -> tuple["IFASModel", PreTrainedTokenizerBase]:
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise ModelLoadError(f"{d} is not an I-FAS model directory (no {CONFIG_NAME}); "
                                 f"export one with `ifas-export` or point to a training output's export/")
        model = cls.from_config_dict(json.loads((d / CONFIG_NAME).read_text()), attn_implementation)
        try:
            load_weights(model, d)  # model.safetensors, or shards + model.safetensors.index.json
        except WeightsError as exc:
            raise ModelLoadError(str(exc)) from exc
        return model, load_tokenizer(d)


# ----- building a model from the run config -----

def _image_processing(path: str | Path | None, image_size: int) -> dict[str, Any]:
    """Read normalisation from a preprocessor_config.json when the checkpoint has one."""
    info: dict[str, Any] = {"image_size": image_size, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    if path is not None and (Path(path) / "preprocessor_config.json").is_file():
        pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
        info["image_mean"] = list(pre.get("image_mean", info["image_mean"]))
        info["image_std"] = list(pre.get("image_std", info["image_std"]))
    return info


def _require_dir(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{key} {p} does not exist; give a local checkpoint directory (nothing is downloaded)")
    return p


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
                ) -> tuple[IFASModel, PreTrainedTokenizerBase]:
    """Build the model and tokenizer for a run: LLaVA dir, vision+LLM dirs, or a tiny preset.

    For the tiny preset the caller passes the (demo) tokenizer; for checkpoints it is read from
    ``cfg.tokenizer_path`` or the checkpoint directory.
    """
    arch_kw = dict(vision_feature_layer=cfg.vision_feature_layer, projector_merge=cfg.projector_merge, gac=cfg.gac,
                   gac_prefix_queries=cfg.gac_prefix_queries, gac_heads=cfg.gac_heads)
    pretrained: dict[str, nn.Module] = {}
    if cfg.llava_path:
        from transformers import LlavaForConditionalGeneration

        root = _require_dir(cfg.llava_path, "model.llava_path")
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_path or root)
        llava = LlavaForConditionalGeneration.from_pretrained(str(root), dtype=torch.float32)
        vision_config, text_config = llava.config.vision_config, llava.config.text_config
        arch_kw["vision_feature_layer"] = llava.config.vision_feature_layer
        if cfg.projector_merge != 1:
            raise ModelLoadError("model.projector_merge must be 1 with model.llava_path: LLaVA's projector reads single patches")
        image_info = _image_processing(root, vision_config.image_size)
        pretrained = {"vision": llava.model.vision_tower, "projector": llava.model.multi_modal_projector,
                      "llm.model": llava.model.language_model, "llm.lm_head": llava.lm_head}
    elif cfg.vision_path:
        vroot = _require_dir(cfg.vision_path, "model.vision_path")
        lroot = _require_dir(cfg.llm_path, "model.llm_path")
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_path or lroot)
        vcfg = AutoConfig.from_pretrained(str(vroot))
        vision_config = getattr(vcfg, "vision_config", vcfg)  # a full CLIP/SigLIP checkpoint holds one
        vision_cls = type(AutoModel.from_config(vision_config))
        vision = vision_cls.from_pretrained(str(vroot), dtype=torch.float32)
        llm = AutoModelForCausalLM.from_pretrained(str(lroot), dtype=torch.float32)
        text_config = llm.config
        image_info = _image_processing(vroot, vision_config.image_size)
        pretrained = {"vision": vision, "llm": llm}
    else:
        if tokenizer is None:
            raise ModelLoadError(f"model.preset={cfg.preset!r} needs a tokenizer (model.tokenizer_path or the demo BPE)")
        vision_config, text_config = tiny_configs(cfg.preset, len(tokenizer))
        image_info = _image_processing(None, vision_config.image_size)

    image_token_id = ensure_image_token(tokenizer)
    yes_id, no_id = judgment_token_ids(tokenizer)
    has_cls = _has_class_token(vision_config)
    pooling = cfg.pooling if cfg.pooling != "auto" else ("cls" if has_cls else "mean")
    if pooling == "cls" and not has_cls:
        raise ModelLoadError(f"model.pooling=cls but the {vision_config.model_type} encoder has no class token; use mean")
    arch = ArchConfig(image_token_id=image_token_id, yes_token_id=yes_id, no_token_id=no_id, pooling=pooling,
                      has_class_token=has_cls, **arch_kw, **image_info)
    model = IFASModel(vision_config, text_config, arch, resolve_attn_implementation(cfg.attn_implementation))
    for name, module in pretrained.items():
        target = model.get_submodule(name)
        target.load_state_dict(module.state_dict())
    if len(tokenizer) > model.llm.get_input_embeddings().num_embeddings:
        model.llm.resize_token_embeddings(len(tokenizer))
    for name in cfg.gradient_checkpointing:  # recompute layer activations in backward
        getattr(model, name).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def resolve_attn_implementation(requested: str) -> str:
    """``auto``: flash_attention_2 on CUDA when flash-attn is installed, else sdpa (works on CPU)."""
    if requested != "auto":
        return requested
    import importlib.util

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"
