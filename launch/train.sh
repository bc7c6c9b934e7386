#!/usr/bin/env bash
""":"
# I-FAS training launcher. This file is both bash and Python:
#   bash launch/train.sh [--config FILE] [section.key=value ...] [--check]
#       checks the config and inputs once, then starts `deepspeed` on this same file (with
#       --check: only the check); runs .venv/bin/python when it is there, or $PYTHON;
#   deepspeed [--num_gpus N] launch/train.sh [--config FILE] [section.key=value ...]
#       the deepspeed launcher runs `python -u launch/train.sh --local_rank=K ...` per rank,
#       which reads this file as Python (bash's lines are hidden in a string literal).
# Without --config the embedded demo config (launch/configs/demo.yaml) is used.
# IFAS_NUM_RANKS sets the ranks of the bash path (default: all GPUs, or 2 CPU ranks).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
# The project's venv (make install) unless PYTHON names another interpreter; deepspeed runs as a
# module of that interpreter, so nothing needs to be on PATH.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for arg in "$@"; do  # --check: one process checks the config and inputs, no ranks start
  [ "$arg" != "--check" ] || exec "$PYTHON" launch/train.sh "$@"
done
if [ -z "${IFAS_NUM_RANKS:-}" ]; then
  IFAS_NUM_RANKS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${IFAS_NUM_RANKS:-0}" -gt 0 ] || IFAS_NUM_RANKS=2
fi
"$PYTHON" launch/train.sh --check "$@"
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$IFAS_NUM_RANKS" ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
  launch/train.sh "$@"
":"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the cores

if __name__ == "__main__":  # the loader workers' fork server imports this file too (trainer/data/batching.py)
    from trainer.cli.train import main

    args = sys.argv[1:]
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", str(ROOT / "launch" / "configs" / "demo.yaml")] + args
    sys.exit(main(args))
