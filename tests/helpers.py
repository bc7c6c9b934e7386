"""Helpers the tests share (import them: ``from tests.helpers import ...``); fixtures live in conftest.py."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The deepspeed launcher of this interpreter, as a module: works also where the packages were installed
# with pip --target and no console script is on PATH (launch/gpu_check.sh).
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
# The GPU tier (tests/cuda/): every test there is marked cuda and skips, saying why, without a GPU.
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for launched runs: this venv's bin first on PATH, one thread per rank."""
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra)


def dump_stacks(proc: subprocess.Popen, pause_s: float = 1.0) -> None:
    """Make every process of a launched run that dumps stacks on SIGUSR2 (ranks and loader workers:
    ``trainer.process.dump_stacks_on_signal``) print the Python stack of each of its threads to its output, one
    process every ``pause_s`` (they share the output: dumps at once would mix their lines); the others (launcher,
    fork server) would die of the signal and are left alone."""
    import psutil

    from trainer.process import STACK_DUMP_SIGNAL

    def dumps_stacks(pid: int) -> bool:
        try:
            caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        return bool(int(caught.split()[1], 16) >> (STACK_DUMP_SIGNAL - 1) & 1)

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            if dumps_stacks(child.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, STACK_DUMP_SIGNAL)
                time.sleep(pause_s)


def kill_hung_run(proc: subprocess.Popen, settle_s: float = 5.0) -> str:
    """Stop a launched run that hangs (started with ``start_new_session=True``) and return its output, which ends
    with the stacks ``dump_stacks`` had its processes print."""
    dump_stacks(proc)
    time.sleep(settle_s)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def tensorboard_events(logdir: Path):
    """TensorBoard's own event reader over ``logdir``, loaded (every scalar, image and tensor kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def save_image_processor(directory: Path, image_size: int, siglip: bool = False) -> None:
    """The image processor a LLaVA-style release ships beside its weights (preprocessor_config.json), saved with
    transformers' own class: CLIP's resize-and-crop and mean/std (llava-1.5), or SigLIP's plain resize to the
    tower's size with mean/std 0.5 (llava-interleave). A checkpoint without one is refused at --check."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    if siglip:
        SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    else:
        CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              resample=Image.BICUBIC).save_pretrained(directory)


def train_history(out: Path) -> dict[int, float]:
    """step -> logged loss of a finished run (train_result.json)."""
    return {h["step"]: h["loss"] for h in json.loads((out / "train_result.json").read_text())["history"]}


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


def assert_export_scores_equal_the_runs(exported: Path, run_dir: Path, shard_set: Path) -> None:
    """The export, reloaded by IFASModel.from_pretrained, scores ``shard_set`` as the trained engine did
    in the run's evaluation (eval_scores.json, set "held-out")."""
    from trainer.data import ImageTransform, make_loader, resolve_shards
    from trainer.eval.scoring import PROMPT_ONLY_MAX_LENGTH
    from trainer.model.ifas import IFASModel
    from trainer.sample.prompt import PromptBuilder

    model, tok = IFASModel.from_pretrained(exported)
    model.eval()
    expected = json.loads((run_dir / "eval_scores.json").read_text())["held-out"]
    builder = PromptBuilder(tok, model.num_image_tokens, PROMPT_ONLY_MAX_LENGTH, image_span=model.arch.image_span)
    transform = ImageTransform.for_model(model.arch)
    stream = shard_stream(resolve_shards([str(shard_set)]), builder, transform=transform, batch_size=16, train=False,
                          with_answers=False)
    got = {}
    with torch.no_grad():
        for batch in make_loader(stream, tok.pad_token_id):
            scores = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                    "score_positions")}).scores
            got.update(zip(batch["keys"], scores.tolist()))
    assert got.keys() == expected.keys()
    for key, score in got.items():
        assert score == pytest.approx(expected[key], abs=1e-5), key


def shard_stream(urls, builder, *, size: int = 32, transform=None, rank: int = 0, world: int = 1, workers: int = 0,
                 with_answers: bool = True, caption_source: str = "shards", augment=None, held_out=None, **options):
    """A ``ShardStream`` of ``urls`` with ``builder``'s prompts, images at ``size`` (mean/std 0.5) unless a
    ``transform`` is given; ``options``: the stream's own (batch_size, seed, shuffle_buffer, train, resume, sources)."""
    from trainer.data import ImageTransform, SampleMaker, ShardStream, StreamLayout

    samples = SampleMaker(builder, transform or ImageTransform(size, [0.5] * 3, [0.5] * 3), with_answers,
                          caption_source, augment, held_out, options.get("seed", 0))
    return ShardStream(urls, samples, StreamLayout(rank, world, workers), **options)
