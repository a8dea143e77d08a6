"""Tests for llmhyper.ctr.metrics: scikit-learn agreement, hand-computed cases, edge cases, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import ndcg_score, roc_auc_score

from llmhyper.ctr import metrics as M


def _data(seed, n_users=30, n_ads=12, rate=0.25, decimals=None):
    """Random clicks and predictions; `decimals` rounds P to create ties."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n_users, n_ads)) < rate).astype(int)
    P = np.clip(0.2 + 0.3 * Y + 0.5 * rng.random((n_users, n_ads)) - 0.1, 0.001, 0.999)
    if decimals is not None:
        P = P.round(decimals)
    mask = rng.random((n_users, n_ads)) < 0.75
    return Y, P, mask


# --------------------------------------------------------------------------------------------------
# hand-computed 2 x 3 example
# --------------------------------------------------------------------------------------------------
#   Y = [[1, 0, 1],      P = [[0.9, 0.8, 0.3],
#        [0, 1, 0]]           [0.2, 0.6, 0.4]]
#
# pooled AUC: positives 0.9, 0.3, 0.6 vs negatives 0.8, 0.2, 0.4:
#   0.9 beats 3, 0.3 beats 1 (0.2), 0.6 beats 2 (0.2, 0.4)  -> 6 / 9 = 2/3
# per-ad AUC: ad0 (1:0.9, 0:0.2) -> 1;  ad1 (0:0.8, 1:0.6) -> 0;  ad2 (1:0.3, 0:0.4) -> 0;  mean 1/3
# NDCG@2 user0: ranking ad0(1), ad1(0), ad2(1): DCG = 1/log2(2) = 1, IDCG = 1 + 1/log2(3) -> 0.6131
#        user1: ranking ad1(1), ad2(0), ad0(0): DCG = IDCG = 1 -> 1
# NDCG@3 user0: DCG = 1 + 1/log2(4) = 1.5 -> 1.5 / (1 + 1/log2(3)) = 0.9197
# log loss: -(ln .9 + ln .2 + ln .3 + ln .8 + ln .6 + ln .6) / 6 = 0.693928
# ECE, 10 bins: every pair in its own bin -> (.1 + .8 + .7 + .2 + .4 + .4) / 6 = 2.6 / 6
# ECE, 2 bins: [0,.5): P .3 .2 .4 (sum .9), clicks 1 -> |.9 - 1| = .1;
#              [.5,1]: P .9 .8 .6 (sum 2.3), clicks 2 -> .3;   (.1 + .3) / 6 = 1/15
# calibration ratio: mean P 3.2/6 over CTR 3/6 = 3.2/3
# with mask hiding (0, 1) (P .8, no click):
#   pooled AUC: 0.9 beats 2, 0.3 beats 1, 0.6 beats 2 -> 5/6; ad1 has one class -> nan; mean (1 + 0)/2
#   NDCG@2 user0: ad0(1), ad2(1) -> DCG = IDCG -> 1
Y2 = np.array([[1, 0, 1], [0, 1, 0]])
P2 = np.array([[0.9, 0.8, 0.3], [0.2, 0.6, 0.4]])


def test_tiny_example_by_hand():
    g = 1 / math.log2(3)
    assert M.pooled_auc(Y2, P2) == pytest.approx(2 / 3)
    np.testing.assert_allclose(M.per_ad_auc(Y2, P2), [1, 0, 0])
    assert M.mean_per_ad_auc(Y2, P2) == pytest.approx(1 / 3)
    np.testing.assert_allclose(M.ndcg_at_k(Y2, P2, 2), [1 / (1 + g), 1])
    np.testing.assert_allclose(M.ndcg_at_k(Y2, P2, 3), [1.5 / (1 + g), 1])
    assert M.mean_ndcg_at_k(Y2, P2, 2) == pytest.approx((1 / (1 + g) + 1) / 2)
    expected_ll = -(math.log(.9) + math.log(.2) + math.log(.3) + math.log(.8) + 2 * math.log(.6)) / 6
    assert M.log_loss(Y2, P2) == pytest.approx(expected_ll)
    assert M.ece(Y2, P2) == pytest.approx(2.6 / 6)
    assert M.ece(Y2, P2, n_bins=2) == pytest.approx(1 / 15)
    assert M.calibration_ratio(Y2, P2) == pytest.approx(3.2 / 3)


