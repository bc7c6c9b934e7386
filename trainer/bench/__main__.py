"""Benchmarks of the trainer (``python -m trainer.bench`` / ``make bench``): see trainer/bench/__init__.py."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kernels.benchmarks_md import update_section
from trainer.bench import __doc__ as PACKAGE_DOC
from trainer.bench.report import section
from trainer.config import PROJECT_ROOT as ROOT
from trainer.dist import finish_process, free_port, shutdown_distributed
from trainer.logs import setup_logging

log = logging.getLogger("ifas.bench")


def _ensure_data(data_dir: Path) -> Path:
    """Three synthetic domains for the benchmark, made by ``ifas-shards synth`` unless already there."""
    if not (data_dir / "domain_c" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "shards.cli", "synth", "--out", str(data_dir), "--samples-per-domain",
                        "400", "--domains", "domain_a", "domain_b", "domain_c", "--overwrite", "--workers", "2"],
                       cwd=ROOT, check=True)
    return data_dir


def _worker_runs(args: argparse.Namespace):
    """(world size, output dir) -> (the worker's config and overrides, OMP_NUM_THREADS) for ``--model``."""
    if args.model == "rehearsal":
        from trainer.bench import scale

        checkpoint, shards, _ = scale.rehearsal_inputs(ROOT / "runs" / "scale")
        return lambda ws, out: (scale.rehearsal_run_args(checkpoint, shards, out), str(scale.threads_per_rank(ws)))
    data = _ensure_data(Path(args.data))
    domains = f"[{data}/domain_a,{data}/domain_b,{data}/domain_c]"
    threads = os.environ.get("OMP_NUM_THREADS", "1")  # one rank per core
    return lambda ws, out: (["--config", args.config, f"data.train_shards={domains}", f"eval.dev_shards={domains}",
                             f"train.output_dir={out}"], threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.bench", description=PACKAGE_DOC.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(ROOT / "launch" / "configs" / "demo.yaml"))
    parser.add_argument("--model", choices=("demo", "rehearsal"), default="demo",
                        help="demo: --config's model on the benchmark's shards, one rank per core (section 'Trainer'); "
                             "rehearsal: the scale rehearsal's 0.6B checkpoint as a real run trains it, the cores "
                             "shared by the ranks (section 'Trainer at a real width')")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench" / "data"))
    parser.add_argument("--out", help="results JSON (default runs/bench/trainer_bench[_rehearsal].json)")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="file to update")
    parser.add_argument("--no-markdown", action="store_true", help="do not update the markdown file")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--scale", action="store_true",
                        help="run the scale rehearsal instead (trainer/bench/scale.py, section 'Scale "
                             "rehearsal'): its own checkpoint, config and data; --world-sizes and overrides apply")
    parser.add_argument("--label", default="current", help="--scale: the row label (e.g. before/after a change)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.scale:
        return scale_main(args, argv)
    if args.worker:
        try:
            from trainer.bench.throughput import worker

            worker(args)
        finally:
            shutdown_distributed()
        return finish_process(0)
    if args.bare:
        from trainer.bench.throughput import bare

        bare(args)
        return 0
    runs = _worker_runs(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ws in [int(w) for w in args.world_sizes.split(",")]:
            result = Path(tmp) / f"ws{ws}.json"
            run_args, threads = runs(ws, Path(tmp) / f"run{ws}")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ws),
                   "--master_port", str(free_port()), "--module", "trainer.bench", "--worker",
                   "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   *run_args, *args.overrides]
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            log.info("world size %d: %s", ws, " ".join(cmd))
            proc = subprocess.run(cmd, cwd=ROOT, env=env)
            if proc.returncode == 0 and result.is_file():  # then the bare step on rank 0's batches
                proc = subprocess.run([sys.executable, "-m", "trainer.bench", "--bare", "--result", str(result),
                                       "--warmup", str(args.warmup), *run_args, *args.overrides], cwd=ROOT, env=env)
            if proc.returncode != 0 or not result.is_file():
                log.error("the world-size-%d run failed (exit %d)", ws, proc.returncode)
                return 1
            results.append(json.loads(result.read_text()))
    rehearsal = args.model == "rehearsal"
    out = Path(args.out or ROOT / "runs" / "bench" / f"trainer_bench{'_rehearsal' if rehearsal else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    command = "python -m trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    model = "the scale rehearsal's checkpoint (trainer/bench/scale.py)" if rehearsal else \
        f"`{os.path.relpath(args.config, ROOT)}`"
    text = section(results, command.strip(), model, paper=not rehearsal)
    print(text)
    if not args.no_markdown:  # GPU figures get their own sections: a GPU run never replaces the CPU one
        name, heading = ("trainer-rehearsal", "Trainer at a real width") if rehearsal else ("trainer", "Trainer")
        if results[0]["device"] != "cpu":
            name, heading = name + "-gpu", heading + " on GPU"
        update_section(Path(args.markdown), name, heading, text)
    return 0


def scale_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--scale``: rehearse on a real-width checkpoint; keeps other labels' figures in the JSON file."""
    from trainer.bench import scale

    work = ROOT / "runs" / "scale"
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[args.label] = scale.run(work, [int(w) for w in args.world_sizes.split(",")], args.overrides)
    store.write_text(json.dumps(results, indent=2))
    command = "python -m trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = scale.section(results, command.strip())
    print(text)
    if not args.no_markdown:
        update_section(Path(args.markdown), "scale-rehearsal", "Scale rehearsal", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
