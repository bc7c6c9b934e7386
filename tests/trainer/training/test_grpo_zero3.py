"""The GRPO stage on the real stack (ZeRO-3 CPU ranks, the real launcher): the same update from 2 ranks as from
1 (the objective is normalised over the global batch), and kill -9 during a GRPO run then the same command again
gives the unbroken run's rollouts, losses and weights bitwise."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import DEEPSPEED, ROOT, launch_env, tensorboard_events
from tests.trainer.training.test_fault_tolerance import finish, latest, start, wait_for
from trainer.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def grpo_args(shards: dict, init: Path, out: Path, *overrides: str) -> list[str]:
    return [f"data.train_shards=[{shards['domain_a']},{shards['domain_b']},{shards['domain_c']}]",
            "data.eval_shards=[]", "eval.dev_shards=[]", "eval.at_end=false", f"train.output_dir={out}",
            "train.stage=grpo", f"model.init_from={init}", "train.micro_batch_size=2", "data.num_workers=0",
            "optim.lr=1e-3", "optim.warmup_steps=1", "train.log_every=1", "grpo.group_size=2",
            "grpo.max_new_tokens=6", "grpo.kl_coef=0.1", *overrides]


def test_one_update_from_2_zero3_ranks_equals_1(small_shards, tiny_model_dir, tmp_path):
    results = {}
    for ranks in (1, 2):
        path = tmp_path / f"ws{ranks}.pt"
        cmd = [*DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "tests/trainer/training/grpo_probe.py", str(path),
               *grpo_args(small_shards, tiny_model_dir, tmp_path / f"run{ranks}", "grpo.alpha=0.7")]
        proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[ranks] = torch.load(path, weights_only=False)
    one, two = results[1]["weights"], results[2]["weights"]
    assert results[2]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert one.keys() == two.keys()
    from trainer.model.ifas import IFASModel

    start_weights = dict(IFASModel.from_pretrained(tiny_model_dir)[0].named_parameters())
    moved = 0
    for name, w in one.items():
        # up to reduction order: AdamW's first step is about lr * sign(gradient), so an entry whose gradient is
        # near 0 moves by a different fraction of lr (1e-3); every entry agrees within 1% of one step
        torch.testing.assert_close(two[name], w, rtol=1e-5, atol=1e-5, msg=name)
        moved += not torch.equal(w, start_weights[name].detach())
    assert moved > len(one) // 2  # the update changed most tensors


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=latest(run))


def _records(run: Path) -> dict[tuple[int, int], dict]:
    """(rank, step) -> that step's keys, sampled answers and loss; a step re-run after the resume replaces the
    killed run's."""
    out = {}
    for rank in (0, 1):
        for line in (run / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[(rank, rec["step"])] = rec
    return out


def test_kill_9_during_grpo_then_restart_gives_the_same_rollouts_losses_and_weights(small_shards, tiny_model_dir,
                                                                                  tmp_path):
    def command(out: Path) -> list[str]:
        return [*DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.sh",
                *grpo_args(small_shards, tiny_model_dir, out, "train.max_steps=6", "train.save_every=2",
                           "train.log_sample_keys=true", f"data.eval_shards=[{small_shards['domain_d']}]",
                           "eval.at_end=true", "eval.explain_samples=6", "eval.max_samples=24")]

    code, log = finish(start(command(tmp_path / "unbroken")))
    assert code == 0, log[-3000:]
    out = tmp_path / "killed"
    proc = start(command(out))
    wait_for(lambda: latest(out) == "step_00000004", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    code, log = finish(start(command(out)))
    assert code == 0, log[-3000:]
    assert "resumed from step 4" in log

    unbroken, resumed = _records(tmp_path / "unbroken"), _records(out)
    assert sorted(resumed) == sorted(unbroken) == [(r, s) for r in (0, 1) for s in range(1, 7)]
    assert resumed == unbroken  # keys, every sampled answer, every loss
    assert len({a for rec in unbroken.values() for a in rec["answers"]}) > 10  # sampled, not one fixed answer
    history = {h["step"]: h for h in json.loads((out / "train_result.json").read_text())["history"]}
    reference = {h["step"]: h for h in json.loads((tmp_path / "unbroken" / "train_result.json").read_text())["history"]}
    for step in (5, 6):
        for key in ("loss", "kl", "reward", "reward_cue", "rollout_judgment_acc"):
            assert history[step][key] == reference[step][key], (step, key)
    # the final evaluation explained its held-out samples on both ranks in lockstep (ZeRO-3 generate)
    explained = json.loads((out / "train_result.json").read_text())["explanations"]["greedy"]
    assert explained["samples"] == 6 and 0.0 <= explained["contradiction_rate"] <= 1.0
    events = tensorboard_events(out / "tb")
    tags = set(events.Tags()["scalars"])
    assert {"train/reward_cue", "train/kl", "train/adv_std", "train/answer_length", "train/rollout_judgment_acc",
            "explain/held-out/greedy/cue_hit_rate"} <= tags
    assert [e.step for e in events.Scalars("train/kl")][-2:] == [5, 6]
    mine, theirs = _weights(out), _weights(tmp_path / "unbroken")
    assert mine.keys() == theirs.keys()
    for name, w in theirs.items():
        assert torch.equal(mine[name], w), name
