"""The interface every checkpoint family implements (docs/architecture.md, "Checkpoint families").

An I-FAS model is vision tower + connector + GAC + LLM. ``IFASModel``, the builder and the exporter hold no
family names: whatever differs between families is asked of the model's ``Family``:

- from a checkpoint's config: the ``ArchConfig`` fields it fixes (``arch``);
- building: the vision tower, the LLM, the family's own connector (``build_*``), image tokens per face;
- the forward: image tokens from the family's connector plus every vision layer's output for the GAC
  (``encode``), and what the family's LLM takes besides embeddings (``llm_inputs``: positions, extra
  features), also while generating (``generating``);
- its checkpoints' key layout (``prefixes``) and transformers class (``model_class``);
- the family-format export of a model without GAC: its config (``hf_config``), processor (``save_processor``),
  and what it cannot hold (``check_exportable``).

The defaults here are LLaVA's layout (a ViT with ``hidden_states``, an MLP projector on its patch features, a
causal LM reading ``inputs_embeds``). A new family is one module with a ``Family`` subclass and one line in the
registry (``trainer/model/families/__init__.py``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, NamedTuple

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from trainer.model.arch import ArchConfig, ModelLoadError, side
from trainer.model.projector import Projector

if TYPE_CHECKING:
    from trainer.model.ifas import IFASModel

# this project's state-dict prefixes -> the family class's (the first that matches wins)
HF_PREFIXES = (
    ("projector.image_newline", "model.image_newline"),  # LLaVA-NeXT/OneVision keep it beside the projector
    ("vision.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)


@dataclass(frozen=True)
class Release:
    """A Hub release a family covers, with its vision tower's shape (for the README's token counts)."""

    name: str
    vision: str
    image_size: int
    patch_size: int
    layers: int
    merge: int = 1  # patches per image token, per side (InternVL's pixel shuffle: 2)


class VisualFeatures(NamedTuple):
    tokens: torch.Tensor  # [B, N, D_llm]: the family connector's image tokens
    hidden_states: Sequence[torch.Tensor]  # the vision tower's embeddings + every layer's output, [B, n, Dv] each
    patches: torch.Tensor  # [B, Np, Dv]: the patch features the GAC cross-attends to
    llm_extra: Any = None  # what else the family's LLM takes (Qwen3-VL's deepstack features)


class NotFamilyCompatible(ValueError):
    """The model has parts its family's class cannot hold (GAC tokens, merged patches); the message says which."""


class Family:
    name: str = ""
    model_types: tuple[str, ...] = ()  # config.json model_type values
    model_class: str = ""  # the transformers class its checkpoints were saved from
    releases: tuple[Release, ...] = ()  # what it covers (README, "Checkpoint families")
    prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES  # I-FAS state-dict prefix -> the family class's
    # The family class's prefixes -> those of checkpoints saved before transformers 4.52 (the releases' own
    # files); transformers translates them back when loading (trainer/model/pretrained.py does the same).
    legacy_prefixes: tuple[tuple[str, str], ...] = ()
    # The image placeholder its processor falls back to when the tokenizer names none (None: it must be named).
    default_image_token: str | None = "<image>"
    projector_norm = False  # a LayerNorm before the projector's first linear
    features_from_output = False  # vision_feature_layer -1 is the encoder's output, after its final norm
    image_newline = False  # the face again as one tile, each row closed by a learned newline token

    # ----- from a checkpoint's config -----
    def arch(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             image_size: int | None) -> dict[str, Any]:
        """The ArchConfig fields a checkpoint of this family fixes (``image_size``: model.image_size)."""
        raise NotImplementedError

    # ----- building -----
    def build_vision(self, vision_config: PretrainedConfig, **kw: Any) -> nn.Module:
        return AutoModel.from_config(vision_config, **kw)

    def build_llm(self, text_config: PretrainedConfig, **kw: Any) -> nn.Module:
        return AutoModelForCausalLM.from_config(text_config, **kw)

    def vision_width(self, vision_config: PretrainedConfig) -> int:
        """The width of the vision layers' outputs (what the GAC reads)."""
        return vision_config.hidden_size

    def build_projector(self, vision_width: int, text_width: int, arch: ArchConfig) -> nn.Module | None:
        """The connector from patch features to LLM tokens (None: it is part of the vision tower)."""
        return Projector(vision_width, text_width, arch.projector_merge, self.projector_norm, self.image_newline)

    def image_token_counts(self, vision_config: PretrainedConfig, projector_merge: int, gac: bool,
                           gac_prefix_queries: int, image_size: int | None = None) -> tuple[int, int]:
        """(projector tokens, all image tokens) per face: one projector token per ``projector_merge`` x
        ``projector_merge`` patches (with ``image_newline`` twice, the second time with a newline token after each
        row), then the GAC's prefix queries and one token per vision layer. ``image_size``: the input size where the
        encoder has none of its own (Qwen-VL)."""
        grid = side(image_size or vision_config.image_size) // side(vision_config.patch_size)
        if grid % projector_merge:
            raise ModelLoadError(f"model.projector_merge={projector_merge} does not divide the {grid}x{grid} "
                                 "patch grid")
        rows = grid // projector_merge
        patches = rows * rows + (rows * (rows + 1) if self.image_newline else 0)
        return patches, patches + (gac_prefix_queries + vision_config.num_hidden_layers if gac else 0)

    # ----- the forward -----
    def encode(self, model: IFASModel, pixel_values: torch.Tensor) -> VisualFeatures:
        """Images [B, 3, S, S] through the vision tower and the family's connector."""
        arch = model.arch
        out = model.vision(pixel_values=pixel_values, output_hidden_states=True)
        last = self.features_from_output and arch.vision_feature_layer == -1
        patches = out.last_hidden_state if last else out.hidden_states[arch.vision_feature_layer]
        if arch.has_class_token:
            patches = patches[:, 1:]
        return VisualFeatures(model.projector(patches), out.hidden_states, patches)

    def llm_inputs(self, model: IFASModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_mask: torch.Tensor, visual: VisualFeatures) -> dict[str, Any]:
        """What the family's LLM takes beyond ``inputs_embeds`` and ``attention_mask``."""
        return {}

    def generating(self, model: IFASModel, llm_inputs: dict[str, Any],
                   generate_kwargs: Mapping[str, Any]) -> ContextManager[None]:
        """The context ``model.llm.generate`` runs in, for prompts with these ``llm_inputs``."""
        return contextlib.nullcontext()

    # ----- checkpoints and the family-format export -----
    def transformers_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)

    def checkpoint_prefixes(self) -> dict[str, str]:
        """The family class's prefixes -> I-FAS ones (how a checkpoint's tensors are placed)."""
        return {theirs: ours for ours, theirs in self.prefixes}

    def check_exportable(self, arch: Mapping[str, Any]) -> None:
        """Raise NotFamilyCompatible where the family's class has no place for a part of the model (``arch``:
        ifas_config.json's)."""
        if arch.get("gac"):
            raise NotFamilyCompatible(f"the model has a GAC, which {self.name} has no place for; train with "
                                      "model.gac=false to export in the family's format (or export in this "
                                      "project's format)")

    def hf_config(self, ifas_config: Mapping[str, Any]) -> PretrainedConfig:
        """The family's transformers config, equal in architecture to ``ifas_config`` (a model without GAC)."""
        raise NotImplementedError

    def save_processor(self, ifas_config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                       chat_template: str | None, directory: str | Path) -> None:
        """The family's processor for the model, preparing images as training did (trainer/data/transform.py);
        ``chat_template``: a processor-level template to keep (e.g. the base checkpoint's)."""
        raise NotImplementedError
