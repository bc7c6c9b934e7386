"""``ifas-shards caption``: SCF captioning in one process or data-parallel, one rank per GPU on any number of nodes
(docs/datasets.md, "SCF captions").

    ifas-shards caption SRC --out OUT --captioner C [--live-captioner G] ...                # one process
    torchrun --nnodes N --nproc_per_node 8 -m shards.cli caption SRC --out OUT --captioner C ...
    srun --ntasks-per-node 8 --gpus-per-task 1 ifas-shards caption SRC --out OUT --captioner C ...
    deepspeed --num_gpus 8 --module shards.cli caption SRC --out OUT --captioner C ...   (or --hostfile: nodes)
    ifas-shards caption SRC --out OUT [same options] --merge                              # merge step only

Rank, local rank and world size come from the environment the launchers set (RANK/WORLD_SIZE/LOCAL_RANK, else
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the order trainer.dist reads them in). No process group is started: the
ranks share nothing but OUT, which must be on a filesystem every node sees. Each rank captions its share
(``shards.scf.caption_share``) into its own cache file, then writes ``OUT/.ranks/rank<r>-of-<W>.done``. Rank 0
then waits on the filesystem (no collective, so no collective timeout can end a long share) for the other ranks'
done files and merges (``shards.scf.write_scf_set``): the shard set and its SCF report, identical to a
one-process run's. A rank that fails writes ``.failed`` beside it, so rank 0 stops with its message instead of
waiting. After a kill, rerun the same command: each rank captions only what no cache file holds. ``--no-merge``
leaves the merge to a later ``--merge`` run (e.g. for ranks started as a job array).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from shards.errors import ShardsError
from shards.io import atomic_write_text, setup_logging
from shards.keywords import load_keywords
from shards.manifest import ManifestError, read_manifest
from shards.scf import Captioner, caption_share, format_scf_report, live_source, write_scf_set
from shards.schema import CAPTION_PROMPT

log = logging.getLogger(__name__)

RANKS_DIR = ".ranks"


@dataclass(frozen=True)
class Rank:
    rank: int
    local_rank: int
    world_size: int


def rank_from_env(env: os._Environ | dict[str, str] = os.environ) -> Rank:
    """This process's place in a job started by torchrun, deepspeed or srun (one process: rank 0 of 1)."""
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and world in env:
            try:
                r = Rank(int(env[rank]), int(env.get(local, 0)), int(env[world]))
            except ValueError as e:
                raise ShardsError(f"{rank}/{world}/{local} must be integers ({e}); start ranks with a launcher") from e
            if not 0 <= r.rank < r.world_size:
                raise ShardsError(f"{rank}={r.rank} is outside {world}={r.world_size}; start ranks with a launcher")
            return r
    return Rank(0, 0, 1)


def _marker(out: Path, r: Rank, what: str) -> Path:
    return out / RANKS_DIR / f"rank{r.rank}-of-{r.world_size}.{what}"


def _job(args: argparse.Namespace) -> dict[str, str]:
    """What a done file vouches for: this source set, these labels (a stale file of another job does not count)."""
    return {"src": str(Path(args.src).resolve()), "only": args.only}


def wait_for_ranks(out: Path, job: dict[str, str], world_size: int, poll_s: float = 2.0, log_every_s: float = 60.0):
    """Rank 0: return once every rank's done file for ``job`` is in ``out``; raise if a rank reports a failure."""
    started = last_log = time.time()
    while True:
        waiting = []
        for rank in range(world_size):
            r = Rank(rank, 0, world_size)
            failed = _marker(out, r, "failed")
            if failed.is_file() and failed.stat().st_mtime >= started - 1:  # this run's failure, not an old one
                raise ShardsError(f"rank {rank} failed: {failed.read_text().strip()} ({failed})")
            done = _marker(out, r, "done")
            try:
                if {k: v for k, v in json.loads(done.read_text()).items() if k in job} == job:
                    continue
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            waiting.append(rank)
        if not waiting:
            return
        if time.time() - last_log >= log_every_s:
            log.info("waiting %.0f s for ranks %s to finish captioning (%s)", time.time() - started, waiting,
                     out / RANKS_DIR)
            last_log = time.time()
        time.sleep(poll_s)


