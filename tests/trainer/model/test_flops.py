"""FLOP counts of the MFU arithmetic against torch's own FLOP counter on real modules."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2Model

from trainer.config import ModelConfig
from trainer.model.build import build_model
from trainer.model.flops import ifas_sample_flops, linear_params, mfu, patch_embed_params, transformer_forward_flops


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_llm_forward_flops_match_torch_counter():
    cfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "eager"  # torch's counter sees eager attention's matmuls, not fused SDPA
    model = Qwen2Model(cfg).eval()
    ids = torch.randint(0, 100, (1, 50))
    with torch.no_grad():
        measured = counted(lambda: model(input_ids=ids))
    predicted = transformer_forward_flops(linear_params(model), 3, 64, 50)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_vision_forward_flops_match_torch_counter():
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16)
    cfg._attn_implementation = "eager"
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        measured = counted(lambda: model(pixel_values=torch.randn(1, 3, 64, 64)))
    predicted = transformer_forward_flops(linear_params(model), 2, 64, 17) + 2 * patch_embed_params(model) * 16
    assert predicted == pytest.approx(measured, rel=0.02)


def test_ifas_train_flops_match_torch_counter(demo_tokenizer):
    model, tok = build_model(ModelConfig(preset="tiny", projector_merge=2, attn_implementation="eager"), demo_tokenizer)
    from tests.trainer.model.test_ifas import make_batch

    batch = make_batch(model, tok, 1)
    seq = batch["input_ids"].shape[1]
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    names = ("input_ids", "attention_mask", "pixel_values", "score_positions", "labels", "label_groups")
    measured = counted(lambda: model(**{k: batch[k] for k in names}).loss.total.backward())
    predicted = ifas_sample_flops(model, seq, supervised).train
    assert predicted == pytest.approx(measured, rel=0.1)


def test_mfu_formula():
    assert mfu(395e12, 790e12) == pytest.approx(0.5)
