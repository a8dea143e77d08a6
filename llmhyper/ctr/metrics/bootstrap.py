"""Paired bootstrap over users for the metrics of `metrics.core` (exact fast paths, see its docstring)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from llmhyper.ctr.metrics.core import (
    MetricFn,
    _bin_index,
    _nanmean,
    _ndcg5,
    _ndcg10,
    _pair_log_loss,
    _prepare,
    _safe_div,
    calibration_ratio,
    ece,
    log_loss,
    mean_per_ad_auc,
    ndcg_at_k,
    pooled_auc,
)

# --------------------------------------------------------------------------------------------------
# bootstrap fast paths: metric value for every resample given user multiplicities C (n_boot, n_users)
# --------------------------------------------------------------------------------------------------

_CHUNK_ELEMS = 250_000  # floats per chunk of resamples x negatives (2 MB: stays in cache)


def _weighted_auc(Y, P, mask, C: np.ndarray, by_ad: bool) -> np.ndarray:
    """AUC (pooled -> (n_boot, 1), or per ad -> (n_boot, n_ads)) where user u's pairs count C[b, u] times.

    The negatives are sorted once by (ad, score); a running sum of their weights then gives, for each
    positive, the weight of the negatives of its ad scored below it and tied with it:
    AUC = sum_pos w_pos * (w_neg_below + w_neg_tied / 2) / (W_pos * W_neg).
    """
    n_seg = Y.shape[1] if by_ad else 1
    if Y.size == 0:
        return np.full((C.shape[0], n_seg), np.nan)
    m = np.ones(Y.shape, dtype=bool) if mask is None else mask
    pos, neg = m & (Y == 1), m & (Y == 0)
    seg = np.broadcast_to(np.arange(Y.shape[1]) if by_ad else 0, Y.shape)
    _, rank = np.unique(P, return_inverse=True)  # exact integer codes for the scores
    rank = rank.reshape(Y.shape)
    key = seg * (rank.max() + 1) + rank  # sorts by ad, then score
    neg_r, neg_c = np.nonzero(neg)
    order = np.argsort(key[neg_r, neg_c], kind="stable")
    neg_r, kn = neg_r[order], key[neg_r, neg_c][order]
    pos_c, pos_r = np.nonzero(pos.T)  # positives grouped by ad
    kp, sp = key[pos_r, pos_c], seg[pos_r, pos_c]
    lo, hi = np.searchsorted(kn, kp, "left"), np.searchsorted(kn, kp, "right")
    base = np.searchsorted(kn, sp * (rank.max() + 1), "left")  # first negative of the positive's ad
    first = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]) if sp.size else np.zeros(0, dtype=np.int64)
    n_pos = C @ pos.astype(np.float64)
    n_neg = C @ neg.astype(np.float64)
    if not by_ad:
        n_pos, n_neg = n_pos.sum(axis=1, keepdims=True), n_neg.sum(axis=1, keepdims=True)
    Ct = np.ascontiguousarray(C.T)  # (n_users, n_boot): row gathers and cumsum along axis 0 are fast
    num = np.zeros((n_seg, C.shape[0]))
    step = max(1, _CHUNK_ELEMS // max(1, neg_r.size))
    for b0 in range(0, C.shape[0], step):
        c = Ct[:, b0 : b0 + step]
        cum = np.zeros((neg_r.size + 1, c.shape[1]))
        np.cumsum(c[neg_r], axis=0, out=cum[1:])
        credit = 0.5 * (cum[lo] + cum[hi]) - cum[base]  # below + tied / 2
        if first.size:
            num[sp[first], b0 : b0 + step] = np.add.reduceat(c[pos_r] * credit, first, axis=0)
    return _safe_div(num.T, n_pos * n_neg)


def _boot_pooled_auc(Y, P, mask, C):
    return _weighted_auc(Y, P, mask, C, by_ad=False)[:, 0]


def _boot_ad_auc(Y, P, mask, C):
    return _nanmean(_weighted_auc(Y, P, mask, C, by_ad=True), axis=1)


def _user_sums(values, mask) -> np.ndarray:
    """Row sums of `values` over masked entries."""
    return (values if mask is None else np.where(mask, values, 0.0)).sum(axis=1)


def _n_per_user(Y, mask) -> np.ndarray:
    return np.full(Y.shape[0], float(Y.shape[1])) if mask is None else mask.sum(axis=1).astype(np.float64)


def _boot_log_loss(Y, P, mask, C, eps=1e-12):
    return _safe_div(C @ _user_sums(_pair_log_loss(Y, P, eps), mask), C @ _n_per_user(Y, mask))


def _boot_calibration_ratio(Y, P, mask, C):
    return _safe_div(C @ _user_sums(P, mask), C @ _user_sums(Y, mask))


def _boot_ece(Y, P, mask, C, n_bins=10):
    n_users = Y.shape[0]
    b = _bin_index(P, n_bins) + n_bins * np.arange(n_users)[:, None]  # (user, bin) cell
    m = np.ones(Y.shape, dtype=bool) if mask is None else mask
    cells = b[m]
    gap = (
        np.bincount(cells, weights=P[m], minlength=n_users * n_bins)
        - np.bincount(cells, weights=Y[m], minlength=n_users * n_bins)
    ).reshape(n_users, n_bins)
    return _safe_div(np.abs(C @ gap).sum(axis=1), C @ _n_per_user(Y, mask))


def _user_level(per_user: Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]):
    def boot(Y, P, mask, C):
        v = per_user(Y, P, mask)
        ok = ~np.isnan(v)
        return _safe_div(C @ np.where(ok, v, 0.0), C @ ok.astype(np.float64))

    return boot


# metric -> (needs probabilities, fast resample function)
_FAST: dict[MetricFn, tuple[bool, Callable]] = {
    pooled_auc: (False, _boot_pooled_auc),
    mean_per_ad_auc: (False, _boot_ad_auc),
    _ndcg5: (False, _user_level(lambda Y, P, m: ndcg_at_k(Y, P, 5, m))),
    _ndcg10: (False, _user_level(lambda Y, P, m: ndcg_at_k(Y, P, 10, m))),
    log_loss: (True, _boot_log_loss),
    ece: (True, _boot_ece),
    calibration_ratio: (True, _boot_calibration_ratio),
}


# --------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------


def resample_indices(n_users: int, n_boot: int, seed) -> np.ndarray:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    if n_users < 1:
        raise ValueError("bootstrap needs at least one user (row)")
    return np.random.default_rng(seed).integers(0, n_users, size=(int(n_boot), n_users))


def boot_values(metric: MetricFn, Y, P, mask, idx: np.ndarray) -> np.ndarray:
    """metric on each resample of rows idx[b] (fast path for this module's metrics)."""
    try:
        fast = _FAST.get(metric)
    except TypeError:  # an unhashable callable: no fast path
        fast = None
    if fast is not None:
        prob, fn = fast
        Yc, Pc, mc = _prepare(Y, P, mask, prob=prob)
        n_boot, n_users = idx.shape
        flat = (idx + n_users * np.arange(n_boot)[:, None]).ravel()
        C = np.bincount(flat, minlength=n_boot * n_users).reshape(n_boot, n_users).astype(np.float64)
        return np.asarray(fn(Yc, Pc, mc, C), dtype=np.float64)
    Y, P = np.asarray(Y), np.asarray(P)
    m = None if mask is None else np.asarray(mask)
    return np.array(
        [
            metric(np.take(Y, r, axis=0), np.take(P, r, axis=0), None if m is None else np.take(m, r, axis=0))
            for r in idx
        ],
        dtype=np.float64,
    )


def interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite resampled values (nan if none)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def _check_shape(Y, P, name="P"):
    if np.shape(Y) != np.shape(P):
        raise ValueError(f"Y and {name} shapes differ: Y {np.shape(Y)} vs {name} {np.shape(P)}")


def bootstrap_interval(
    metric: MetricFn, Y, P, mask=None, n_boot: int = 1000, seed=0
) -> tuple[float, float, float]:
    """(value on the full data, 2.5% and 97.5% percentiles over `n_boot` user resamples).

    Uses the same resamples as `paired_bootstrap` with the same seed, so it reproduces its a/a_lo/a_hi.
    `n_boot=0` asks for no interval: lo and hi are None.
    """
    _check_shape(Y, P)
    value = float(metric(Y, P, mask))
    if isinstance(n_boot, int) and not isinstance(n_boot, bool) and n_boot == 0:
        return value, None, None
    idx = resample_indices(np.shape(Y)[0], n_boot, seed)
    lo, hi = interval(boot_values(metric, Y, P, mask, idx))
    return value, lo, hi


def paired_bootstrap(metric: MetricFn, Y, P_a, P_b, mask=None, n_boot: int = 1000, seed=0) -> dict:
    """Paired user-level bootstrap of method a vs b: both scored on the SAME resamples of users (rows).

    Returns a dict of floats: ``a`` (metric of a on the full data) with ``a_lo``/``a_hi`` (95% percentile
    interval), ``diff`` = metric(a) - metric(b) on the full data with ``diff_lo``/``diff_hi``, and
    ``p_value``: two-sided bootstrap p-value of diff = 0, 2 * min(share of resampled diffs <= 0,
    share >= 0), capped at 1 and floored at 1 / (n_boot + 1). Resampled diffs within 1e-12 (relative)
    of 0 count as exact ties. Resamples on which the metric is undefined (nan, e.g. one class for AUC)
    are left out of the intervals and of the p-value. `n_boot=0` asks for no resamples: the intervals and
    the p-value are None.
    """
    _check_shape(Y, P_a, "P_a")
    _check_shape(Y, P_b, "P_b")
    a, b = float(metric(Y, P_a, mask)), float(metric(Y, P_b, mask))
    if isinstance(n_boot, int) and not isinstance(n_boot, bool) and n_boot == 0:
        return {
            "a": a,
            "a_lo": None,
            "a_hi": None,
            "diff": a - b,
            "diff_lo": None,
            "diff_hi": None,
            "p_value": None,
        }
    idx = resample_indices(np.shape(Y)[0], n_boot, seed)
    va = boot_values(metric, Y, P_a, mask, idx)
    vb = boot_values(metric, Y, P_b, mask, idx)
    d = va - vb
    d[np.abs(d) <= 1e-12 * np.maximum(np.abs(va), np.abs(vb))] = 0.0  # float-rounding noise is a tie
    d = d[np.isfinite(d)]
    a_lo, a_hi = interval(va)
    diff_lo, diff_hi = interval(d)
    if d.size:
        p = 2.0 * min(np.mean(d <= 0), np.mean(d >= 0))
        p = float(min(1.0, max(p, 1.0 / (n_boot + 1))))
    else:
        p = float("nan")
    return {
        "a": a,
        "a_lo": a_lo,
        "a_hi": a_hi,
        "diff": a - b,
        "diff_lo": diff_lo,
        "diff_hi": diff_hi,
        "p_value": p,
    }
