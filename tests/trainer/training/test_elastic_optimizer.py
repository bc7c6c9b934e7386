"""Correct after every restart (2 CPU ranks, ZeRO-3, the real launcher):

- a resume at another world size restores AdamW exactly as a resume at the old one does: each ZeRO-3 sub-group's
  step, every parameter's moments gathered to full tensors, every parameter group's own hyperparameters (two
  lr_scale values, a frozen module), and the next update (DeepSpeed 0.19.8's universal loader alone shares one
  step tensor among the sub-groups and gives every group group 0's settings: docs/architecture.md "Known traps");
- the conversion to the universal form may take longer than train.collective_timeout_s: no rank waits for it in
  a collective;
- the engine's gradient partitions are held in the dtype and bytes trainer/training/memory.py predicts.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import DEEPSPEED, ROOT, launch_env, train_history
from trainer.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS_BEFORE = 3
COMMON = ["--config", "launch/configs/demo.yaml", "optim.lr_scale={vision: 0.5, gac: 3.0, llm: 1.0}",
          "optim.freeze=[projector]", "optim.warmup_steps=1", "train.max_steps=20", "train.micro_batch_size=2",
          "data.num_workers=0", "eval.dev_shards=[]", "eval.at_end=false", "train.log_every=1"]


def launch(script: list[str], ranks: int, shards: dict, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    data = [f"data.train_shards=[{shards['domain_a']},{shards['domain_b']},{shards['domain_c']}]",
            f"data.eval_shards=[{shards['domain_d']}]", f"train.output_dir={out}"]
    cmd = [*DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *script, *COMMON, *data,
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(script)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module", params=[1, 2], ids=["from_1_rank", "from_2_ranks"])
def checkpoint(request, small_shards, tmp_path_factory) -> tuple[int, Path]:
    """(its world size, a run directory) with a checkpoint after STEPS_BEFORE steps."""
    out = tmp_path_factory.mktemp(f"ws{request.param}") / "run"
    launch(["launch/train.sh"], request.param, small_shards, out, f"train.stop_at_step={STEPS_BEFORE}")
    return request.param, out


def probe(run: Path, ranks: int, shards: dict, tmp: Path, name: str) -> dict:
    copy = tmp / name
    shutil.copytree(run, copy)
    result = tmp / f"{name}.pt"
    launch(["tests/trainer/training/engine_probe.py", str(result)], ranks, shards, copy)
    return torch.load(result, weights_only=False)


def test_an_elastic_resume_restores_adamw_as_a_resume_at_the_old_world_size(checkpoint, small_shards, tmp_path):
    before, run = checkpoint
    after = 3 - before
    same = probe(run, before, small_shards, tmp_path, "same")
    elastic = probe(run, after, small_shards, tmp_path, "elastic")
    assert same["step"] == elastic["step"] == STEPS_BEFORE
    # every sub-group has stepped STEPS_BEFORE times, and once more after the next update, in both (one step
    # tensor shared by all sub-groups would be incremented once per sub-group)
    assert len(elastic["sub_steps"]) > 1 and set(same["sub_steps"]) == set(elastic["sub_steps"]) == {STEPS_BEFORE}
    assert set(same["sub_steps_after"]) == set(elastic["sub_steps_after"]) == {STEPS_BEFORE + 1}
    # every group its own settings: names, lr (after its lr_scale), weight decay (none on biases and norms), betas
    assert [g["name"] for g in elastic["groups"]] == [g["name"] for g in same["groups"]]
    assert "projector" not in {g["name"].split(".")[0] for g in same["groups"]}  # frozen: no group
    for mine, theirs in zip(elastic["groups"], same["groups"]):
        for key in ("lr", "initial_lr", "weight_decay", "betas", "eps"):
            assert mine[key] == pytest.approx(theirs[key]), (mine["name"], key)
    lrs = {g["name"]: g["initial_lr"] for g in same["groups"]}
    assert lrs["vision"] == pytest.approx(0.5 * lrs["llm"]) and lrs["gac"] == pytest.approx(3.0 * lrs["llm"])
    assert {g["name"]: g["weight_decay"] for g in same["groups"]}["vision.no_decay"] == 0.0
    assert same["states"].keys() == elastic["states"].keys()
    for name, state in same["states"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(elastic["states"][name][key], state[key], rtol=0, atol=0, msg=f"{name} {key}")
    # the next update on the same global batch: equal up to the order of the fp32 reductions
    for name, weight in same["weights_after"].items():
        torch.testing.assert_close(elastic["weights_after"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_a_conversion_longer_than_the_collective_timeout_still_resumes(small_shards, tmp_path):
    out = tmp_path / "run"
    launch(["launch/train.sh"], 1, small_shards, out, f"train.stop_at_step={STEPS_BEFORE}")
    # rank 0 converts for 8 s; a collective would give up after 3
    proc = launch(["tests/faults.py", "--slow-conversion", "8"], 2, small_shards, out,
                  "train.collective_timeout_s=3", f"train.stop_at_step={STEPS_BEFORE + 2}")
    assert "converting" in proc.stdout + proc.stderr
    assert sorted(train_history(out)) == [STEPS_BEFORE + 1, STEPS_BEFORE + 2]


def test_the_engine_holds_the_gradient_dtype_and_bytes_the_memory_model_predicts(small_shards, tmp_path):
    for precision in ("bf16", "fp32"):
        result = tmp_path / f"{precision}.pt"
        launch(["tests/trainer/training/engine_probe.py", str(result)], 2, small_shards, tmp_path / precision,
               f"train.precision={precision}", "optim.freeze=[]")
        memory = torch.load(result, weights_only=False)["memory"]
        assert memory["grad_buffer_dtype"] == "torch.float32"  # the shipped config accumulates in fp32
        assert memory["dtypes"] == memory["config_dtypes"]  # what the config says is what the engine holds
        assert memory["dtypes"].params == precision and memory["dtypes"].grads == "fp32"
        engine, per_rank = memory["engine"], memory["trainable_parameters"] / 2
        assert engine["grads"] == pytest.approx(per_rank * 4, rel=0.02)  # fp32 partitions of half the parameters
        assert engine["master"] + engine["optimizer_states"] == pytest.approx(per_rank * 12, rel=0.02)
        assert engine["total"] == pytest.approx(memory["predicted"], rel=0.02)