def test_tiny_example_with_mask_by_hand():
    mask = np.ones((2, 3), dtype=bool)
    mask[0, 1] = False
    assert M.pooled_auc(Y2, P2, mask) == pytest.approx(5 / 6)
    np.testing.assert_allclose(M.per_ad_auc(Y2, P2, mask), [1, np.nan, 0])
    assert M.mean_per_ad_auc(Y2, P2, mask) == pytest.approx(0.5)
    np.testing.assert_allclose(M.ndcg_at_k(Y2, P2, 2, mask), [1, 1])
    # an integer 0/1 mask is accepted too
    assert M.pooled_auc(Y2, P2, mask.astype(int)) == pytest.approx(5 / 6)


# --------------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------------

def test_auc_small_cases():
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert M.auc([1, 0, 1], [3.0, -2.0, 0.5]) == pytest.approx(1.0)  # any finite score, not only [0,1]
    assert M.auc([True, False], [0.2, 0.7]) == pytest.approx(0.0)


def test_auc_one_class_or_empty_is_nan():
    assert math.isnan(M.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(M.auc([0, 0], [0.1, 0.2]))
    assert math.isnan(M.auc([], []))
    Y = np.array([[1, 0], [1, 1]])
    P = np.array([[0.3, 0.1], [0.5, 0.2]])
    out = M.per_ad_auc(Y, P)
    assert math.isnan(out[0]) and out[1] == pytest.approx(1.0)  # ad0: all clicks -> nan
    assert M.mean_per_ad_auc(Y, P) == pytest.approx(1.0)
    assert math.isnan(M.pooled_auc(Y, P, np.zeros((2, 2), dtype=bool)))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 8, 300) / 8  # heavy ties
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    s = rng.normal(size=300)
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pooled_and_per_ad_auc_match_sklearn(seed):
    Y, P, mask = _data(seed, decimals=1)
    assert M.pooled_auc(Y, P) == pytest.approx(roc_auc_score(Y.ravel(), P.ravel()), abs=1e-12)
    assert M.pooled_auc(Y, P, mask) == pytest.approx(roc_auc_score(Y[mask], P[mask]), abs=1e-12)
    for m in (None, mask):
        got = M.per_ad_auc(Y, P, m)
        mm = np.ones_like(mask) if m is None else m
        want = []
        for j in range(Y.shape[1]):
            y, p = Y[mm[:, j], j], P[mm[:, j], j]
            want.append(roc_auc_score(y, p) if 0 < y.sum() < y.size else np.nan)
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert M.mean_per_ad_auc(Y, P, m) == pytest.approx(np.nanmean(want), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# NDCG
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5, 10, 50])
def test_ndcg_matches_sklearn_without_ties(k):
    Y, P, _ = _data(7, n_users=25, n_ads=20)
    assert len(np.unique(P)) == P.size
    got = M.ndcg_at_k(Y, P, k)
    for i in range(Y.shape[0]):
        if Y[i].sum() == 0:
            assert math.isnan(got[i])
        else:
            assert got[i] == pytest.approx(ndcg_score(Y[i:i + 1], P[i:i + 1], k=k), abs=1e-12)


def test_ndcg_mask_matches_sklearn_on_the_impressions():
    Y, P, mask = _data(8, n_users=25, n_ads=20)
    got = M.ndcg_at_k(Y, P, 5, mask)
    for i in range(Y.shape[0]):
        y, p = Y[i, mask[i]], P[i, mask[i]]
        if y.sum() == 0:
            assert math.isnan(got[i])
        elif y.size > 1:
            assert got[i] == pytest.approx(ndcg_score(y[None], p[None], k=5), abs=1e-12)


