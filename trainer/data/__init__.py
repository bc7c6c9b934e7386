"""The data pipeline: shard sets -> reader slots (rank x loader worker) -> seeded shuffle -> decode -> image
transform (and augmentation) -> prompt and labels -> padded batches.

- ``shard_sets``: resolving the shard sets a run names; ``reader``: raw samples out of tars, damage counted;
- ``epochs``: which raw samples a slot reads in each epoch, from sizes and seeds alone (the resume arithmetic);
- ``rng``: every random stream, derived from (seed, purpose, keys) in one place;
- ``state``: the typed resume state a checkpoint holds; ``stream``: one rank's ``ShardStream``;
- ``decode``, ``transform``, ``augment``, ``samples``: a raw sample into a model sample;
- ``batching``: samples into batches, and the DataLoader.

Bad samples (unreadable shard, corrupt tar, missing member, bad json, undecodable image) are skipped and
counted once each, never fatal. docs/architecture.md, "Resume", says how a stream resumes exactly.
"""
from trainer.data.augment import Augment
from trainer.data.batching import BatchLoader, batch_rows, collate, make_loader
from trainer.data.decode import SKIP_REASONS, BadSample, decode_sample
from trainer.data.samples import HeldOut, SampleMaker
from trainer.data.shard_sets import ShardSetError, resolve_shards
from trainer.data.state import StreamState
from trainer.data.stream import ShardStream, Source, StreamLayout
from trainer.data.transform import ImageTransform

__all__ = ["SKIP_REASONS", "Augment", "BadSample", "BatchLoader", "HeldOut", "ImageTransform", "SampleMaker",
           "ShardSetError", "ShardStream", "Source", "StreamLayout", "StreamState", "batch_rows", "collate",
           "decode_sample", "make_loader", "resolve_shards"]
