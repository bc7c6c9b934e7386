"""Benchmarks of the shard tools, one module per job (BENCHMARKS.md records their figures):
``python -m shards.bench.face_locations`` (build frames/s, release face locations vs the detector) and
``python -m shards.bench.caption`` (SCF captioning images/s at 1 and 2 ranks, the per-image cost model)."""
