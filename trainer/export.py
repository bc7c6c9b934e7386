"""Export a training run's latest ZeRO-3 checkpoint as a model directory (console ``ifas-export``).

The ZeRO shards are consolidated to fp32 weights with DeepSpeed's own ``zero_to_fp32`` reader in lazy
mode (the optimizer files are memory-mapped and each tensor is gathered only when written), checked
against a skeleton of the model built on the meta device (names, shapes, tied weights; no memory),
and written tensor by tensor as safetensors: one file, or shards plus an index above
``--max-shard-size``. Peak memory is about one shard, never two copies of the model. The directory
(config, weights, tokenizer) is what ``IFASModel.from_pretrained`` (ifas-eval, ifas-predict) reads.

``--format llava`` writes a model trained without GAC and patch merging (e.g. SCF's captioner,
``data.task=caption``) as a transformers ``LlavaForConditionalGeneration`` + ``LlavaProcessor``
instead (trainer/llava_format.py): what ``ifas-shards caption --captioner`` and any transformers
code load with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from trainer.checkpoint import latest_tag
from trainer.llava_format import NotLlavaCompatible, check_llava_compatible, write_llava
from trainer.model import CONFIG_NAME, IFASModel, ModelLoadError
from trainer.tokenizer import load_tokenizer
from trainer.train import CHECKPOINT_DIR, MODEL_CONFIG_DIR, PROCESSOR_DIR
from trainer.weights import DEFAULT_MAX_SHARD_BYTES, WeightsError, verify_weights, write_weights

log = logging.getLogger("ifas.export")


FORMATS = ("ifas", "llava")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, tag: str | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, fmt: str = "ifas") -> Path:
    """Consolidate ``run_dir``'s checkpoint (latest unless ``tag``) into ``out_dir`` (default
    run_dir/export), in this project's format or (``fmt="llava"``) as a transformers LLaVA."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = Path(run_dir)
    ckpt_dir = run / CHECKPOINT_DIR
    model_dir = run / MODEL_CONFIG_DIR
    if not (model_dir / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{run} is not a training output directory (no {MODEL_CONFIG_DIR}/{CONFIG_NAME})")
    if tag is None:
        try:
            tag = latest_tag(ckpt_dir)  # only a complete checkpoint (see trainer/checkpoint.py)
        except RuntimeError as exc:
            raise ModelLoadError(str(exc)) from exc
        if tag is None:
            raise ModelLoadError(f"{ckpt_dir} holds no checkpoint (no 'latest' file); train first")
    if not (ckpt_dir / tag).is_dir():
        raise ModelLoadError(f"{ckpt_dir / tag} does not exist; pick a tag from {ckpt_dir} or omit --tag")
    config = json.loads((model_dir / CONFIG_NAME).read_text())
    if fmt == "llava":
        try:
            check_llava_compatible(config["arch"])
        except NotLlavaCompatible as exc:
            raise ModelLoadError(f"{run} cannot be exported as LLaVA: {exc}") from exc
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)
    out = Path(out_dir) if out_dir is not None else run / "export"
    if fmt == "llava":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(model_dir / PROCESSOR_DIR))  # saved by the run (build_engine)
        write_llava(config, lazy, processor, out, max_shard_size)
        del lazy
    else:
        with torch.device("meta"):
            skeleton = IFASModel.from_config_dict(config)
        write_weights(skeleton, lazy, out, max_shard_size)
        del lazy
        (out / CONFIG_NAME).write_text(json.dumps(skeleton.config_dict(), indent=2))
        load_tokenizer(model_dir).save_pretrained(str(out))
        verify_weights(skeleton, out)  # read back: every tensor present once, with the model's shapes
    log.info("exported %s to %s", ckpt_dir, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training output directory (train.output_dir)")
    parser.add_argument("--out", default=None, help="export directory (default: RUN_DIR/export)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000100 (default: latest)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_BYTES,
                        help="larger weights are split into shards of at most this size, e.g. 2GB (default 5GB)")
    parser.add_argument("--format", choices=FORMATS, default="ifas",
                        help="ifas: for ifas-eval/ifas-predict (default); llava: a transformers LLaVA, for models "
                             "trained with model.gac=false and model.projector_merge=1 (e.g. SCF's captioner)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = export_run(args.run_dir, args.out, args.tag, args.max_shard_size, args.format)
    except (ModelLoadError, WeightsError) as exc:
        print(f"ifas-export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
