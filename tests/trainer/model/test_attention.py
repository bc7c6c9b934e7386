"""One attention kernel for training, evaluation and prediction: chosen once (flash-attn only with bf16/fp16
weights), recorded in the model's config, and used by from_pretrained (docs/architecture.md, "Attention")."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from trainer.config import ConfigError, ModelConfig, RunConfig, validate
from trainer.model.arch import ModelLoadError, resolve_attn_implementation
from trainer.model.build import build_model
from trainer.model.ifas import IFASModel
from trainer.run_dir import CONFIG_NAME


def kernels_of(model: IFASModel) -> set[str]:
    return {model.llm.config._attn_implementation, model.vision.config._attn_implementation}


def test_flash_attention_needs_bf16_or_fp16():
    with pytest.raises(ModelLoadError, match="bf16 or fp16.*train.precision=bf16"):
        resolve_attn_implementation("flash_attention_2", torch.float32)
    cfg = RunConfig()
    cfg.model.attn_implementation, cfg.train.precision = "flash_attention_2", "fp32"
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2 runs only in bf16"):
        validate(cfg)
    # auto never picks flash-attn where it cannot run: here (no CUDA) and for fp32 weights anywhere
    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", torch.bfloat16) == ("flash_attention_2" if torch.cuda.is_available()
                                                                   and _has_flash() else "sdpa")


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def test_the_training_kernel_is_recorded_and_loaded_back(demo_tokenizer, tmp_path):
    model, tok = build_model(ModelConfig(preset="tiny", attn_implementation="eager"), demo_tokenizer)
    assert kernels_of(model) == {"eager"}
    model.save_pretrained(tmp_path, tok)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["attn_implementation"] == "eager"
    loaded, _ = IFASModel.from_pretrained(tmp_path)  # as ifas-eval and ifas-predict load it
    assert kernels_of(loaded) == {"eager"} and loaded.attn_implementation == "eager"


def test_a_flash_trained_model_is_scored_with_sdpa_and_a_warning_where_flash_cannot_run(demo_tokenizer, tmp_path,
                                                                                        caplog):
    model, tok = build_model(ModelConfig(preset="tiny"), demo_tokenizer)
    model.save_pretrained(tmp_path, tok)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "attn_implementation": "flash_attention_2"}))
    with caplog.at_level(logging.WARNING):
        loaded, _ = IFASModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert kernels_of(loaded) == {"sdpa"}
    assert "trained with flash_attention_2, which cannot run here" in caplog.text
