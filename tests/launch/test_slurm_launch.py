"""Launching at scale without SLURM: the nodelist parser and rendezvous, launch/slurm.sbatch run with
fake srun/scontrol (pass-through, requeue on preemption), a dead or hung rank failing within the
collective timeout, and two simulated "nodes" (srun-style env, one rank each) training exactly like
a single-node 2-rank DeepSpeed run."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers import train_history as losses
from trainer.dist import SLURM_PORT_BASE, SLURM_PORT_SPAN, parse_nodelist, slurm_rendezvous

SBATCH = ROOT / "launch" / "slurm.sbatch"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----- nodelist and rendezvous -----

@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a100-[8-10]", ["gpu-a100-8", "gpu-a100-9", "gpu-a100-10"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("node[009-011]", ["node009", "node010", "node011"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node[3-1]", "node[a-c]", ""])
def test_parse_nodelist_refuses_what_it_cannot_read(bad):
    with pytest.raises(ValueError, match="SLURM nodelist"):
        parse_nodelist(bad)


def write_tool(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_rendezvous_from_the_job_prefers_scontrol(tmp_path, monkeypatch):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert slurm_rendezvous(env) == ("gpu07", SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN)
    write_tool(tmp_path, "scontrol", 'echo "$@" > "$(dirname "$0")/args"; printf "h-first\\nh-second\\n"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert slurm_rendezvous({"SLURM_NODELIST": "h-[a,b]", "SLURM_JOBID": "7"}) == ("h-first", SLURM_PORT_BASE + 7)
    assert (tmp_path / "args").read_text().split() == ["show", "hostnames", "h-[a,b]"]
    assert slurm_rendezvous({"SLURM_PROCID": "0"}) is None  # not a SLURM job step


def test_hostfile_example_parses_as_a_deepspeed_hostfile():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(ROOT / "launch" / "hostfile.example"))
    assert list(pool.items()) == [("node01", 8), ("node02", 8)]


# ----- launch/slurm.sbatch with fake srun / scontrol -----

def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    headers = [ln for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    for flag in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",
                 "--signal=USR1@180", "--requeue", "--output", "--mem=0"):
        assert any(ln.split()[1].startswith(flag) for ln in headers), flag


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH dir with srun/scontrol that record their arguments; srun exits with $FAKE_SRUN_RC after
    $FAKE_SRUN_SLEEP seconds and, with FAKE_PREEMPT=1, leaves the trainer's preemption marker in the
    train.output_dir it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    record = (f'python3 -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' "$(basename "$0")" "$@" '
              f'>> "{log}"\n')
    write_tool(bin_dir, "srun", record + 'sleep "${FAKE_SRUN_SLEEP:-0}"\n'
               'for a in "$@"; do case "$a" in train.output_dir=*) out=${a#train.output_dir=} ;; esac; done\n'
               '[ "${FAKE_PREEMPT:-0}" = 1 ] && mkdir -p "$out" && echo 3 > "$out/preempted"\n'
               'exit "${FAKE_SRUN_RC:-0}"\n')
    write_tool(bin_dir, "scontrol", record)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="node[01-02]", SLURM_NTASKS="16", SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_CPUS_PER_TASK="8", OUTPUT_DIR=str(out), PYTHON="python")
    env.pop("OMP_NUM_THREADS", None)

    def calls() -> list[list[str]]:
        return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

    return env, out, calls


def test_sbatch_passes_overrides_through_and_returns_srun_status(fake_slurm):
    env, out, calls = fake_slurm
    proc = subprocess.run(["bash", str(SBATCH), "train.max_steps=7", "optim.lr=1e-4"],
                          env=dict(env, FAKE_SRUN_RC="3"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert calls() == [["srun", "--kill-on-bad-exit=1", "python", "-u", "launch/train.sh", "--config",
                        "launch/configs/demo.yaml", f"train.output_dir={out}", "train.max_steps=7", "optim.lr=1e-4"]]


def test_sbatch_requeues_a_preempted_run_and_exits_0(fake_slurm):
    env, out, calls = fake_slurm
    proc = subprocess.run(["bash", str(SBATCH)], env=dict(env, FAKE_PREEMPT="1", CONFIG="my.yaml"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    srun, scontrol = calls()
    assert srun[6:8] == ["my.yaml", f"train.output_dir={out}"]
    assert scontrol == ["scontrol", "requeue", "4242"]
    assert not (out / "preempted").exists()  # the requeued job starts clean


def test_sbatch_survives_sigterm_to_the_batch_shell_and_still_requeues(fake_slurm, tmp_path):
    """SLURM signals the batch shell too on preemption; it must wait for srun, then requeue."""
    env, _, calls = fake_slurm
    other = tmp_path / "elsewhere"
    proc = subprocess.Popen(["bash", str(SBATCH), f"train.output_dir={other}"],
                            env=dict(env, FAKE_PREEMPT="1", FAKE_SRUN_SLEEP="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not calls() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "got SIGTERM" in stdout
    assert calls()[-1] == ["scontrol", "requeue", "4242"]  # marker found under the overridden output dir
    assert not (other / "preempted").exists()


def test_sbatch_does_not_requeue_a_finished_run(fake_slurm):
    env, out, calls = fake_slurm
    out.mkdir()
    (out / "preempted").write_text("stale\n")  # left by an earlier, killed job
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls()] == ["srun"]


# ----- real processes -----

def slurm_port() -> tuple[int, str]:
    """A free port in the range trainer.dist derives from SLURM_JOB_ID, and a job id that gives it."""
    for _ in range(200):
        port = random.randrange(SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, str(port - SLURM_PORT_BASE + SLURM_PORT_SPAN * random.randrange(1, 50))
    raise RuntimeError("no free port in the SLURM range")


def srun_env(rank: int, nodes: int, job_id: str) -> dict[str, str]:
    """What srun sets for task ``rank`` of a job with one task on each of ``nodes`` nodes."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_STEP_ID="0",
               SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_NTASKS=str(nodes),
               SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS_PER_NODE="1",
               SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_STEP_NODELIST="localhost")
    return env


