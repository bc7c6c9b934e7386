"""Data-parallel SCF captioning (shards/caption_parallel.py): ranks from the launchers' environment, per-rank caches
that survive a kill, shares that cover the set once, and a merge identical to a one-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shards.bench.caption import same_shard_sets, save_tiny_captioner
from shards.caption_cache import CacheAppender, cache_file, read_caches
from shards.caption_parallel import RANKS_DIR, Rank, rank_from_env, wait_for_ranks
from shards.cli import main as shards_main
from shards.errors import ShardsError
from shards.manifest import MANIFEST_NAME
from shards.scf import Captioner, caption_shard_set, caption_share
from shards.synth.domains import generate_domain
from trainer.dist import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, Rank(3, 3, 8)),  # torchrun, deepspeed
        ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, Rank(9, 1, 16)),  # srun
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Rank(1, 0, 2)),  # launcher wins
        ({}, Rank(0, 0, 1)),
    ],
)
def test_rank_from_env(env: dict, expected: Rank) -> None:
    assert rank_from_env(env) == expected


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}])
def test_rank_from_env_refuses_nonsense(env: dict) -> None:
    with pytest.raises(ShardsError, match="launcher"):
        rank_from_env(env)


def test_cache_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = cache_file(tmp_path, 1, 2)
    assert path.name == "captions.rank1.jsonl" and cache_file(tmp_path, 0, 1).name == "captions.jsonl"
    with CacheAppender(path) as a:
        a.append([("k0", "a screen"), ("k1", "paper")])
    with open(path, "ab") as f:  # a kill in the middle of the next batch's write
        f.write(b'{"key": "k2", "capt')
    assert read_caches(tmp_path) == {"k0": "a screen", "k1": "paper"}
    with CacheAppender(path) as a:  # the owner cuts the torn line before appending
        a.append([("k2", "moire")])
    assert path.read_text().splitlines()[-1] == json.dumps({"key": "k2", "caption": "moire"})
    assert read_caches(tmp_path) == {"k0": "a screen", "k1": "paper", "k2": "moire"}
    path.write_text(path.read_text().replace('"k1"', "k1"))  # damage inside the file is not a kill: refuse it
    with pytest.raises(ShardsError, match=r"captions.rank1.jsonl:2: .*delete that line"):
        read_caches(tmp_path)


def test_rank0_waits_for_this_jobs_done_files_and_stops_on_a_failure(tmp_path: Path) -> None:
    job = {"src": "/data/set", "only": "spoof"}
    (tmp_path / RANKS_DIR).mkdir()
    (tmp_path / RANKS_DIR / "rank0-of-2.done").write_text(json.dumps({**job, "captioned": 3}))
    (tmp_path / RANKS_DIR / "rank1-of-2.done").write_text(json.dumps({**job, "only": "all"}))  # another job's

    def finish_rank1() -> None:
        time.sleep(0.5)
        (tmp_path / RANKS_DIR / "rank1-of-2.done").write_text(json.dumps({**job, "captioned": 2}))

    thread = threading.Thread(target=finish_rank1)
    t0 = time.time()
    thread.start()
    wait_for_ranks(tmp_path, job, 2, poll_s=0.05)
    assert time.time() - t0 >= 0.5  # the stale file did not count
    thread.join()

    (tmp_path / RANKS_DIR / "rank1-of-2.done").unlink()
    (tmp_path / RANKS_DIR / "rank1-of-2.failed").write_text("OutOfMemoryError: CUDA out of memory\n")
    with pytest.raises(ShardsError, match="rank 1 failed: OutOfMemoryError"):
        wait_for_ranks(tmp_path, job, 2, poll_s=0.05)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A synthetic shard set of 40 samples in 3 shards, live and spoof interleaved as the generator writes them."""
    return generate_domain(tmp_path_factory.mktemp("src") / "set", "domain_a", 40, image_size=32,
                           samples_per_shard=16)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Path:
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"))


def test_shares_cover_the_set_once_and_merge_like_one_process(tmp_path: Path, source: Path, captioner: Path) -> None:
    cap = Captioner(captioner, device="cpu", max_new_tokens=4)
    ref = caption_shard_set(source, tmp_path / "one" / "scf", cap, only="spoof", batch_size=4)

    out = tmp_path / "three" / "scf"
    counts = [caption_share(source, out, cap, only="spoof", batch_size=3, rank=r, world_size=3) for r in range(3)]
    shares = [set(read_caches_of(out, r, 3)) for r in range(3)]
    assert sum(counts) == ref["num_samples"] == len(set.union(*shares)) and max(counts) - min(counts) <= 1
    # a rerun finds every caption cached and captions nothing
    assert caption_share(source, out, cap, only="spoof", rank=1, world_size=3) == 0

    # the separate merge step, as a command; a launcher's other ranks leave it to rank 0
    args = ["caption", str(source), "--out", str(out), "--only", "spoof", "--merge"]
    assert shards_main(args) == 0
    assert same_shard_sets(tmp_path / "one" / "scf", out)


