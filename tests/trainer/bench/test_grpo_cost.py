"""The GRPO cost model's 7B projection (trainer/bench/grpo_cost.py) is the roofline its docstring states."""
from __future__ import annotations

import pytest

from trainer.bench.grpo_cost import HBM_GBS, MFU, NVLINK_GBS, PEAK, project_7b


def test_the_7b_projection_follows_its_roofline(tiny_model_dir):
    from trainer.model.ifas import IFASModel

    demo_image_tokens = IFASModel.from_pretrained(tiny_model_dir)[0].num_image_tokens
    measured = {"prompt_tokens": demo_image_tokens + 17, "answer_tokens": 24.0, "decode_steps": 34.0,
                "group_size": 8, "model": str(tiny_model_dir)}
    p = project_7b(measured, images_per_gpu=2)
    assert 7.5e9 < p["parameters"] < 8.5e9  # CLIP-L/336 + Qwen2-7B with the GAC
    # its own image tokens (576 patches at 336 px, GAC: 4 prefix queries + one per vision layer) + the template
    assert p["prompt_tokens"] == 576 + 4 + 24 + 17
    assert p["answers_per_gpu"] == 16
    assert p["update_s"] == pytest.approx(3 * p["reference_s"])  # backward = 2x forward, same sequences
    weights = 2.0 * p["parameters"]
    decode_floor = 34 * weights / (HBM_GBS * 1e9) + weights * 7 / 8 / (NVLINK_GBS * 1e9)
    assert p["generate_s"] > decode_floor  # every decode step reads the gathered weights once, plus the prefill
    assert p["reference_s"] == pytest.approx(16 * 2.0 * p["parameters"] * (p["prompt_tokens"] + 24) / (PEAK * MFU),
                                             rel=0.15)  # ~2 FLOPs per parameter per token
    longer = project_7b({**measured, "decode_steps": 68.0}, images_per_gpu=2)
    assert longer["generate_s"] - p["generate_s"] == pytest.approx(34 * weights / (HBM_GBS * 1e9), rel=1e-6)
