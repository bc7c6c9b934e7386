"""Shared fixtures: small synthetic shard sets and the demo tokenizer, built once per session."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
    from trainer.tokenizer import build_demo_tokenizer
    from trainer.train import read_captions

    return build_demo_tokenizer(read_captions(resolve_shards([str(d) for d in small_shards.values()])))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