def test_ndcg_ties_broken_by_column_order():
    Y = np.array([[0, 1, 0], [1, 0, 0]])
    P = np.full((2, 3), 0.5)
    # equal scores: ranked ad0, ad1, ad2 -> user0's click at rank 2, user1's at rank 1
    np.testing.assert_allclose(M.ndcg_at_k(Y, P, 1), [0.0, 1.0])
    np.testing.assert_allclose(M.ndcg_at_k(Y, P, 2), [1 / math.log2(3), 1.0])


def test_ndcg_user_without_positives_is_excluded():
    Y = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    P = np.array([[0.9, 0.1, 0.2], [0.5, 0.6, 0.7], [0.3, 0.2, 0.1]])
    out = M.ndcg_at_k(Y, P, 3)
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1]) and out[2] == pytest.approx(0.5)
    assert M.mean_ndcg_at_k(Y, P, 3) == pytest.approx(0.75)
    assert math.isnan(M.mean_ndcg_at_k(np.zeros((2, 3)), P[:2], 3))
    # a positive hidden by the mask does not count
    mask = np.ones((3, 3), dtype=bool)
    mask[0, 0] = False
    assert math.isnan(M.ndcg_at_k(Y, P, 3, mask)[0])


def test_ndcg_bad_k():
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            M.ndcg_at_k(Y2, P2, k)


# --------------------------------------------------------------------------------------------------
# probability metrics
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_log_loss_matches_sklearn(seed):
    Y, P, mask = _data(seed)
    assert M.log_loss(Y, P) == pytest.approx(sk_log_loss(Y.ravel(), P.ravel(), labels=[0, 1]), rel=1e-12)
    assert M.log_loss(Y, P, mask) == pytest.approx(sk_log_loss(Y[mask], P[mask], labels=[0, 1]), rel=1e-12)
    # clipping keeps it finite at 0 and 1
    Pc = P.copy()
    Pc[Y == 1] = 0.0
    assert np.isfinite(M.log_loss(Y, Pc))


def _ece_loop(y, p, n_bins):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (p >= lo) & ((p < hi) if b < n_bins - 1 else (p <= hi))
        if sel.any():
            total += sel.sum() / p.size * abs(p[sel].mean() - y[sel].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15])
def test_ece_matches_loop(n_bins):
    Y, P, mask = _data(3, decimals=3)
    P[0, :3] = [0.0, 1.0, 0.5]  # the end points fall in the first / last bin
    assert M.ece(Y, P, n_bins=n_bins) == pytest.approx(_ece_loop(Y.ravel(), P.ravel(), n_bins), abs=1e-12)
    assert M.ece(Y, P, mask, n_bins) == pytest.approx(_ece_loop(Y[mask], P[mask], n_bins), abs=1e-12)


def test_ece_and_calibration_ratio_perfect_and_biased():
    Y = np.array([[1, 0, 0, 0]] * 5)
    P = np.full(Y.shape, 0.25)
    assert M.ece(Y, P) == pytest.approx(0.0)
    assert M.calibration_ratio(Y, P) == pytest.approx(1.0)
    assert M.calibration_ratio(Y, 2 * P) == pytest.approx(2.0)
    assert math.isnan(M.calibration_ratio(np.zeros((2, 2)), np.full((2, 2), 0.1)))  # no clicks