def _check_inputs(args: argparse.Namespace) -> dict | None:
    """Everything a rank can get wrong, checked before any model is loaded; returns the keyword dictionary."""
    try:
        read_manifest(args.src)
    except (FileNotFoundError, ManifestError) as e:
        raise ShardsError(f"{e}; pass a shard set written by ifas-shards build/synth as SRC") from e
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise ShardsError(f"--out {args.out} is the source set; SCF writes a new shard set and leaves SRC untouched")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ShardsError("--batch-size and --max-new-tokens must be at least 1")
    if args.merge and args.no_merge:
        raise ShardsError("--merge and --no-merge exclude each other")
    try:
        return load_keywords(args.keywords) if args.filter else None
    except FileNotFoundError as e:
        raise ShardsError(f"{e}, or pass an existing JSON file to --keywords") from e


def _device(requested: str, r: Rank) -> str:
    import torch

    if requested == "auto" and torch.cuda.is_available():
        # one GPU per rank; srun may bind one device per task, which is then device 0
        return f"cuda:{r.local_rank % torch.cuda.device_count()}"
    return requested


def _caption_this_rank(args: argparse.Namespace, r: Rank, out: Path) -> None:
    device = _device(args.device, r)
    cap = Captioner(args.captioner, device, args.prompt, args.max_new_tokens)
    live = Captioner(args.live_captioner, device, args.prompt, args.max_new_tokens) if args.live_captioner else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    n = caption_share(args.src, out, cap, live_captioner=live, only=args.only, batch_size=args.batch_size,
                      rank=r.rank, world_size=r.world_size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # at warning level: ranks other than 0 log nothing below it, and each rank's throughput is worth its line
    log.warning("rank %d of %d: %d images captioned in %.1f s (%.2f images/s)", r.rank, r.world_size, n, seconds,
                n / seconds if seconds else 0.0)
    done = {**_job(args), "captioned": n, "seconds": seconds, "cpu_seconds": cpu}
    atomic_write_text(_marker(out, r, "done"), json.dumps(done) + "\n")


def main_caption(args: argparse.Namespace) -> int:
    r = rank_from_env()
    if r.world_size > 1:
        setup_logging(getattr(args, "log_level", "INFO"), rank=r.rank, force=True)
    keywords = _check_inputs(args)
    out = Path(args.out)
    if not args.merge:
        if not args.captioner:
            print("no --captioner given: the shards keep their template captions (caption_source=template)")
            return 0
        (out / RANKS_DIR).mkdir(parents=True, exist_ok=True)
        for what in ("done", "failed"):  # this rank's files from an earlier run
            _marker(out, r, what).unlink(missing_ok=True)
        try:
            _caption_this_rank(args, r, out)
        except Exception as e:
            atomic_write_text(_marker(out, r, "failed"), f"{type(e).__name__}: {e}\n")
            raise
        if r.rank != 0 or args.no_merge:
            return 0
        wait_for_ranks(out, _job(args), r.world_size)
    elif r.rank != 0:
        return 0  # --merge under a launcher: rank 0 merges alone
    manifest = write_scf_set(args.src, out, only=args.only, source=args.source,
                             live_source=live_source(args.source, bool(args.live_captioner)), keywords=keywords)
    print(format_scf_report(manifest))
    return 0


def add_caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="shard set to caption (left untouched)")
    p.add_argument("--out", required=True, help="new shard set with the captions (shared by every node)")
    p.add_argument(
        "--captioner", help="local image-text-to-text checkpoint dir (spoof images; all if no --live-captioner)"
    )
    p.add_argument("--live-captioner", help="checkpoint dir for live images (SCF step 6: the general captioner)")
    p.add_argument("--only", choices=["all", "spoof", "live"], default="all", help="caption and keep only these labels")
    p.add_argument(
        "--source",
        choices=["general", "spoof_aware"],
        default="general",
        help="caption_source of --captioner's captions",
    )
    p.add_argument("--filter", action="store_true", help="drop spoof captions without their attack type's keywords")
    p.add_argument("--keywords", help="keyword dictionary JSON (default shards/data/keywords.json)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate() call, per rank")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: the rank's GPU if any, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt", default=CAPTION_PROMPT)
    p.add_argument("--merge", action="store_true", help="only merge the cached captions into the shard set")
    p.add_argument("--no-merge", action="store_true", help="caption this rank's share only; merge later with --merge")
