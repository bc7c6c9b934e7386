"""The per-rank memory figures (trainer/training/memory.py): the README table is the code's output, and
the sizes it counts are transformers' own models plus the GAC."""
from __future__ import annotations

import torch

from tests.helpers import ROOT
from trainer.bench import tables
from trainer.training import memory


def test_the_readme_table_is_what_the_code_prints():
    assert tables.memory_table() in (ROOT / "README.md").read_text()


def test_model_states_per_parameter_follow_the_parameter_and_gradient_dtypes():
    bf16, fp32 = memory.StateDtypes("bf16", "fp32"), memory.StateDtypes("fp32", "fp32")
    assert memory.model_state_bytes(1000, 1, bf16) == 18_000
    assert memory.model_state_bytes(1000, 1, fp32) == 20_000
    assert memory.model_state_bytes(1000, 1, memory.StateDtypes("bf16", "bf16")) == 16_000
    assert memory.model_state_bytes(1001, 2, fp32) == 501 * 20  # a partition rounds up


def test_the_gradient_dtype_is_deepspeeds_grad_accum_dtype_else_the_parameters():
    import json

    assert memory.StateDtypes.of_deepspeed_config({"bf16": {"enabled": True}}) == memory.StateDtypes("bf16", "bf16")
    with_fp32 = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    assert memory.StateDtypes.of_deepspeed_config(with_fp32) == memory.StateDtypes("bf16", "fp32")
    for name in ("ds_zero3.json", "ds_zero3_7b.json", "ds_zero3_hpz.json", "ds_zero2.json"):  # the shipped ones
        shipped = json.loads((ROOT / "launch" / name).read_text())
        assert memory.StateDtypes.of_deepspeed_config({**shipped, "bf16": {"enabled": True}}).grads == "fp32", name


def test_the_7b_sizes_are_the_llava_model_plus_the_gac():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from trainer.model.gac import GloballyAwareConnector

    llava_size = tables.real_checkpoints()[0]
    vision, text = tables.checkpoint_configs()["llava-1.5-7b-hf"]
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))
        gac = GloballyAwareConnector(vision.hidden_size, vision.num_hidden_layers, text.hidden_size, 4, 4, "cls")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert llava_size.parameters == count(llava) + count(gac)
    assert 7.0e9 < count(llava) < 7.1e9  # llava-1.5-7b's published size
    assert llava_size.largest_tensor == 32064 * 4096  # its embedding (and LM head)