# --------------------------------------------------------------------------------------------------
# validation and masks
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_value_error():
    Y, P = Y2, P2
    with pytest.raises(ValueError, match="shapes differ"):
        M.pooled_auc(Y, P[:, :2])
    with pytest.raises(ValueError, match="mask shape"):
        M.log_loss(Y, P, np.ones((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="2-d"):
        M.ece(Y.ravel(), P.ravel())
    with pytest.raises(ValueError, match="1-d"):
        M.auc(Y, P)
    with pytest.raises(ValueError, match="lengths differ"):
        M.auc([0, 1], [0.1, 0.2, 0.3])
    for bad in (np.nan, np.inf, -np.inf):
        Pb = P.copy()
        Pb[1, 2] = bad
        for fn in M.METRICS.values():
            with pytest.raises(ValueError, match="NaN or inf"):
                fn(Y, Pb, None)
    for bad in (1.5, -0.1):
        Pb = P.copy()
        Pb[0, 0] = bad
        for fn in (M.log_loss, M.ece, M.calibration_ratio):
            with pytest.raises(ValueError, match=r"\[0, 1\]"):
                fn(Y, Pb)
        M.pooled_auc(Y, Pb)  # ranking metrics accept any finite score
    with pytest.raises(ValueError, match="0/1"):
        M.pooled_auc(np.array([[1, 2, 0], [0, 1, 0]]), P)
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(Y, P, n_bins=0)


def test_entries_outside_the_mask_are_ignored():
    Y, P, mask = _data(11)
    Yn, Pn = Y.astype(float), P.copy()
    Yn[~mask], Pn[~mask] = np.nan, np.nan  # garbage where there is no impression
    for name, fn in M.METRICS.items():
        a, b = fn(Y, P, mask), fn(Yn, Pn, mask)
        assert a == pytest.approx(b, abs=1e-12, nan_ok=True), name


def test_metrics_table():
    assert set(M.METRICS) == {"auc", "ad_auc", "ndcg5", "ndcg10", "logloss", "ece", "calib_ratio"}
    Y, P, mask = _data(2)
    assert M.METRICS["auc"](Y, P, mask) == M.pooled_auc(Y, P, mask)
    assert M.METRICS["ad_auc"](Y, P, mask) == M.mean_per_ad_auc(Y, P, mask)
    assert M.METRICS["ndcg5"](Y, P, mask) == M.mean_ndcg_at_k(Y, P, 5, mask)
    assert M.METRICS["ndcg10"](Y, P, None) == M.mean_ndcg_at_k(Y, P, 10)
    for fn in M.METRICS.values():
        assert isinstance(fn(Y, P, mask), float)


# --------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------

KEYS = {"a", "a_lo", "a_hi", "diff", "diff_lo", "diff_hi", "p_value"}


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_bootstrap_same_method_is_zero_with_p_one(name):
    Y, P, mask = _data(4)
    r = M.paired_bootstrap(M.METRICS[name], Y, P, P.copy(), mask, n_boot=200, seed=1)
    assert set(r) == KEYS
    assert r["diff"] == 0.0 and r["diff_lo"] == 0.0 and r["diff_hi"] == 0.0
    assert r["p_value"] == 1.0
    assert r["a"] == M.METRICS[name](Y, P, mask)
    assert r["a_lo"] <= r["a"] <= r["a_hi"]


@pytest.mark.parametrize("name", ["auc", "ad_auc", "ndcg5", "ndcg10"])
def test_bootstrap_clearly_better_method(name):
    rng = np.random.default_rng(5)
    Y = (rng.random((60, 20)) < 0.3).astype(int)
    good = np.clip(0.3 + 0.4 * Y + 0.2 * rng.random(Y.shape), 0, 1)
    bad = rng.random(Y.shape)
    r = M.paired_bootstrap(M.METRICS[name], Y, good, bad, n_boot=300, seed=0)
    assert r["diff"] > 0 and r["diff_lo"] > 0
    assert r["p_value"] == pytest.approx(1 / 301)
    r = M.paired_bootstrap(M.METRICS[name], Y, bad, good, n_boot=300, seed=0)  # and the other way round
    assert r["diff_hi"] < 0 and r["p_value"] == pytest.approx(1 / 301)


def test_bootstrap_logloss_better_method_is_lower():
    rng = np.random.default_rng(6)
    Y = (rng.random((60, 20)) < 0.3).astype(int)
    good = np.clip(0.2 + 0.6 * Y, 0, 1)
    r = M.paired_bootstrap(M.log_loss, Y, good, np.full(Y.shape, 0.5), n_boot=200)
    assert r["diff_hi"] < 0 and r["p_value"] < 0.01


def test_bootstrap_is_deterministic_under_the_seed():
    Y, P, mask = _data(9)
    _, P2b, _ = _data(10)
    P2b = P2b[: Y.shape[0], : Y.shape[1]]
    for fn in (M.pooled_auc, M.METRICS["ndcg5"], M.log_loss):
        r1 = M.paired_bootstrap(fn, Y, P, P2b, mask, n_boot=100, seed=3)
        r2 = M.paired_bootstrap(fn, Y, P, P2b, mask, n_boot=100, seed=3)
        r3 = M.paired_bootstrap(fn, Y, P, P2b, mask, n_boot=100, seed=4)
        assert r1 == r2
        assert (r1["a_lo"], r1["a_hi"]) != (r3["a_lo"], r3["a_hi"])
        assert r1["a"] == r3["a"] and r1["diff"] == r3["diff"]


@pytest.mark.parametrize("use_mask", [False, True])
def test_bootstrap_fast_paths_equal_recomputation_on_resampled_rows(use_mask):
    """Each METRICS entry has an exact fast path; a plain wrapper forces np.take recomputation."""
    Y, P, mask = _data(12, n_users=25, n_ads=10, decimals=1)  # ties in P
    Yb, Pb, _ = _data(13, n_users=25, n_ads=10, decimals=2)
    m = mask if use_mask else None
    for name, fn in M.METRICS.items():
        fast = M.paired_bootstrap(fn, Y, P, Pb, m, n_boot=60, seed=2)
        slow = M.paired_bootstrap(lambda y, p, mk, fn=fn: fn(y, p, mk), Y, P, Pb, m, n_boot=60, seed=2)
        for key in KEYS:
            assert fast[key] == pytest.approx(slow[key], abs=1e-12, nan_ok=True), (name, key)


def test_bootstrap_generic_metric_and_interval():
    Y, P, mask = _data(14)
    ndcg3 = lambda y, p, m: M.mean_ndcg_at_k(y, p, 3, m)  # noqa: E731  (no fast path)
    value, lo, hi = M.bootstrap_interval(ndcg3, Y, P, mask, n_boot=100, seed=7)
    assert value == M.mean_ndcg_at_k(Y, P, 3, mask) and lo <= value <= hi
    r = M.paired_bootstrap(ndcg3, Y, P, 1 - P, mask, n_boot=100, seed=7)
    assert (r["a"], r["a_lo"], r["a_hi"]) == (value, lo, hi)
    for fn in M.METRICS.values():  # bootstrap_interval uses the same resamples as paired_bootstrap
        r = M.paired_bootstrap(fn, Y, P, 1 - P, mask, n_boot=50, seed=1)
        assert M.bootstrap_interval(fn, Y, P, mask, n_boot=50, seed=1) == (r["a"], r["a_lo"], r["a_hi"])


def test_no_resamples_means_no_intervals():
    r = M.paired_bootstrap(M.pooled_auc, Y2, P2, 1 - P2, n_boot=0)
    assert r["a"] == pytest.approx(2 / 3) and r["diff"] == pytest.approx(2 / 3 - M.pooled_auc(Y2, 1 - P2))
    assert r["a_lo"] is r["a_hi"] is r["diff_lo"] is r["diff_hi"] is r["p_value"] is None
    assert M.bootstrap_interval(M.pooled_auc, Y2, P2, n_boot=0) == (pytest.approx(2 / 3), None, None)


def test_bootstrap_bad_arguments():
    with pytest.raises(ValueError, match="n_boot"):
        M.paired_bootstrap(M.pooled_auc, Y2, P2, P2, n_boot=-1)
    with pytest.raises(ValueError, match="P_b"):
        M.paired_bootstrap(M.pooled_auc, Y2, P2, P2[:, :2])
    with pytest.raises(ValueError, match="shapes differ"):
        M.bootstrap_interval(M.log_loss, Y2, P2[:1])