STALL = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from trainer.dist import all_reduce_sum, init_distributed
info = init_distributed(timeout_s=float(sys.argv[2]))
all_reduce_sum(torch.ones(1))
print("ready", flush=True)
if info.rank == 1:
    time.sleep(300)  # alive but never joins the next collective (or is killed here)
all_reduce_sum(torch.ones(1))
print("finished", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["hang", "kill"])
def test_a_dead_or_hung_rank_fails_the_others_within_the_collective_timeout(fault):
    timeout_s = 4.0
    _, job_id = slurm_port()
    procs = [subprocess.Popen([sys.executable, "-c", STALL, str(ROOT), str(timeout_s)], env=srun_env(r, 2, job_id),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        for p in procs:
            lines = iter(p.stdout.readline, "")  # DeepSpeed prints to stdout as well
            assert any(ln.strip() == "ready" for ln in lines), p.stderr.read()
        start = time.time()
        if fault == "kill":
            procs[1].send_signal(signal.SIGKILL)
        out, err = procs[0].communicate(timeout=timeout_s + 60)
        elapsed = time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode != 0 and "finished" not in out
    assert elapsed < timeout_s + 30, elapsed  # bounded by the timeout (+ exit), not the 30-min default
    assert "rank 0 of 2" in err and "another rank probably died or hangs" in err, err[-2000:]


def overrides(small_shards, out: Path, steps: int) -> list[str]:
    """The same run as tests/trainer/training/test_train_e2e.py's run_train, without evaluation."""
    d = {k: str(v) for k, v in small_shards.items()}
    return [f"data.train_shards=[{d['domain_a']},{d['domain_b']},{d['domain_c']}]",
            f"data.eval_shards=[{d['domain_d']}]", f"eval.dev_shards=[{d['domain_c']}]", f"train.output_dir={out}",
            "train.micro_batch_size=4", "train.log_every=1", "data.num_workers=0", "optim.warmup_steps=2",
            f"train.max_steps={steps}", f"train.save_every={steps}", "eval.at_end=false"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_simulated_nodes_train_like_one_node_with_two_ranks(small_shards, tmp_path):
    from tests.trainer.training.test_train_e2e import run_train

    steps = 4
    slurm_out, ref_out = tmp_path / "slurm", tmp_path / "single"
    port, job_id = slurm_port()
    cmd = [sys.executable, "-u", "launch/train.sh", *overrides(small_shards, slurm_out, steps)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=srun_env(r, 2, job_id), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=240) for p in nodes]
    for rank, (p, (_, err)) in enumerate(zip(nodes, results)):
        assert p.returncode == 0, f"node {rank} failed:\n{err[-3000:]}"
        assert f"rank {rank} of 2 (local rank 0): rendezvous localhost:{port}" in err, err[-3000:]
        assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
    tag = slurm_out / "checkpoints" / f"step_{steps:08d}"
    for rank in (0, 1):  # each node wrote its ZeRO-3 partition of the final step
        assert list(tag.glob(f"*zero_pp_rank_{rank}_*optim_states.pt")), sorted(p.name for p in tag.iterdir())

    run_train(small_shards, ref_out, *overrides(small_shards, ref_out, steps))
    got, expected = losses(slurm_out), losses(ref_out)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
