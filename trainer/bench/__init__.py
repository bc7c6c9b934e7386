"""Trainer benchmarks (``python -m trainer.bench`` / ``make bench``): the training throughput below;
``--scale``, the scale rehearsal (trainer/bench/scale.py); ``python -m trainer.bench.resume``, the resume cost
(trainer/bench/resume.py); ``python -m trainer.bench.tables``, the README's tables computed from the code.

Training throughput (trainer/bench/throughput.py measures, trainer/bench/report.py writes):

Measures, on the machine it runs on, in one run, for world sizes 1 and 2 (ZeRO-3, the demo
model and data; ``--model rehearsal``: the scale rehearsal's 0.6B checkpoint as a real run trains it):

- the step-time breakdown of the real training step (data wait, forward, backward, optimizer
  step incl. ZeRO communication, the per-step count all-reduce), samples/s and tokens/s;
- trainer efficiency: that step vs the bare model's forward + backward + AdamW step on rank 0's
  batches, in the same dtype and precision recipe (no DeepSpeed, no loader, no logging; in a process
  of its own after the ranks', with one rank's threads) - target <= 1.10x;
- data headroom: samples/s the shard loader delivers (decode, resize, tokenize, collate) with
  the configured workers vs samples/s the step consumes - target >= 3x, data wait <= 2%;
- ZeRO-3 memory: parameter + gradient + optimizer-state bytes held per rank - target at world
  size 2 <= 0.55x world size 1;
- model FLOPs per step (trainer.model.flops) and MFU against the device's peak (on CPU: against a
  measured fp32 matmul peak, stated as such).

Writes JSON and replaces the ``## Trainer`` section of BENCHMARKS.md. Each world size runs as
``deepspeed --num_gpus N --module trainer.bench --worker``.
"""
