"""Model FLOPs of an I-FAS training step, for throughput and MFU reporting.

Counted the standard way (as in the PaLM/Megatron MFU definitions): every weight matrix costs
2 FLOPs per multiply-accumulate per token in the forward pass, attention scores and values
cost 2 * 2 * n * d per token per layer, and a training step costs 3x the forward (backward =
2x forward). Only matmuls are counted (norms, activations and softmax are negligible), which
is what ``torch.utils.flop_counter`` counts too, so the two can be compared in tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def linear_params(module: nn.Module) -> int:
    """Multiply-accumulates per token of every nn.Linear in ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def patch_embed_params(module: nn.Module) -> int:
    """Multiply-accumulates per patch of the conv patch embeddings in ``module`` (ViTs)."""
    return sum(m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
               for m in module.modules() if isinstance(m, nn.Conv2d))


def transformer_forward_flops(matmul_params: int, layers: int, hidden: int, tokens: int) -> float:
    """Forward FLOPs of one sequence: weights (2 * params * tokens) + attention (4 * L * n^2 * d)."""
    return 2.0 * matmul_params * tokens + 4.0 * layers * tokens * tokens * hidden


@dataclass
class StepFlops:
    vision: float
    connector: float
    llm: float
    lm_head: float

    @property
    def forward(self) -> float:
        return self.vision + self.connector + self.llm + self.lm_head

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def ifas_sample_flops(model, seq_len: int, supervised_tokens: int) -> StepFlops:
    """Forward FLOPs of one sample of ``seq_len`` LLM tokens with ``supervised_tokens`` labels
    (the LM head runs only on supervised positions and the score position)."""
    from trainer.model.arch import side

    vcfg, tcfg = model.vision.config, model.llm.config
    width = model.vision_width
    n_patches = (model.arch.image_size // side(vcfg.patch_size)) ** 2
    n_vision = n_patches + (1 if model.arch.has_class_token else 0)
    vision = transformer_forward_flops(linear_params(model.vision), vcfg.num_hidden_layers, width,
                                       n_vision) + 2.0 * patch_embed_params(model.vision) * n_patches
    # (Qwen-VL's merger is in the vision tower: counted there, per patch)
    connector = 2.0 * linear_params(model.projector) * model.num_patch_tokens if model.projector is not None else 0.0
    if model.gac is not None:
        q = model.gac.num_tokens
        gac_params = linear_params(model.gac) - model.gac.out_proj.in_features * model.gac.out_proj.out_features
        # queries run through the block; cross-attention keys/values project every patch
        kv = 2 * width * width * n_patches
        attn = 4.0 * q * q * width + 4.0 * q * n_patches * width
        connector += 2.0 * gac_params * q + 2.0 * kv + attn + 2.0 * model.gac.out_proj.in_features * \
            model.gac.out_proj.out_features * q
    head = model.llm.get_output_embeddings()
    llm = transformer_forward_flops(linear_params(model.llm.base_model), tcfg.num_hidden_layers, tcfg.hidden_size,
                                    seq_len)
    lm_head = 2.0 * head.in_features * head.out_features * (supervised_tokens + 1)
    return StepFlops(vision, connector, llm, lm_head)


def mfu(train_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    return train_flops_per_s / peak_flops_per_s
