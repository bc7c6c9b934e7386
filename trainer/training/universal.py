"""Resuming on another world size through DeepSpeed's universal checkpoints (docs/architecture.md, "Resume",
"Known traps").

- ``convert``: ``ds_to_universal`` turns a ZeRO checkpoint into per-parameter files any world size loads. It runs
  once, on rank 0, before the process group exists (``trainer.dist.rank0_before_group``): at 7B it takes minutes,
  longer than any collective may wait.
- ``repair_optimizer``: DeepSpeed 0.19.8's ZeRO-3 universal loader
  (``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gives every optimizer
  sub-group the same ``step`` tensor, which torch's AdamW then increments once per sub-group per step (8 sub-groups:
  the bias correction runs 8 steps ahead after one step), and copies parameter group 0's settings (lr,
  weight_decay, betas, name) into every group. Both are put back from the converted checkpoint's own optimizer
  state: what a resume at the old world size restores.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class ConversionError(RuntimeError):
    """ds_to_universal failed; the message holds the end of its error output."""


def convert(tag_dir: Path, out: Path) -> None:
    """Convert the ZeRO checkpoint ``tag_dir`` into universal form in ``out`` (replacing a half-written one)."""
    if out.exists():  # a conversion killed half way
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out)]
    log.info("converting %s for another world size: %s", tag_dir, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConversionError(f"converting {tag_dir} to a universal checkpoint failed (exit {proc.returncode}):\n"
                              f"{proc.stderr[-2000:]}")


def group_names(engine) -> list[str | None]:
    """The optimizer's parameter groups as the run built them (take them before the loader overwrites them)."""
    return [group.get("name") for group in engine.optimizer.optimizer.param_groups]


def repair_optimizer(engine, universal_dir: Path, built_groups: list[str | None]) -> None:
    """After ``engine.load_checkpoint`` of ``universal_dir``: each optimizer sub-group its own step tensor, and
    every parameter group its own hyperparameters, as they were saved (``built_groups``: ``group_names`` before the
    load, to check the saved groups are this run's)."""
    import torch

    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    zero = engine.optimizer
    base = zero.optimizer  # torch's AdamW; ZeRO-3 steps it one sub-group (a flat fp32 partition) at a time
    for flat in zero.fp32_partitioned_groups_flat:
        state = base.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()  # the loader gave every sub-group one shared tensor
    saved_names = [group.get("name") for group in saved_groups]
    if saved_names != built_groups:
        raise RuntimeError(f"{universal_dir} holds the optimizer parameter groups {saved_names}, this run builds "
                           f"{built_groups}: resume with the run's own optim.freeze and model settings")
    for group, saved_group in zip(base.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
