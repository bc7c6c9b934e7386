"""Shared fixtures: small synthetic shard sets and the demo tokenizer, built once per session."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
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

from trainer.dist import free_port  # noqa: E402,F401  (re-exported for the tests: `from conftest import free_port`)

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")  # the launcher of this interpreter's install


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for launched runs: this venv's bin first on PATH, one thread per rank."""
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra)


def train_history(out: Path) -> dict[int, float]:
    """step -> logged loss of a finished run (train_result.json)."""
    return {h["step"]: h["loss"] for h in json.loads((out / "train_result.json").read_text())["history"]}


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


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """Run a kernel test on both paths; "triton" needs the test module's ``interpreted_triton``
    fixture (the Triton module re-imported in the CPU interpreter)."""
    if request.param == "triton":
        request.getfixturevalue("interpreted_triton")
    return request.param


@contextlib.contextmanager
def interpreted_triton_module(name: str, **overrides):
    """Re-import ``kernels.<name>`` under TRITON_INTERPRET=1 (the @triton.jit definitions are
    re-run, so the kernels execute on CPU tensors), with module constants overridden (e.g. tiny
    block sizes, so small test shapes still take several blocks and a masked tail). Restores the
    environment and the compiled module afterwards."""
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.reload(importlib.import_module(f"kernels.{name}"))
    saved = {key: getattr(module, key) for key in overrides}
    for key, value in overrides.items():
        setattr(module, key, value)
    try:
        yield module
    finally:
        for key, value in saved.items():
            setattr(module, key, value)
        if old_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        importlib.reload(module)


def assert_compiles_for_hopper(script: str, tmp_path: Path) -> None:
    """Run ``script`` (which compiles Triton kernels for sm_90 and prints "compiled") outside the
    interpreter. The interpreter is lenient about types; compiling the real kernels (no GPU
    needed: Triton ships ptxas) catches compiled-mode errors too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=110)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_model_dir(small_shards, demo_tokenizer, tmp_path_factory) -> Path:
    """An exported-model directory with random weights (no training needed for plumbing tests)."""
    from trainer.config import ModelConfig
    from trainer.model import build_model

    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset="tiny", projector_merge=2), demo_tokenizer)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out, tok)
    return out
