"""Bytes per sample through the training loader: what each batch carries from the reader workers to the training
process (shared memory) and on to the device (the pinned copy), from real batches of a run's config.

    python -m trainer.bench.loader [--config launch/configs/demo.yaml] [--batches 8] [key=value ...]

Prints one JSON line (bytes per sample: pixels, integer fields, total; the pixel dtype; the loader's workers).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from trainer.config import PROJECT_ROOT, load_config


def batch_bytes(batch: dict) -> dict[str, int]:
    """Bytes of the batch's tensors: its pixels and everything else (token and position fields)."""
    pixels = batch["pixel_values"].nbytes
    other = sum(t.nbytes for k, t in batch.items() if isinstance(t, torch.Tensor) and k != "pixel_values")
    return {"pixels": pixels, "ints": other}


def main(argv: list[str] | None = None) -> int:
    from trainer.data import StreamState, resolve_shards
    from trainer.dist import WorldInfo
    from trainer.model.build import build_model
    from trainer.training.inputs import prepare_tokenizer
    from trainer.training.loop import training_batches

    parser = argparse.ArgumentParser(prog="python -m trainer.bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(PROJECT_ROOT / "launch" / "configs" / "demo.yaml"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    urls = resolve_shards([s.path for s in cfg.data.train_sources()])
    tokenizer = prepare_tokenizer(cfg, urls)
    model, tokenizer = build_model(cfg.model, tokenizer)
    _, _, batches = training_batches(cfg, urls, model, tokenizer, WorldInfo(0, 0, 1), StreamState())
    totals, samples, dtype = {"pixels": 0, "ints": 0}, 0, None
    for _ in range(args.batches):
        batch = next(batches)
        for k, v in batch_bytes(batch).items():
            totals[k] += v
        samples += batch["pixel_values"].shape[0]
        dtype = str(batch["pixel_values"].dtype).removeprefix("torch.")
    per_sample = {f"{k}_bytes_per_sample": v / samples for k, v in totals.items()}
    print(json.dumps({**per_sample, "bytes_per_sample": sum(totals.values()) / samples, "pixel_dtype": dtype,
                      "num_workers": cfg.data.num_workers, "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
