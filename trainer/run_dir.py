"""Every name the trainer writes on disk, in one place: a run's output directory
(``train.output_dir``), the checkpoint tag format and the files of a model directory.
docs/architecture.md ("What a run writes") says which part writes each.

A run directory::

    run_config.json        the resolved RunConfig (rank 0, at start)
    model_config/          ifas_config.json + tokenizer (+ processor/ for LLaVA-form models) + training_data.json
                           (the training shard sets' sources, copied into every export): what export needs
    checkpoints/           step_<N>/ (DeepSpeed shards + layout.json + COMPLETE; universal/ once another
                           world size resumed from it), latest
    tb/                    TensorBoard events (trainer.logs.MetricsWriter)
    sample_keys/           rank<r>.jsonl, with train.log_sample_keys
    eval_history.jsonl     one line per periodic evaluation; best.json: the best step (by the held-out HTER at
                           the dev-fixed threshold, or by AUC without a dev set)
    eval_metrics.json ...  the end-of-training report (trainer.eval.report)
    train_result.json      logged history and final metrics
    preempted              left by a signal-stopped run (launch/slurm.sbatch requeues)
    export/                ifas-export's default output
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "ifas_config.json"  # architecture of a model directory (exported, or a run's model_config/)
CALIBRATION = "calibration.json"  # a decision threshold fixed on held-out training data
EVAL_METRICS = "eval_metrics.json"
EVAL_EXPLANATIONS = "eval_explanations.json"  # explanation metrics per test set (trainer/eval/explain.py)
TRAINING_DATA = "training_data.json"  # in model_config/ and every export: what the model was trained on

# Inside a checkpoint directory.
LATEST = "latest"
COMPLETE = "COMPLETE"
LAYOUT = "layout.json"  # world size and loader workers the checkpoint was written with
UNIVERSAL = "universal"  # step_<N>/universal: the checkpoint in DeepSpeed's universal format


def tag_for(step: int) -> str:
    """The checkpoint directory name of ``step``."""
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` points to, if that checkpoint is complete (None: no checkpoint yet)."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckpt_dir) / tag / COMPLETE).is_file():
        raise RuntimeError(f"{pointer} names {tag}, which is not a complete checkpoint; point it to an older "
                           f"step_* directory that holds a {COMPLETE} file, or remove it to start over")
    return tag


@dataclass(frozen=True)
class RunDir:
    """Paths inside one training output directory."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def run_config(self) -> Path:
        return self.root / "run_config.json"

    @property
    def model_config(self) -> Path:
        return self.root / "model_config"

    @property
    def processor(self) -> Path:
        return self.model_config / "processor"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def sample_keys(self) -> Path:
        return self.root / "sample_keys"

    @property
    def eval_history(self) -> Path:
        return self.root / "eval_history.jsonl"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def train_result(self) -> Path:
        return self.root / "train_result.json"

    @property
    def preempted(self) -> Path:
        return self.root / "preempted"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def is_run(self) -> bool:
        """Whether this looks like a training output directory (it has the model config)."""
        return (self.model_config / CONFIG_NAME).is_file()
