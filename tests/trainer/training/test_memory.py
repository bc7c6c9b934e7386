"""The per-rank memory figures (trainer/training/memory.py): the README table is the code's output, and
the sizes it counts are transformers' own models plus the GAC."""
from __future__ import annotations

import torch

from tests.helpers import ROOT
from trainer.bench import tables
from trainer.training import memory


def test_the_readme_table_is_what_the_code_prints():
    assert tables.memory_table() in (ROOT / "README.md").read_text()


def test_model_states_are_18_bytes_per_parameter_in_bf16_and_20_in_fp32_split_over_the_ranks():
    assert memory.model_state_bytes(1000, 1, "bf16") == 18_000
    assert memory.model_state_bytes(1000, 1, "fp32") == 20_000
    assert memory.model_state_bytes(1001, 2, "fp32") == 501 * 20  # a partition rounds up


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
