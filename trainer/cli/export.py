"""``ifas-export RUN_DIR``: a training run's checkpoint as a model directory (trainer/model/export.py)."""
from __future__ import annotations

import argparse
import sys

from trainer.logs import setup_logging
from trainer.model.arch import ModelLoadError
from trainer.model.export import EXPORT_DTYPES, FORMATS, export_run
from trainer.model.weights import DEFAULT_MAX_SHARD_BYTES, WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-export", description="Export a training run's checkpoint as a model "
                                                                     "directory.")
    parser.add_argument("run_dir", help="training output directory (train.output_dir)")
    parser.add_argument("--out", default=None, help="export directory (default: RUN_DIR/export)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000100 (default: latest)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_BYTES,
                        help="larger weights are split into shards of at most this size, e.g. 2GB (default 5GB)")
    parser.add_argument("--format", choices=FORMATS, default="ifas",
                        help="ifas: for ifas-eval/ifas-predict (default); hf (alias llava): the checkpoint family's "
                             "transformers format (LLaVA, LLaVA-NeXT/OneVision, InternVL, Qwen-VL) that "
                             "AutoModelForImageTextToText loads, for models trained with model.gac=false "
                             "(e.g. SCF's captioner)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="dtype of the written weights (default: the dtype the run trained in: bf16 on CUDA)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        out = export_run(args.run_dir, args.out, args.tag, args.max_shard_size, args.format, args.dtype)
    except (ModelLoadError, WeightsError) as exc:
        print(f"ifas-export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
