"""Benchmark of the fused kernels against the unfused torch paths: ``python -m kernels.bench``.

- ``__main__``: the command line, the report (JSON and the ``## Kernels`` section of BENCHMARKS.md);
- ``lopsided_ce``: the fused lopsided linear cross entropy: cases, targets, the unfused and Liger baselines;
- ``gac_pool``: the GAC multi-layer pooling + LayerNorm: cases;
- ``common``: what both measure with: memory meters, timing, relative error, the machine, number formats.

Nothing is imported here, so importing the package costs nothing (torch loads with a submodule).
"""
