"""The trainer on one GPU: a real DeepSpeed ZeRO-3 run in bf16 with the fused loss on and off (sdpa,
and flash-attn when installed), then export, ifas-eval and ifas-predict on the GPU against the
same commands on the CPU."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CUDA_ONLY, ROOT, launch_env
from tests.helpers import train_history as history
from tests.trainer.training.test_train_e2e import run_train

pytestmark = [*CUDA_ONLY, pytest.mark.timeout(600)]
STEPS = 20
ATTENTION = ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed"))]


def gpu_run(small_shards, out: Path, *overrides: str) -> dict[int, float]:
    run_train(small_shards, out, f"train.max_steps={STEPS}", f"train.save_every={STEPS}", "train.precision=bf16",
              *overrides, ranks=1)
    return history(out)


@pytest.fixture(scope="module")
def fused_sdpa_run(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_fused_sdpa")
    return out, gpu_run(small_shards, out, "model.fused_kernels=true", "model.attn_implementation=sdpa")


@pytest.mark.parametrize("attention", ATTENTION)
def test_zero3_bf16_fused_loss_matches_unfused(attention, fused_sdpa_run, small_shards, tmp_path):
    fused = (fused_sdpa_run[1] if attention == "sdpa" else
             gpu_run(small_shards, tmp_path / "fused", "model.fused_kernels=true",
                     f"model.attn_implementation={attention}"))
    unfused = gpu_run(small_shards, tmp_path / "unfused", "model.fused_kernels=false",
                      f"model.attn_implementation={attention}")
    assert sorted(fused) == sorted(unfused) == list(range(1, STEPS + 1))
    for step, loss in fused.items():
        assert loss == pytest.approx(unfused[step], rel=3e-2, abs=1e-2), step  # bf16: same curve, not same bits
    assert fused[STEPS] < fused[1]


def run_cli(module: str, *args: str, cpu: bool = False) -> subprocess.CompletedProcess:
    env = launch_env(**({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{module} {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_export_eval_and_predict_on_gpu_give_the_cpu_scores(fused_sdpa_run, small_shards, tmp_path):
    run, _ = fused_sdpa_run
    export = tmp_path / "export"
    run_cli("trainer.cli.export", str(run), "--out", str(export))
    held_out = f"held-out={small_shards['domain_d']}"
    scores = {}
    for where in ("gpu", "cpu"):
        run_cli("trainer.cli.eval", "--model", str(export), "--out", str(tmp_path / where), "--explain-samples",
                "0", held_out, cpu=where == "cpu")
        scores[where] = json.loads((tmp_path / where / "eval_scores.json").read_text())["held-out"]
        run_cli("trainer.cli.predict", "--model", str(export), "--no-explain", "--out",
                str(tmp_path / f"{where}.jsonl"), str(small_shards["domain_d"]), cpu=where == "cpu")
    assert scores["gpu"].keys() == scores["cpu"].keys() and len(scores["gpu"]) == 48
    for key, score in scores["gpu"].items():
        assert score == pytest.approx(scores["cpu"][key], abs=2e-3), key
    predicted = {where: [json.loads(ln)["score"] for ln in (tmp_path / f"{where}.jsonl").read_text().splitlines()]
                 for where in ("gpu", "cpu")}
    assert len(predicted["gpu"]) == 48
    assert predicted["gpu"] == pytest.approx(predicted["cpu"], abs=2e-3)
