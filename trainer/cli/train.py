"""``ifas-train`` (and ``launch/train.sh``): check the run's inputs, then train with DeepSpeed ZeRO-3.

    deepspeed --num_gpus 2 launch/train.sh --config launch/configs/demo.yaml train.max_steps=100

Exit status: 0 done (or stopped by a signal after saving), 2 a user error (the message names the
file or key and the fix), 3 the run halted itself after saving (e.g. non-finite steps).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.data import ShardSetError
from trainer.dist import finish_process, shutdown_distributed, world_info_from_env
from trainer.logs import setup_logging
from trainer.model.arch import ModelLoadError
from trainer.model.export import model_dir
from trainer.sample.tokenizer import TokenizerError
from trainer.training.grpo.loop import train_grpo
from trainer.training.inputs import check_inputs, check_model_files, check_sequence_budget, prepare_tokenizer
from trainer.training.loop import TrainingHalted, train

log = logging.getLogger("ifas.train")
USER_ERRORS = (ConfigError, ShardSetError, TokenizerError, ModelLoadError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    return finish_process(_main(argv))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-train", description="Train I-FAS with DeepSpeed ZeRO-3.")
    parser.add_argument("--config", help="run config YAML (see launch/configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="validate config and inputs, then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=50")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before and after --config
    setup_logging(int(os.environ.get("RANK", 0)), force=True)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.train.stage == "grpo":  # an SFT run directory: its latest checkpoint consolidated once, rank 0 first
            cfg.model.init_from = str(model_dir(cfg.model.init_from, None, Path(cfg.train.output_dir) / "init",
                                                world_info_from_env()))
        train_urls, eval_urls = check_inputs(cfg)
        tokenizer = prepare_tokenizer(cfg, train_urls)
        check_model_files(cfg, tokenizer)
        check_sequence_budget(cfg, tokenizer)
        if args.check:
            log.info("config and inputs are valid")
            return 0
        try:
            (train_grpo if cfg.train.stage == "grpo" else train)(cfg, train_urls, eval_urls, tokenizer)
        finally:
            shutdown_distributed()
    except USER_ERRORS as exc:
        print(f"ifas-train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingHalted as exc:
        print(f"ifas-train: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
