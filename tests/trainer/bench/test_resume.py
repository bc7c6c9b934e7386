"""trainer.resume_bench on small shards: restored streams give the unbroken stream's batch, and the
section reports the ratio to the ~3k row and the target."""
from __future__ import annotations

from trainer.bench.resume import measure, section


def test_resume_bench_measures_and_checks_the_batches(small_shards, tmp_path):
    d = {k: str(v) for k, v in small_shards.items()}
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train_shards: [{d['domain_a']}, {d['domain_b']}]\n  shuffle_buffer: 16\n"
                      "train:\n  micro_batch_size: 4\n")
    results = measure([0, 40, 400], repeats=1, verify_up_to=400, config=str(config))
    assert [r["consumed_samples"] for r in results] == [0, 40, 400]
    assert all(r["same_as_unbroken"] for r in results) and all(r["first_batch_s"] > 0 for r in results)
    text = section(results, "python -m trainer.resume_bench")
    assert "| 400 |" in text and "Target: first batch at 400 consumed <= 2x the time at" in text
