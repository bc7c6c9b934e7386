import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from trainer.metrics import error_rates, fas_metrics


def _sklearn_eer(scores, live):
    fpr, tpr, thr = roc_curve(live, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    return (fpr[i] + fnr[i]) / 2, thr[i]


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    live = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + 0.8 * live
    m = fas_metrics(scores, live)
    assert m.auc == pytest.approx(roc_auc_score(live, scores))
    eer, thr = _sklearn_eer(scores, live)
    assert m.eer == pytest.approx(eer) and m.eer_threshold == pytest.approx(thr)
    # HTER recomputed by hand at that threshold
    apcer = np.mean(scores[live == 0] >= thr)
    bpcer = np.mean(scores[live == 1] < thr)
    assert m.hter == pytest.approx((apcer + bpcer) / 2)
    assert m.num_live + m.num_spoof == 500


def test_perfect_separation():
    m = fas_metrics(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert m.auc == 1.0 and m.hter == 0.0 and m.eer == 0.0


def test_inverted_scores():
    m = fas_metrics(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1]))
    assert m.auc == 0.0 and m.hter >= 0.5


def test_ties_give_chance():
    m = fas_metrics(np.full(6, 0.5), np.array([0, 1, 0, 1, 0, 1]))
    assert m.auc == 0.5 and m.hter == pytest.approx(0.5)


def test_all_live_is_refused():
    with pytest.raises(ValueError, match="live and spoof"):
        fas_metrics(np.array([0.3, 0.7]), np.array([1, 1]))


def test_error_rates_threshold_is_inclusive():
    apcer, bpcer = error_rates(np.array([0.5, 0.5]), np.array([0, 1]), 0.5)
    assert apcer == 1.0 and bpcer == 0.0
