"""FAS metrics against scikit-learn on random scores and on hand-built edge cases."""
import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score, roc_curve

from trainer.eval.metrics import FASMetrics, error_rates, fas_metrics, format_attack_table, format_table, video_level


def _sklearn_eer(scores, live):
    fpr, tpr, thr = roc_curve(live, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    return (fpr[i] + fnr[i]) / 2, thr[i]


def _sklearn_rates(scores, live, threshold):
    """(APCER, BPCER) from scikit-learn's confusion matrix (positive = live, accepted = score >= thr)."""
    tn, fp, fn, tp = confusion_matrix(live, (scores >= threshold).astype(int), labels=[0, 1]).ravel()
    return fp / (fp + tn), fn / (fn + tp)


def _sklearn_tpr_at(scores, live, max_fpr):
    fpr, tpr, _ = roc_curve(live, scores, drop_intermediate=False)
    return tpr[fpr <= max_fpr].max()


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    live = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + 0.8 * live
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    m = fas_metrics(scores, live, threshold=0.3)
    assert m.auc == pytest.approx(roc_auc_score(live, scores))
    eer, thr = _sklearn_eer(scores, live)
    assert m.eer == pytest.approx(eer) and m.eer_threshold == pytest.approx(thr)
    apcer, bpcer = _sklearn_rates(scores, live, thr)
    assert (m.apcer, m.bpcer) == pytest.approx((apcer, bpcer))
    assert m.hter == pytest.approx((apcer + bpcer) / 2)
    assert m.acer == pytest.approx(m.hter)  # no attack types: ACER is HTER
    assert m.tpr_at_fpr1 == pytest.approx(_sklearn_tpr_at(scores, live, 0.01))
    apcer_f, bpcer_f = _sklearn_rates(scores, live, 0.3)
    assert (m.apcer_fixed, m.bpcer_fixed, m.hter_fixed) == pytest.approx((apcer_f, bpcer_f, (apcer_f + bpcer_f) / 2))
    assert m.fixed_threshold == 0.3
    assert m.num_live + m.num_spoof == 500


def test_perfect_separation():
    m = fas_metrics(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]), threshold=0.5)
    assert m.auc == 1.0 and m.hter == 0.0 and m.eer == 0.0 and m.tpr_at_fpr1 == 1.0
    assert m.hter_fixed == 0.0 and m.acer == 0.0


def test_inverted_scores():
    m = fas_metrics(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1]))
    assert m.auc == 0.0 and m.hter >= 0.5 and m.tpr_at_fpr1 == 0.0


def test_ties_give_chance():
    scores, live = np.full(6, 0.5), np.array([0, 1, 0, 1, 0, 1])
    m = fas_metrics(scores, live, threshold=0.5)
    assert m.auc == 0.5 == roc_auc_score(live, scores)
    assert m.hter == pytest.approx(0.5)
    assert (m.apcer_fixed, m.bpcer_fixed) == (1.0, 0.0)  # score >= threshold accepts all ties
    assert m.tpr_at_fpr1 == pytest.approx(_sklearn_tpr_at(scores, live, 0.01)) == 0.0


def test_all_live_has_no_curve_but_a_bpcer():
    scores, live = np.array([0.3, 0.7, 0.9]), np.array([1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk_auc = roc_auc_score(live, scores)  # scikit-learn: undefined (NaN and a warning)
    assert math.isnan(sk_auc)
    with pytest.warns(UserWarning, match="undefined"):
        m = fas_metrics(scores, live, threshold=0.5)
    assert math.isnan(m.auc) and math.isnan(m.eer) and math.isnan(m.hter) and math.isnan(m.tpr_at_fpr1)
    assert m.bpcer_fixed == pytest.approx(1 - recall_score(live, (scores >= 0.5).astype(int)))
    assert math.isnan(m.apcer_fixed) and math.isnan(m.hter_fixed)
    d = m.as_dict()
    assert d["auc"] is None and d["bpcer_fixed"] == pytest.approx(1 / 3)
    json.dumps(d, allow_nan=False)  # valid JSON: NaN became null


def test_all_spoof_has_an_apcer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fas_metrics(np.array([0.3, 0.7]), np.array([0, 0]), threshold=0.5)
    assert m.apcer_fixed == 0.5 and math.isnan(m.bpcer_fixed) and math.isnan(m.auc)


def test_error_rates_threshold_is_inclusive():
    apcer, bpcer = error_rates(np.array([0.5, 0.5]), np.array([0, 1]), 0.5)
    assert apcer == 1.0 and bpcer == 0.0


def test_per_attack_breakdown_and_iso_acer():
    # live 0.9, 0.8, 0.6; print 0.1, 0.2 (easy); replay 0.7, 0.85 (hard)
    scores = np.array([0.9, 0.8, 0.6, 0.1, 0.2, 0.7, 0.85])
    live = np.array([1, 1, 1, 0, 0, 0, 0])
    attacks = ["none", "none", "none", "print", "print", "replay", "replay"]
    m = fas_metrics(scores, live, attacks, threshold=0.65)
    assert set(m.per_attack) == {"print", "replay"}
    p, r = m.per_attack["print"], m.per_attack["replay"]
    assert p.num == 2 and p.auc == 1.0 and p.apcer_fixed == 0.0
    assert r.num == 2 and r.apcer_fixed == 1.0
    assert r.auc == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [0.9, 0.8, 0.6, 0.7, 0.85]))
    # at 0.65: APCER overall 2/4, per type 0 and 1; BPCER 1/3
    assert m.hter_fixed == pytest.approx((0.5 + 1 / 3) / 2)
    assert m.acer_fixed == pytest.approx((1.0 + 1 / 3) / 2)  # the worst attack type counts
    assert "| replay | 2 |" in format_attack_table({"t": m})


def test_video_level_is_the_mean_score_per_video():
    scores = np.array([0.2, 0.4, 0.9, 0.7, 0.6])
    live = np.array([0, 0, 1, 1, 0])
    videos = ["a", "a", "b", "b", "c"]
    v_scores, v_live, v_att = video_level(scores, live, videos, ["print", "print", "none", "none", "mask"])
    assert v_scores.tolist() == pytest.approx([0.3, 0.8, 0.6])
    assert v_live.tolist() == [False, True, False] and v_att == ["print", "none", "mask"]
    m = fas_metrics(scores, live, videos=videos)
    assert m.video is not None and (m.video.num_live, m.video.num_spoof) == (1, 2)
    assert m.video.auc == pytest.approx(roc_auc_score([0, 1, 0], [0.3, 0.8, 0.6]))
    assert fas_metrics(scores, live, videos=["1", "2", "3", "4", "5"]).video is None  # one frame per video
    with pytest.raises(ValueError, match="both live and spoof"):
        video_level(scores, live, ["a", "a", "a", "b", "b"])


def test_tables_print_nan_as_dash():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fas_metrics(np.array([0.3, 0.7]), np.array([1, 1]))
    row = format_table({"live-only": m}).splitlines()[2]
    assert row.startswith("| live-only | frame | 2 | 0 | - | - |")
    assert isinstance(m, FASMetrics)
