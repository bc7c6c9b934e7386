"""Export a training run's latest ZeRO-3 checkpoint as a model directory (console ``ifas-export``).

The ZeRO shards are consolidated to fp32 weights with DeepSpeed's own ``zero_to_fp32`` reader,
put into a model built from the run's saved architecture, and written with the tokenizer as a
directory that ``IFASModel.from_pretrained`` (ifas-eval, ifas-predict) reads back.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trainer.model import CONFIG_NAME, IFASModel, ModelLoadError
from trainer.tokenizer import load_tokenizer
from trainer.train import CHECKPOINT_DIR, MODEL_CONFIG_DIR, latest_step

log = logging.getLogger("ifas.export")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, tag: str | None = None) -> Path:
    """Consolidate ``run_dir``'s checkpoint (latest unless ``tag``) into ``out_dir`` (default run_dir/export)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = Path(run_dir)
    ckpt_dir = run / CHECKPOINT_DIR
    model_dir = run / MODEL_CONFIG_DIR
    if not (model_dir / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{run} is not a training output directory (no {MODEL_CONFIG_DIR}/{CONFIG_NAME})")
    if tag is None and latest_step(ckpt_dir) is None:
        raise ModelLoadError(f"{ckpt_dir} holds no checkpoint (no 'latest' file); train first")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    model = IFASModel.from_config_dict(json.loads((model_dir / CONFIG_NAME).read_text()))
    out = Path(out_dir) if out_dir is not None else run / "export"
    model.save_pretrained(out, load_tokenizer(model_dir), state_dict=state)
    log.info("exported %s to %s", ckpt_dir, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="training output directory (train.output_dir)")
    parser.add_argument("--out", default=None, help="export directory (default: RUN_DIR/export)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000100 (default: latest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = export_run(args.run_dir, args.out, args.tag)
    except ModelLoadError as exc:
        print(f"ifas-export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
