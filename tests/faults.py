"""Fault injection for launched runs, from the outside (nothing in trainer/ knows about it): launch/train.sh with

- ``--nan-at-steps 2,4``: every loss part made NaN at those steps, counted from 1 in this process, as a diverging
  run would (the model's forward and the loop's step function wrapped);
- ``--slow-conversion S``: the conversion of a checkpoint to DeepSpeed's universal form taking S seconds longer.

    deepspeed --num_gpus 2 tests/faults.py --nan-at-steps 2,4 [launch/train.sh's arguments]
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the project, not this script's folder (tests/trainer would pass for trainer)


def poison_losses_at(steps: set[int]) -> None:
    from trainer.model.ifas import IFASModel
    from trainer.training import loop

    state = {"step": 0}
    real_forward, real_step = IFASModel.forward, loop.train_step

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and state["step"] in steps:
            out = out._replace(loss=type(out.loss)(*(part * float("nan") for part in out.loss)))
        return out

    def train_step(*args, **kwargs):
        state["step"] += 1
        return real_step(*args, **kwargs)

    IFASModel.forward = forward
    loop.train_step = train_step


def slow_conversion(seconds: float) -> None:
    import time

    from trainer.training import universal

    real_convert = universal.convert

    def convert(*args, **kwargs):
        time.sleep(seconds)
        return real_convert(*args, **kwargs)

    universal.convert = convert


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nan-at-steps", default="", help="comma-separated steps, counted from 1")
    parser.add_argument("--slow-conversion", type=float, default=0.0, help="seconds")
    args, rest = parser.parse_known_args()
    if args.nan_at_steps:
        poison_losses_at({int(s) for s in args.nan_at_steps.split(",") if s.strip()})
    if args.slow_conversion:
        slow_conversion(args.slow_conversion)
    launcher = ROOT / "launch" / "train.sh"  # its Python part: the real entry
    sys.argv = [str(launcher), *rest]
    runpy.run_path(str(launcher), run_name="__main__")
