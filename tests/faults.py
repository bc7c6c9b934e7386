"""Fault injection for launched runs, from the outside: launch/train.sh with its loss made NaN at chosen steps.

    deepspeed --num_gpus 2 tests/faults.py --nan-at-steps 2,4 [launch/train.sh's arguments]

It wraps the model's forward and the loop's step function (nothing in trainer/ knows about it), counts the steps
this process runs (1, 2, ...) and poisons every loss part of the listed ones, as a diverging run would.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nan-at-steps", required=True, help="comma-separated steps, counted from 1")
    args, rest = parser.parse_known_args()
    poison_losses_at({int(s) for s in args.nan_at_steps.split(",") if s.strip()})
    launcher = Path(__file__).resolve().parent.parent / "launch" / "train.sh"  # its Python part: the real entry
    sys.argv = [str(launcher), *rest]
    runpy.run_path(str(launcher), run_name="__main__")
