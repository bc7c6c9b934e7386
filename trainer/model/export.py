"""Export a training run's ZeRO-3 checkpoint as a model directory (``ifas-export``, and
``ifas-eval --model RUN_DIR``).

The ZeRO shards are consolidated to fp32 weights with DeepSpeed's own ``zero_to_fp32`` reader in lazy
mode (the optimizer files are memory-mapped and each tensor is gathered only when written), checked
against a skeleton of the model built on the meta device (names, shapes, tied weights; no memory),
and written tensor by tensor by ``IFASModel.save_pretrained``: one file, or shards plus an index above
``max_shard_size``. Peak memory is about one shard, never two copies of the model.

``fmt="hf"`` (alias ``llava``) writes a model trained without GAC (e.g. SCF's captioner,
``data.task=caption``) in its checkpoint family's transformers format instead, e.g.
``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (trainer/model/families/hf_format.py): what
``ifas-shards caption --captioner``, inference servers and any transformers code load with
``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from trainer.dist import WorldInfo, rank0_before_group
from trainer.model.arch import ModelLoadError
from trainer.model.families.base import NotFamilyCompatible
from trainer.model.families.hf_format import check_family_compatible, write_family
from trainer.model.ifas import IFASModel
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES
from trainer.run_dir import CONFIG_NAME, TRAINING_DATA, RunDir, latest_tag
from trainer.sample.tokenizer import load_tokenizer

log = logging.getLogger("ifas.export")

FORMATS = ("ifas", "hf", "llava")  # llava: the name hf had before other families
EXPORT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    tag: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    fmt: str = "ifas",
    dtype: str | None = None,
) -> Path:
    """Consolidate ``run_dir``'s checkpoint (latest unless ``tag``) into ``out_dir`` (default
    run_dir/export), in this project's format or (``fmt="hf"``) in its family's transformers format, with
    weights in ``dtype`` (bf16 or fp32; default: the dtype the run trained in)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = RunDir(run_dir)
    ckpt_dir = run.checkpoints
    if not run.is_run():
        raise ModelLoadError(
            f"{run.root} is not a training output directory (no {run.model_config.name}/{CONFIG_NAME})"
        )
    if tag is None:
        try:
            tag = latest_tag(ckpt_dir)  # only a complete checkpoint (see trainer/training/checkpoint.py)
        except RuntimeError as exc:
            raise ModelLoadError(str(exc)) from exc
        if tag is None:
            raise ModelLoadError(f"{ckpt_dir} holds no checkpoint (no 'latest' file); train first")
    if not (ckpt_dir / tag).is_dir():
        raise ModelLoadError(f"{ckpt_dir / tag} does not exist; pick a tag from {ckpt_dir} or omit --tag")
    config = json.loads((run.model_config / CONFIG_NAME).read_text())
    family_format = fmt in ("hf", "llava")
    if family_format:
        try:
            check_family_compatible(config["arch"])
        except NotFamilyCompatible as exc:
            raise ModelLoadError(f"{run.root} cannot be exported in its family's format: {exc}") from exc
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ModelLoadError(f"export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    weights_dtype = getattr(torch, EXPORT_DTYPES[dtype] if dtype else config.get("dtype", "float32"))
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)
    out = Path(out_dir) if out_dir is not None else run.export
    if family_format:  # with the processor the run saved (build_engine)
        write_family(config, lazy, run.processor, out, max_shard_size, weights_dtype)
    else:
        with torch.device("meta"):  # names and shapes only: it never runs, so sdpa whatever the run's kernel
            skeleton = IFASModel.from_config_dict(config, attn_implementation="sdpa")
        skeleton.attn_implementation = config.get("attn_implementation", "sdpa")  # the run's, recorded
        skeleton.save_pretrained(out, load_tokenizer(run.model_config), tensors=lazy, max_shard_size=max_shard_size,
                                 dtype=weights_dtype)
    del lazy
    if (run.model_config / TRAINING_DATA).is_file():  # what the model was trained on travels with it
        shutil.copyfile(run.model_config / TRAINING_DATA, out / TRAINING_DATA)
    log.info("exported %s to %s", ckpt_dir, out)
    return out


def inference_dtype(dev: torch.device) -> torch.dtype:
    """What eval and predict compute in: bf16 on CUDA (as the model trained), fp32 on CPU."""
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


EXPORTED = "EXPORTED"  # marks an on-the-fly export (``model_dir``) complete


def model_dir(path: str | Path, tag: str | None, out_dir: Path, info: WorldInfo) -> Path:
    """The model directory ``path`` names: an exported model as it is, or a training run directory whose
    checkpoint (latest, or ``tag``) rank 0 consolidates into OUT/export_<tag> first. Call it on every rank before
    the process group exists: the other ranks wait on the filesystem, holding no collective open while a large
    model exports (trainer.dist.rank0_before_group)."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    run = RunDir(p)
    if not run.is_run():
        raise ModelLoadError(f"--model {p} is neither an exported model (no {CONFIG_NAME}) nor a training run "
                             f"(no {run.model_config.name}/{CONFIG_NAME}); pass <run>/export or the run directory")
    try:
        tag = tag or latest_tag(run.checkpoints)
    except RuntimeError as exc:
        raise ModelLoadError(str(exc)) from exc
    if tag is None:
        raise ModelLoadError(f"{run.checkpoints} holds no checkpoint (no 'latest' file); train first")
    target = out_dir / f"export_{tag}"  # named by the tag, so an earlier export of it is reused
    rank0_before_group(target / EXPORTED, lambda: export_run(p, target, tag), f"exporting {p} ({tag}) to {target}",
                       info)
    return target
