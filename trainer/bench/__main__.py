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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.bench", description=PACKAGE_DOC.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(ROOT / "launch" / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench" / "data"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "trainer_bench.json"))
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
    data = _ensure_data(Path(args.data))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ws in [int(w) for w in args.world_sizes.split(",")]:
            result = Path(tmp) / f"ws{ws}.json"
            domains = f"[{data}/domain_a,{data}/domain_b,{data}/domain_c]"
            overrides = [f"data.train_shards={domains}", f"eval.dev_shards={domains}",
                         f"train.output_dir={tmp}/run{ws}", *args.overrides]
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ws),
                   "--master_port", str(free_port()), "--module", "trainer.bench", "--worker",
                   "--result", str(result), "--config", args.config,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            log.info("world size %d: %s", ws, " ".join(cmd))
            proc = subprocess.run(cmd, cwd=ROOT, env=env)
            if proc.returncode != 0 or not result.is_file():
                log.error("the world-size-%d run failed (exit %d)", ws, proc.returncode)
                return 1
            results.append(json.loads(result.read_text()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    command = "python -m trainer.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(results, command.strip(), os.path.relpath(args.config, ROOT))
    print(text)
    if not args.no_markdown:  # GPU figures get their own section: a GPU run never replaces the CPU one
        on_gpu = results[0]["device"] != "cpu"
        update_section(Path(args.markdown), "trainer-gpu" if on_gpu else "trainer",
                       "Trainer on GPU" if on_gpu else "Trainer", text)
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
