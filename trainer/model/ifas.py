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
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from kernels import weighted_ce_reference
from trainer.model.arch import ArchConfig, ModelLoadError, default_dtype, recorded_attn_implementation, sub_config
from trainer.model.families import family_named
from trainer.model.families.base import VisualFeatures
from trainer.model.gac import GloballyAwareConnector
from trainer.model.loss import LossParts, batch_token_weights
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES, WeightsError, load_weights, verify_weights, write_weights
from trainer.run_dir import CONFIG_NAME
from trainer.sample import IGNORE_INDEX, UNSUPERVISED
from trainer.sample.pixels import normalise_pixels
from trainer.sample.positions import image_token_positions
from trainer.sample.positions import supervised_rows as flat_supervised_rows
from trainer.sample.tokenizer import IMAGE_TOKEN, load_tokenizer

log = logging.getLogger(__name__)


class IFASOutput(NamedTuple):
    loss: LossParts  # zeros when no labels were given
    scores: torch.Tensor  # [B] liveness score P(Yes) among {Yes, No}
    judgment_logits: torch.Tensor  # [B, 2] logits of Yes and No at the first answer position
    # [B, S] log-probability of each label (0 where unsupervised), when asked for (logprob_temperature)
    token_logprobs: torch.Tensor | None = None


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
        self.attn_implementation = attn_implementation  # recorded in the config: eval and predict use it too
        self.family = family_named(arch.family)  # what differs between checkpoint families (model/families/)
        made_in = group_context or (lambda group: contextlib.nullcontext())
        # the dtype in force here, not a checkpoint config's (from_config would build in config.dtype)
        built = dict(attn_implementation=attn_implementation, dtype=torch.get_default_dtype())
        with made_in("vision"):
            self.vision = self.family.build_vision(vision_config, **built)
        with made_in("llm"):
            self.llm = self.family.build_llm(text_config, **built)
        self.llm.tie_weights()  # a build that skips the random init skips transformers' tying too
        self.vision_width = vdim = self.family.vision_width(vision_config)
        tdim = text_config.hidden_size
        with made_in("projector"):
            self.projector = self.family.build_projector(vdim, tdim, arch)
        with made_in("gac"):
            self.gac = (
                GloballyAwareConnector(
                    vdim, vision_config.num_hidden_layers, tdim, arch.gac_prefix_queries, arch.gac_heads, arch.pooling
                )
                if arch.gac
                else None
            )
        self.num_patch_tokens, self.num_image_tokens = self.family.image_token_counts(
            vision_config, arch.projector_merge, arch.gac, arch.gac_prefix_queries, arch.image_size)
        self.head_loss: nn.Module | None = None  # fused LM head + L-LM loss, see use_kernels

    def use_kernels(self, fused_loss: bool, backend: str = "auto") -> None:
        """Compute the loss with the fused linear cross entropy (kernels/) instead of logits + CE, or not; run the
        kernels (GAC pooling, fused loss) on ``backend`` (model.kernel_backend). Call once the LM head is final
        (after any vocabulary resize) and before deepspeed.initialize."""
        if self.gac is not None:
            self.gac.backend = backend
        self.head_loss = None
        if fused_loss:
            from kernels import FusedLMHeadLoss

            self.head_loss = FusedLMHeadLoss(self.llm.get_output_embeddings(), ignore_index=IGNORE_INDEX,
                                             backend=backend)

    # ----- module groups (freezing, per-group learning rates) -----
    def module_groups(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"vision": self.vision, "llm": self.llm}
        if self.projector is not None:  # Qwen-VL's merger is part of its vision tower
            groups["projector"] = self.projector
        if self.gac is not None:
            groups["gac"] = self.gac
        return groups

    # ----- forward -----
    def image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, VisualFeatures]:
        """Images [B, 3, S, S] -> (their tokens [B, num_image_tokens, D_llm]: the family connector's, then the
        GAC's; the family's visual features)."""
        visual = self.family.encode(self, pixel_values)
        states = visual.hidden_states  # embeddings + one per layer
        if len(states) != self.vision.config.num_hidden_layers + 1:
            raise ValueError(f"the {self.vision.config.model_type} encoder returned {len(states)} hidden states "
                             f"for {self.vision.config.num_hidden_layers} layers; the GAC needs every layer's")
        tokens = visual.tokens
        if self.gac is not None:
            tokens = torch.cat([tokens, self.gac(states[1:], visual.patches)], dim=1)  # every layer's output
        return tokens, visual

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_positions: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, VisualFeatures]:
        """(the LLM's input embeddings, the image tokens in place of the placeholders; where those are; the
        family's visual features). ``image_positions`` [B, K]: the image tokens' positions, as the collate gives
        them (trainer/data/batching.py); without them they are found here, which reads the device."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values.dtype == torch.uint8:  # the loader's: normalised here, on the device
            pixel_values = normalise_pixels(pixel_values, self.arch.image_mean, self.arch.image_std)
        visual_tokens, visual = self.image_tokens(pixel_values.to(embeds.dtype))
        image_mask = input_ids == self.arch.image_token_id
        if image_positions is None:
            image_positions = image_token_positions(input_ids, self.arch.image_token_id)
        if image_positions.shape != visual_tokens.shape[:2]:
            raise ValueError(
                f"the batch holds {image_positions.shape[1]} {IMAGE_TOKEN} positions per sample but the images give "
                f"{visual_tokens.shape[1]} tokens each: build prompts with this model's num_image_tokens"
            )
        # a scatter at known positions: no data-dependent shape (masked_scatter's backward would read the mask)
        index = image_positions.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        return embeds.scatter(1, index, visual_tokens.to(embeds.dtype)), image_mask, visual

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
        image_positions: torch.Tensor | None = None,
        supervised_rows: torch.Tensor | None = None,
        logprob_temperature: float | None = None,
    ) -> IFASOutput:
        """Loss over the answer tokens (when labels are given) and liveness scores.

        pixel_values [B, 3, S, S]: uint8 (the loader's; normalised here) or already normalised floats.
        labels/label_groups [B, S] are aligned with input_ids (position t is predicted from t-1).
        score_positions [B]: index of the last prompt token, whose logits predict the judgment.
        n_judgment/n_interpretation: token counts of the global batch (see trainer.model.loss).
        image_positions [B, K] and supervised_rows [R] (trainer.sample.positions): where the image tokens and
        the supervised rows of the flattened positions are, computed by the collate so that nothing here reads
        the device (docs/architecture.md, "No host syncs in the step"); found here where not given.
        logprob_temperature: instead of the loss, the labels' log-probabilities under softmax(logits / T)
        (the GRPO stage's policy and reference terms, trainer/training/grpo/objective.py).
        """
        embeds, image_mask, visual = self.embed(input_ids, pixel_values, image_positions)
        extra = self.family.llm_inputs(self, input_ids, attention_mask, image_mask, visual)
        # use_cache=False: a training or scoring forward keeps no KV cache (building one reads the host)
        hidden = self.llm.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                                     **extra).last_hidden_state
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        score_hidden = hidden[batch, score_positions]
        judgment = (self.arch.yes_token_id, self.arch.no_token_id)
        if labels is not None and logprob_temperature is not None:
            return IFASOutput(None, None, None, self._label_logprobs(hidden, labels, logprob_temperature))
        if labels is not None:
            targets, groups = _next_token_targets(labels, label_groups)
            if supervised_rows is None:
                supervised_rows = flat_supervised_rows(labels, label_groups)
            weights = batch_token_weights(groups, alpha, n_judgment, n_interpretation)
        if labels is not None and self.head_loss is not None:
            # Every position goes in (a view, no copy) with the rows to read; the head is gathered once (under
            # ZeRO-3) for the judgment logits and the loss.
            loss, judgment_logits = self.head_loss(hidden.reshape(-1, hidden.shape[-1]), targets, weights, groups,
                                                   probe=(score_hidden, judgment), rows=supervised_rows)
            return IFASOutput(loss, torch.softmax(judgment_logits, dim=-1)[:, 0], judgment_logits)
        lm_head = self.llm.get_output_embeddings()
        logits = lm_head(score_hidden)
        judgment_logits = torch.stack([logits[:, judgment[0]], logits[:, judgment[1]]], dim=-1).float()
        scores = torch.softmax(judgment_logits, dim=-1)[:, 0]
        if labels is None:
            zero = judgment_logits.sum() * 0.0
            return IFASOutput(LossParts(zero, zero, zero), scores, judgment_logits)
        # only the answer positions reach the LM head: the full [B * S, V] logits are never made
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised_rows)
        loss = weighted_ce_reference(lm_head(h), targets[supervised_rows], weights[supervised_rows],
                                     groups[supervised_rows])
        return IFASOutput(loss, scores, judgment_logits)

    def _label_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        """[B, S] log p(labels[:, t] | ...) under softmax(logits / temperature), 0 where unsupervised; only
        the supervised positions reach the LM head."""
        pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
        targets = torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)  # position t predicts label t + 1
        supervised = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[supervised]).float()
        picked = torch.log_softmax(logits / temperature, dim=-1).gather(1, targets[supervised, None]).squeeze(1)
        flat = torch.zeros(targets.shape[0], dtype=picked.dtype, device=picked.device).masked_scatter(supervised,
                                                                                                      picked)
        return torch.cat([flat.new_zeros(labels.shape[0], 1), flat.view(labels.shape)[:, :-1]], dim=1)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs: Any
    ) -> torch.Tensor:
        """Generate answer tokens (judgment + explanation) for prompts; returns only new tokens. The image
        placeholder token is never generated (a sampled one would take an image token's place when the answer
        is fed back, e.g. in the GRPO update)."""
        generate_kwargs["suppress_tokens"] = sorted({*generate_kwargs.get("suppress_tokens", []),
                                                     self.arch.image_token_id})
        embeds, image_mask, visual = self.embed(input_ids, pixel_values, generate_kwargs.pop("image_positions", None))
        extra = self.family.llm_inputs(self, input_ids, attention_mask, image_mask, visual)
        with self.family.generating(self, extra, generate_kwargs):
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ----- saving and loading -----
    def config_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """ifas_config.json; ``dtype``: the weights' dtype, recorded for from_pretrained and ifas-export."""
        return {
            "architecture": "IFASModel",
            "vision_config": self.vision.config.to_dict(),
            "text_config": self.llm.config.to_dict(),
            "arch": dataclasses.asdict(self.arch),
            "attn_implementation": self.attn_implementation,
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
    def from_config_dict(cls, cfg: dict[str, Any], attn_implementation: str | None = None,
                         group_context: Callable[[str], contextlib.AbstractContextManager] | None = None
                         ) -> "IFASModel":
        """``attn_implementation``: default the config's (the training run's; sdpa where it cannot run here, or
        for configs written before it was recorded)."""
        if attn_implementation is None:
            recorded = cfg.get("attn_implementation", "sdpa")
            attn_implementation = recorded_attn_implementation(recorded, torch.get_default_dtype())
        return cls(
            sub_config(cfg["vision_config"]),
            sub_config(cfg["text_config"]),
            ArchConfig.from_dict(cfg["arch"]),
            attn_implementation,
            group_context,
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, attn_implementation: str | None = None, dtype: torch.dtype | None = None
    ) -> tuple["IFASModel", PreTrainedTokenizerBase]:
        """The model of an export directory, in ``dtype`` (default: the dtype its weights were saved in), with
        the attention kernel it was trained with (default, see from_config_dict)."""
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


def _next_token_targets(labels: torch.Tensor, label_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, groups) [B * S] aligned with the hidden states: position t predicts the label at t + 1; the
    last position predicts nothing."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    targets = torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)
    groups = torch.cat([label_groups[:, 1:], torch.full_like(pad, UNSUPERVISED)], dim=1).reshape(-1)
    return targets, groups
