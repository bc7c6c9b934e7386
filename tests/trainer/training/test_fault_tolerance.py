"""Preemption-safe exact resume and fault tolerance, on the real stack (2 CPU ranks, ZeRO-3)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import DEEPSPEED, ROOT, dump_stacks, kill_hung_run, launch_env, tensorboard_events
from tests.helpers import train_history as losses
from trainer.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def command(shards: list[Path], eval_shards: Path, out: Path, *overrides: str, ranks: int = 2,
            script: tuple[str, ...] = ("launch/train.sh",)) -> list[str]:
    return [*DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *script,
            f"data.train_shards=[{','.join(map(str, shards))}]", f"data.eval_shards=[{eval_shards}]",
            "eval.dev_shards=[]", f"train.output_dir={out}", "train.micro_batch_size=4", "train.log_every=1",
            "eval.at_end=false", "optim.warmup_steps=2", "train.log_sample_keys=true", *overrides]


def start(cmd: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = launch_env(**(env_extra or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung run: where each of its processes waits, then stop them all
        raise AssertionError(f"the run did not finish in {timeout:.0f} s:\n{kill_hung_run(proc)[-20000:]}") from None
    return proc.returncode, out


def keys_by_step(out: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys; a step re-run after a resume overwrites the killed run's record."""
    keys = {}
    for rank in (0, 1):
        for line in (out / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            keys[(rank, rec["step"])] = rec["keys"]
    return keys


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def latest(out: Path) -> str | None:
    pointer = out / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def test_kill_9_then_restart_equals_unbroken_run(small_shards, tmp_path):
    shards = [small_shards[d] for d in ("domain_a", "domain_b", "domain_c")]
    steps = ["train.max_steps=8", "train.save_every=2", "data.num_workers=1"]
    code, log = finish(start(command(shards, small_shards["domain_d"], tmp_path / "unbroken", *steps)))
    assert code == 0, log[-3000:]

    out = tmp_path / "killed"
    proc = start(command(shards, small_shards["domain_d"], out, *steps))
    wait_for(lambda: latest(out) == "step_00000004", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher, ranks and loader workers, no chance to clean up
    proc.wait()
    assert not (out / "train_result.json").exists()
    code, log = finish(start(command(shards, small_shards["domain_d"], out, *steps)))  # the same command again
    assert code == 0, log[-3000:]
    assert "resumed from step" in log

    resumed = losses(out)
    assert min(resumed) >= 5 and max(resumed) == 8
    unbroken = losses(tmp_path / "unbroken")
    for step, loss in resumed.items():
        assert loss == unbroken[step], step  # bitwise on CPU
    assert keys_by_step(out) == keys_by_step(tmp_path / "unbroken")


def test_sigusr1_saves_exits_0_and_resumes(small_shards, tmp_path):
    shards = [small_shards[d] for d in ("domain_a", "domain_b", "domain_c")]
    steps = ["train.max_steps=25", "train.save_every=100", "data.num_workers=1"]
    out = tmp_path / "run"
    proc = start(command(shards, small_shards["domain_d"], out, *steps))
    keys = out / "sample_keys" / "rank0.jsonl"
    wait_for(lambda: keys.is_file() and len(keys.read_text().splitlines()) >= 3, proc)
    ranks = ranks_of(proc)
    assert len(ranks) == 2
    # as SLURM's --signal=USR1@T does: every process of the step gets it, the loader workers, their fork server
    # and multiprocessing's resource tracker too (which must not die of it: the ranks need their workers)
    step = ranks + [p for rank in ranks for p in rank.children(recursive=True)]
    assert len(step) >= 2 + 2 * 2, [p.cmdline()[:3] for p in step]
    for p in step:
        p.send_signal(signal.SIGUSR1)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    stopped_at = int((out / "preempted").read_text())
    assert 3 <= stopped_at < 25 and latest(out) == f"step_{stopped_at:08d}"

    code, log = finish(start(command(shards, small_shards["domain_d"], out, *steps)))
    assert code == 0, log[-3000:]
    assert min(losses(out)) == stopped_at + 1 and max(losses(out)) == 25
    assert not (out / "preempted").exists()


def test_loader_workers_are_not_forks_of_a_rank_show_their_stacks_and_end_with_it(small_shards, tmp_path):
    """A rank runs gloo and DeepSpeed threads: its loader workers come from a fork server, never from a fork of
    the rank (a lock one of those threads held at the fork would stay held in the worker). SIGUSR2 makes ranks and
    workers print their stacks (what a test shows of a run that hangs). Rank 0 killed with SIGKILL takes its workers
    and fork server with it (torch's worker watches its parent, here the server, which outlives the rank); rank 1's
    are stopped by the launcher, which ends the other rank's process tree."""
    shards = [small_shards[d] for d in ("domain_a", "domain_b", "domain_c")]
    out = tmp_path / "run"
    proc = start(command(shards, small_shards["domain_d"], out, "train.max_steps=400", "data.num_workers=1"))
    keys = out / "sample_keys" / "rank0.jsonl"
    wait_for(lambda: keys.is_file() and len(keys.read_text().splitlines()) >= 2, proc)
    ranks = ranks_of(proc)
    assert len(ranks) == 2
    helpers = []  # fork servers, their workers, resource trackers
    for rank in ranks:
        started = rank.children()
        assert not [c for c in started if c.cmdline() == rank.cmdline()]  # a fork keeps its parent's command
        servers = [c for c in started if "multiprocessing.forkserver" in " ".join(c.cmdline())]
        assert len(servers) == 1 and len(servers[0].children()) == 1  # the one loader worker, forked by the server
        helpers += started + servers[0].children()

    dump_stacks(proc)
    time.sleep(5)
    ranks[0].kill()  # SIGKILL: the rank cleans up nothing; the launcher then stops the other rank
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the launcher did not end after a rank was killed:\n{kill_hung_run(proc)[-6000:]}")
    assert len(re.findall(r'loop\.py", line \d+ in train\b', log)) == 2, log[-6000:]  # each rank's main thread
    assert log.count(" in _worker_loop") == 2, log[-6000:]  # each rank's loader worker

    deadline = time.time() + 30
    while left_running(helpers) and time.time() < deadline:
        time.sleep(0.5)
    assert not left_running(helpers), [p.pid for p in left_running(helpers)]


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes of a launched run: the children of DeepSpeed's per-node launcher."""
    launcher = next(p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in p.cmdline())
    return launcher.children()


def left_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if running(p)]


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def records(out: Path, rank: int) -> list[dict]:
    """A rank's sample-key records in the order it wrote them (runs append)."""
    path = out / "sample_keys" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# (a change of data.num_workers alone goes through the same stream transition, tested in test_stream.py)
@pytest.mark.parametrize("before, after, workers", [(2, 1, 0), (1, 2, 1)])
def test_resume_on_another_world_size_finishes_the_epoch_then_goes_on(small_shards, tmp_path, before, after, workers):
    """kill -9 at one world size, the same command at another (or with other loader workers): the
    checkpoint is converted to DeepSpeed's universal form where the world size changed, optimizer and
    schedule continue, and over the interrupted epoch every sample is trained on exactly once (what
    the old ranks had not reached comes first)."""
    shards = [small_shards[d] for d in ("domain_a", "domain_b", "domain_c")]  # 144 samples in 9 shards
    steps = ["train.max_steps=34", "train.save_every=6", "data.num_workers=0", "data.shuffle_buffer=16"]
    out = tmp_path / "run"
    proc = start(command(shards, small_shards["domain_d"], out, *steps, ranks=before))
    wait_for(lambda: latest(out) == "step_00000006", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    trained = [k for r in range(before) for rec in records(out, r) if rec["step"] <= 6 for k in rec["keys"]]
    first = losses_logged(out)
    assert len(trained) == 6 * 4 * before

    code, log = finish(start(command(shards, small_shards["domain_d"], out, *steps, f"data.num_workers={workers}",
                                     ranks=after)))
    assert code == 0, log[-3000:]
    assert f"checkpoint of {before} rank(s) x 1 worker(s)" in log
    # converted, then loaded, where the world size changed
    assert ("step_00000006 for another world size" in log) == (before != after)
    left = json.loads(log.split("per rank and loader worker: ")[1].splitlines()[0])
    assert sum(n for per_rank in left for n in per_rank) == 144 - len(trained)
    # the killed run may have logged steps after its checkpoint: the resumed run's 28 steps come last
    resumed = [[k for rec in records(out, r)[-(34 - 6):] for k in rec["keys"]] for r in range(after)]
    transition = [k for r in range(after) for k in resumed[r][:left[r][0]]]
    epoch = sorted(k for d in shards for k in keys_of_set(d))
    assert sorted(trained + transition) == epoch  # none lost, none repeated
    assert all(len(resumed[r]) > left[r][0] for r in range(after))  # then the next epoch
    history = losses(out)
    assert sorted(history) == list(range(7, 35))
    # the weights and optimizer came back (a fresh model would start near the first loss) and keep learning
    assert history[7] < (first[1] + first[6]) / 2 and abs(history[7] - first[6]) < 0.25 * first[6]
    assert history[34] < history[7]


def losses_logged(out: Path) -> dict[int, float]:
    """step -> loss of a run that did not finish, read from its TensorBoard events."""
    return {int(e.step): e.value for e in tensorboard_events(out / "tb").Scalars("train/loss")}


def keys_of_set(shard_dir: Path) -> list[str]:
    import webdataset as wds

    from trainer.data import resolve_shards

    return [s["__key__"] for s in wds.WebDataset(resolve_shards([str(shard_dir)]), shardshuffle=False)]


def _corrupt_shards(src: Path, dst: Path) -> list[Path]:
    """Three good shards, one with a garbage JPEG and a sample without json, one truncated tar,
    one that is not a tar at all."""
    dst.mkdir()
    good = sorted(src.glob("*.tar"))
    for shard in good:
        shutil.copy(shard, dst / shard.name)
    with tarfile.open(good[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = dst / "bad-members.tar"
    with tarfile.open(bad, "w") as out:
        for i, (member, data) in enumerate(members[:16]):  # 8 samples
            key, ext = member.name.split(".", 1)
            if i == 0:
                data = b"this is not a jpeg" * 10  # sample 0: undecodable image
            if i == 3:
                continue  # sample 1: json member missing
            info = tarfile.TarInfo(f"x{key}.{ext}")
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    truncated = dst / "truncated.tar"
    blob = good[1].read_bytes()
    with tarfile.open(good[1]) as tar:
        fifth_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][4]
    truncated.write_bytes(blob[: fifth_jpg.offset_data + 100])  # cut inside the 5th sample's image
    (dst / "garbage.tar").write_bytes(os.urandom(3000))  # a whole shard that is not a tar at all
    return sorted(dst.glob("*.tar"))


def test_bad_shards_are_skipped_counted_and_never_hang(small_shards, tmp_path):
    shards = _corrupt_shards(small_shards["domain_a"], tmp_path / "shards")
    out = tmp_path / "run"
    # 6 shards over 2 ranks, the bad ones spread unevenly.
    code, log = finish(start(command(shards, small_shards["domain_d"], out, "train.max_steps=14",
                                     "train.save_every=100", "data.num_workers=0")))
    assert code == 0, log[-3000:]
    result = json.loads((out / "train_result.json").read_text())["history"]
    assert max(h["step"] for h in result) == 14
    assert result[-1]["skipped_samples"] == {"unreadable_shard": 0, "corrupt_tar": 2, "missing_member": 1,
                                             "bad_json": 0, "bad_image": 1}
    events = tensorboard_events(out / "tb")
    assert events.Scalars("data/skipped/bad_image")[-1].value == 1


def test_non_finite_steps_are_skipped_then_the_run_halts(small_shards, tmp_path):
    shards = [small_shards[d] for d in ("domain_a", "domain_b", "domain_c")]
    out = tmp_path / "run"
    proc = start(command(shards, small_shards["domain_d"], out, "train.max_steps=10", "train.save_every=100",
                         "train.max_bad_steps=3", "data.num_workers=0",
                         script=("tests/faults.py", "--nan-at-steps", "2,4,5,6")))
    code, log = finish(proc)
    assert code != 0
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row)" in log
    assert "3 steps in a row had a non-finite loss or gradient (up to step 6)" in log
    assert latest(out) == "step_00000006"  # it saved before stopping
