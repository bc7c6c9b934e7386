"""Bytes per sample through the training loader: what each batch carries from the reader workers to the training
process (shared memory) and on to the device (the pinned copy), from real batches of a run's config; and what the
workers' start method costs (trainer.data.batching): the seconds to the first batch, the workers' own memory
(USS: pages no other process shares; PSS: shared pages split among their sharers) and batches per second, for
workers forked from this process ("fork", before) and from the fork server (after).

    python -m trainer.bench.loader [--config launch/configs/demo.yaml] [--batches 8] [key=value ...]

Prints one JSON line (bytes per sample: pixels, integer fields, total; the pixel dtype; the loader's workers;
per start method, with data.num_workers of at least 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from trainer.config import PROJECT_ROOT, load_config


def batch_bytes(batch: dict) -> dict[str, int]:
    """Bytes of the batch's tensors: its pixels and everything else (token and position fields)."""
    pixels = batch["pixel_values"].nbytes
    other = sum(t.nbytes for k, t in batch.items() if isinstance(t, torch.Tensor) and k != "pixel_values")
    return {"pixels": pixels, "ints": other}


def worker_costs(make_batches, batches: int) -> dict[str, float]:
    """Start a loader (``make_batches()``: a fresh iterator), take ``batches`` batches: seconds to the first, batches
    per second after it, and the workers' mean USS and PSS in MiB (psutil; workers are named pt_data_worker)."""
    import psutil

    start = time.perf_counter()
    iterator = make_batches()
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches / (time.perf_counter() - start)
    workers = [p for p in psutil.Process().children(recursive=True) if p.name() == "pt_data_worker"]
    memory = [p.memory_full_info() for p in workers]
    iterator.close()  # stops the workers (a generator: trainer.data.batching)
    return {"first_batch_s": round(first, 3), "batches_per_s": round(rate, 2), "workers": len(workers),
            "worker_uss_mib": round(sum(m.uss for m in memory) / max(len(memory), 1) / 2**20, 1),
            "worker_pss_mib": round(sum(m.pss for m in memory) / max(len(memory), 1) / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    from trainer.data import StreamState, resolve_shards
    from trainer.data.batching import WORKER_START_METHOD
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
    # fork first: the fork server's first loader then pays the server's start, as a rank's first loader does
    workers = max(cfg.data.num_workers, 1)
    starts = {method: worker_costs(lambda: training_batches(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers)), urls, model, tokenizer,
        WorldInfo(0, 0, 1), StreamState(), method)[2], args.batches) for method in ("fork", WORKER_START_METHOD)}
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
                      "num_workers": cfg.data.num_workers, "samples": samples, "start_methods": starts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
