"""Shared fixtures: small synthetic shard sets and the demo tokenizer, built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch  # (importing torch does not import triton)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    # Triton decides interpreted-or-compiled when triton.language is first imported (any test may
    # import it through transformers/deepspeed): without a GPU, run the kernel tests interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> dict[str, Path]:
    """Four synthetic domains of 48 samples each, 16 samples per shard."""
    from shards.synth import ALL_DOMAINS, generate_demo

    out = tmp_path_factory.mktemp("shards")
    dirs = generate_demo(out, samples_per_domain=48, samples_per_shard=16, seed=0)
    return dict(zip(ALL_DOMAINS, dirs))


@pytest.fixture(scope="session")
def demo_tokenizer(small_shards):
    from trainer.data import resolve_shards
    from trainer.sample.tokenizer import build_demo_tokenizer
    from trainer.training.inputs import read_captions

    return build_demo_tokenizer(read_captions(resolve_shards([str(d) for d in small_shards.values()])))


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Run a kernel test on both paths; "triton" needs the test module's ``interpreted_triton``
    fixture (the Triton module re-imported in the CPU interpreter)."""
    if request.param == "triton":
        request.getfixturevalue("interpreted_triton")
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(small_shards, demo_tokenizer, tmp_path_factory) -> Path:
    """An exported-model directory with random weights (no training needed for plumbing tests)."""
    from trainer.config import ModelConfig
    from trainer.model.build import build_model

    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset="tiny", projector_merge=2), demo_tokenizer)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out, tok)
    return out
