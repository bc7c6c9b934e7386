"""The synthetic FAS data must not be solvable from global image statistics.

A logistic regression on per-channel mean/std, saturation, Laplacian variance and the
high-frequency energy ratio, trained on three domains, must stay near chance on the fourth
(HTER >= 0.30 at the test set's EER threshold) for every leave-one-domain-out split, while a
linear model on local texture (patch spectra) must transfer, so the task is hard for the right
reason and not just noisy. The full learnability check (a tiny ViT from scratch, a few minutes)
is a timed run, not a test: ``python -m shards.synth``.
"""
from __future__ import annotations

import numpy as np
import pytest

from shards.synth import (
    ALL_DOMAINS,
    generate_demo,
    global_stats_hter,
    hter_at_eer,
    leave_one_domain_out_hter,
    load_arrays,
    local_texture_stats,
)

SAMPLES_PER_DOMAIN = 300
MIN_HTER = 0.30
MAX_LOCAL_HTER = 0.25


@pytest.fixture(scope="module")
def domain_data(tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = tmp_path_factory.mktemp("synth_difficulty")
    dirs = generate_demo(out, samples_per_domain=SAMPLES_PER_DOMAIN, seed=0, samples_per_shard=150)
    return {d.name: load_arrays(d) for d in dirs}


def test_hter_at_eer_reference_values() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert hter_at_eer(labels, np.array([8, 7, 6, 5, 4, 3, 2, 1.0])) == 0.0
    assert hter_at_eer(labels, np.array([1, 2, 3, 4, 5, 6, 7, 8.0])) == 1.0
    assert hter_at_eer(labels, np.array([8, 7, 6, 1, 5, 4, 3, 2.0])) == pytest.approx(0.25)


def test_global_statistics_do_not_transfer_across_domains(domain_data) -> None:
    assert list(domain_data) == list(ALL_DOMAINS)
    for images, labels in domain_data.values():
        assert images.shape[1:] == (128, 128, 3)
        assert 0.45 <= labels.mean() <= 0.55
    hters = global_stats_hter(domain_data)
    print("leave-one-domain-out HTER of LR on global statistics:", {k: round(v, 3) for k, v in hters.items()})
    for domain, hter in hters.items():
        assert hter >= MIN_HTER, f"held-out {domain}: global statistics give HTER {hter:.3f} < {MIN_HTER}"


def test_local_texture_does_transfer_across_domains(domain_data) -> None:
    hters = leave_one_domain_out_hter(domain_data, local_texture_stats, c=0.1)
    print("leave-one-domain-out HTER of LR on patch spectra:", {k: round(v, 3) for k, v in hters.items()})
    for domain, hter in hters.items():
        assert hter <= MAX_LOCAL_HTER, f"held-out {domain}: local texture gives HTER {hter:.3f} > {MAX_LOCAL_HTER}"
