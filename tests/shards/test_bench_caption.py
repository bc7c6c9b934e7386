"""The FLOP count behind the captioning cost model (shards/bench/caption.py) against torch's own FLOP counter on the
tiny captioner's real prefill and decode step (eager attention, so the counter sees the attention matmuls)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText, AutoProcessor

from shards.bench.caption import captioner_flops, save_tiny_captioner
from shards.scf import captioner_prompt
from shards.schema import CAPTION_PROMPT


def test_captioner_flops_match_torch_flop_counter(tmp_path: Path) -> None:
    d = save_tiny_captioner(tmp_path, hidden=64, layers=2)
    model = AutoModelForImageTextToText.from_pretrained(d, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(d)
    inputs = processor(images=[Image.new("RGB", (32, 32))], text=[captioner_prompt(processor, CAPTION_PROMPT)],
                       return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with FlopCounterMode(display=False) as one:
            model(**inputs, logits_to_keep=1)
        with FlopCounterMode(display=False) as two:  # prefill, then one decode step attending over prompt + 1
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    prefill, per_token = captioner_flops(model, prompt, new_tokens=2)
    counted_prefill = one.get_total_flops()
    # the count also takes biases and norm weights at 2 FLOPs each (1-2% at this size, nothing at 7B)
    assert prefill == pytest.approx(counted_prefill, rel=0.03)
    assert per_token == pytest.approx(two.get_total_flops() - counted_prefill, rel=0.03)