def read_caches_of(out: Path, rank: int, world_size: int) -> dict[str, str]:
    lines = cache_file(out, rank, world_size).read_text().splitlines()
    return {json.loads(x)["key"]: json.loads(x)["caption"] for x in lines}


def test_merge_refuses_missing_captions_and_a_rerun_with_more_ranks_fills_them(
    tmp_path: Path, source: Path, captioner: Path, capsys
) -> None:
    out = tmp_path / "scf"
    cap = Captioner(captioner, device="cpu", max_new_tokens=2)
    caption_share(source, out, cap, rank=0, world_size=2)  # rank 1 of 2 never ran
    assert shards_main(["caption", str(source), "--out", str(out), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "20 sample(s)" in err and "run the captioning again" in err
    assert not (out / MANIFEST_NAME).exists()
    # resumed with 3 ranks: they read every cache file and caption only the 20 missing
    assert sum(caption_share(source, out, cap, rank=r, world_size=3) for r in range(3)) == 20
    assert shards_main(["caption", str(source), "--out", str(out), "--merge"]) == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["num_samples"] == 40


def test_bad_source_fails_before_any_model_loads(tmp_path: Path, capsys) -> None:
    code = shards_main(["caption", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--captioner", "/no"])
    assert code == 2 and "no shard manifest" in capsys.readouterr().err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID",
                                                           "SLURM_NTASKS", "SLURM_LOCALID")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_two_ranks_killed_midway_resume_to_the_one_process_output(tmp_path: Path, tmp_path_factory) -> None:
    """srun-style ranks; kill -9 rank 1 midway (rank 0 finishes its share and waits, merging nothing), stop rank 0
    as the launcher would; rerun under deepspeed: each rank captions only what it lacks, and rank 0's merge is
    byte-identical to a one-process ``ifas-shards caption``."""
    src = generate_domain(tmp_path / "src", "domain_a", 160, image_size=32, samples_per_shard=50)
    cap = save_tiny_captioner(tmp_path_factory.mktemp("captioner128"), hidden=128, layers=4)
    opts = ["caption", str(src), "--captioner", str(cap), "--device", "cpu", "--batch-size", "2",
            "--max-new-tokens", "12", "--filter"]
    one = tmp_path / "one" / "scf"
    subprocess.run([sys.executable, "-m", "shards.cli", *opts, "--out", str(one)], env=_env(), check=True,
                   timeout=300, capture_output=True)

    out = tmp_path / "two" / "scf"
    ranks = [subprocess.Popen([sys.executable, "-m", "shards.cli", *opts, "--out", str(out)],
                              env=_env(SLURM_PROCID=str(r), SLURM_NTASKS="2"), stderr=subprocess.DEVNULL)
             for r in range(2)]
    rank1_cache, deadline = out / "captions.rank1.jsonl", time.time() + 240
    while _lines(rank1_cache) < 2 and time.time() < deadline:
        time.sleep(0.01)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[1].wait()
    before = rank1_cache.read_bytes()
    assert 2 <= before.count(b"\n") < 80, "rank 1 was not killed midway through its 80 images"
    while not (out / RANKS_DIR / "rank0-of-2.done").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert ranks[0].poll() is None and not (out / MANIFEST_NAME).exists()  # waits for rank 1; merges nothing
    ranks[0].terminate()
    ranks[0].wait()
    with open(rank1_cache, "ab") as f:  # as if the kill had landed inside a write
        f.write(b'{"key": "domain_a-0001')

    # the rerun under the deepspeed launcher (2 CPU ranks; it appends --local_rank=K); torchrun: shards.bench.caption
    rerun = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                            str(free_port()), "--module", "shards.cli", *opts, "--out", str(out)], env=_env(),
                           timeout=300, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = rank1_cache.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]
    assert after.startswith(kept) and after.count(b"\n") == 80  # resumed: nothing captioned twice
    assert _lines(out / "captions.rank0.jsonl") == 80
    assert read_caches(out) == read_caches(one) and len(read_caches(one)) == 160
    assert same_shard_sets(one, out)
    assert json.loads((out / MANIFEST_NAME).read_text())["scf"]["filtered"] is True
