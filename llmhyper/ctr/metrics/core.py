"""Evaluation metrics for CTR predictions on a dense (users x ads) matrix, with paired bootstrap.

Conventions
-----------
* ``Y``: (n_users, n_ads) clicks, 0/1 (bool, int or float).
* ``P``: same shape, predicted CTR. Ranking metrics (AUC, NDCG) accept any finite score; probability
  metrics (log loss, ECE, calibration ratio) need values in [0, 1].
* ``mask``: optional boolean array of the same shape; True marks an impression. Default: all pairs.
  Only masked entries are validated and used, so ``Y``/``P`` may hold anything (even NaN) elsewhere.
* A metric that is undefined on the data (one class for AUC, no positives for NDCG, no clicks for
  the calibration ratio, no impressions at all) is ``nan``, never an exception.
* Bad input (shape mismatch, NaN/inf in masked predictions, labels other than 0/1, probabilities
  outside [0, 1] where needed) raises ``ValueError``.

Bootstrap
---------
``paired_bootstrap`` / ``bootstrap_interval`` resample USERS (rows) with replacement. Any callable
``metric(Y, P, mask) -> float`` works: it is recomputed on ``np.take(., idx, axis=0)`` for each
resample. The metrics of this module (``METRICS`` and the public metric functions) carry an exact
fast path instead: a resample of rows is the same as giving each user an integer weight (how many
times it was drawn), so user-level metrics (NDCG) reuse per-user values, additive metrics (log loss,
ECE, calibration ratio) reuse per-user sums, and AUCs reuse one sort of the full data and count
weighted (positive, negative) pairs per tie group. Results equal the recomputation up to float
rounding (the tests check this).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import rankdata

MetricFn = Callable[..., float]


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_labels(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"{what} must be 0/1 clicks; found {y[bad][0]!r} ({int(bad.sum())} bad value(s))")
    return y


def _check_scores(p: np.ndarray, what: str, prob: bool) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    finite = np.isfinite(p)
    if not finite.all():
        raise ValueError(
            f"{what} contains NaN or inf ({int((~finite).sum())} value(s)); predictions must be finite"
        )
    if prob and p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"{what} must be probabilities in [0, 1]; found values in [{p.min():.6g}, {p.max():.6g}]"
        )
    return p


def _prepare(Y, P, mask, *, prob: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate the matrices; return float Y, float P (zeros outside the mask) and a bool mask or None."""
    Y = np.asarray(Y)
    P = np.asarray(P)
    if Y.ndim != 2 or P.ndim != 2:
        raise ValueError(
            f"Y and P must be 2-d (n_users, n_ads) matrices; got Y.ndim={Y.ndim}, P.ndim={P.ndim}"
        )
    if Y.shape != P.shape:
        raise ValueError(f"Y and P shapes differ: Y {Y.shape} vs P {P.shape}")
    if not (np.issubdtype(P.dtype, np.number) or P.dtype == bool):
        raise ValueError(f"P must be numeric; got dtype {P.dtype}")
    if mask is None:
        return _check_labels(Y, "Y"), _check_scores(P, "P", prob), None
    mask = np.asarray(mask)
    if mask.shape != Y.shape:
        raise ValueError(f"mask shape {mask.shape} differs from Y/P shape {Y.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    Yf = np.zeros(Y.shape)
    Pf = np.zeros(P.shape)
    Yf[mask] = _check_labels(Y[mask], "Y (masked entries)")
    Pf[mask] = _check_scores(P[mask], "P (masked entries)", prob)
    return Yf, Pf, mask


def _selected(Y, P, mask) -> tuple[np.ndarray, np.ndarray]:
    """The masked (user, ad) pairs as two flat arrays."""
    if mask is None:
        return Y.ravel(), P.ravel()
    return Y[mask], P[mask]


def _safe_div(num, den):
    """num / den with nan where den == 0 (no warnings)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x, axis=None):
    """nanmean that returns nan (without a warning) when everything is nan."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return _safe_div(np.where(ok, x, 0.0).sum(axis=axis), ok.sum(axis=axis))


# --------------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------------


def _auc_from_ranks(ranks: np.ndarray, y: np.ndarray, valid: np.ndarray | None, axis=None):
    """Mann-Whitney AUC from average ranks along `axis` (invalid entries must rank above all valid)."""
    pos = (y == 1) if valid is None else (y == 1) & valid
    n_pos = pos.sum(axis=axis)
    if valid is not None:
        n_all = valid.sum(axis=axis)
    else:
        n_all = y.size if axis is None else y.shape[axis]
    u = np.where(pos, ranks, 0.0).sum(axis=axis) - n_pos * (n_pos + 1) / 2.0
    return _safe_div(u, n_pos * (n_all - n_pos))


def auc(y, score) -> float:
    """ROC AUC of 1-d labels `y` (0/1) and scores (ties: average ranks); nan if one class only.

    Equal to ``sklearn.metrics.roc_auc_score(y, score)`` whenever that is defined.
    """
    y, score = np.asarray(y), np.asarray(score)
    if y.ndim != 1 or score.ndim != 1:
        raise ValueError(f"auc needs 1-d arrays; got y.ndim={y.ndim}, score.ndim={score.ndim}")
    if y.shape != score.shape:
        raise ValueError(f"y and score lengths differ: {y.shape[0]} vs {score.shape[0]}")
    y = _check_labels(y, "y")
    score = _check_scores(score, "score", prob=False)
    if y.size == 0:
        return float("nan")
    return float(_auc_from_ranks(rankdata(score), y, None))


def pooled_auc(Y, P, mask=None) -> float:
    """AUC over all masked (user, ad) pairs pooled together."""
    Y, P, mask = _prepare(Y, P, mask, prob=False)
    y, p = _selected(Y, P, mask)
    if y.size == 0:
        return float("nan")
    return float(_auc_from_ranks(rankdata(p), y, None))


def per_ad_auc(Y, P, mask=None) -> np.ndarray:
    """AUC of each ad's column over its masked users, shape (n_ads,); nan where a column has one class."""
    Y, P, mask = _prepare(Y, P, mask, prob=False)
    if mask is None:
        return _auc_from_ranks(rankdata(P, axis=0), Y, None, axis=0)
    # masked-out entries get +inf: they rank above every real score and leave the real ranks unchanged
    ranks = rankdata(np.where(mask, P, np.inf), axis=0)
    return _auc_from_ranks(ranks, Y, mask, axis=0)


def mean_per_ad_auc(Y, P, mask=None) -> float:
    """nanmean of `per_ad_auc` (ads whose column has one class are skipped)."""
    return float(_nanmean(per_ad_auc(Y, P, mask)))


# --------------------------------------------------------------------------------------------------
# NDCG
# --------------------------------------------------------------------------------------------------


def ndcg_at_k(Y, P, k: int, mask=None) -> np.ndarray:
    """Per-user NDCG@k, shape (n_users,): each row's masked ads ranked by P, binary gains, 1/log2(rank+1).

    The ideal DCG puts all of the user's masked positives first. Users with no masked positive get nan.
    Ties in P are broken stably: descending score, then ascending column (ad) index, so among equal
    scores the earlier column is ranked first. Without ties this equals
    ``sklearn.metrics.ndcg_score(Y[i:i+1], P[i:i+1], k=k)`` row by row.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    Y, P, mask = _prepare(Y, P, mask, prob=False)
    n_users, n_ads = Y.shape
    kk = min(int(k), n_ads)
    key = -P if mask is None else np.where(mask, -P, np.inf)  # masked-out ads go last
    order = np.argsort(key, axis=1, kind="stable")[:, :kk]
    gains = np.take_along_axis(Y, order, axis=1)  # Y is 0 outside the mask
    disc = 1.0 / np.log2(np.arange(2, kk + 2))
    dcg = gains @ disc
    n_pos = np.minimum(Y.sum(axis=1), kk).astype(np.int64)
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[n_pos]
    return _safe_div(dcg, ideal)


def mean_ndcg_at_k(Y, P, k: int, mask=None) -> float:
    """nanmean of `ndcg_at_k` over users (users with no positives are excluded)."""
    return float(_nanmean(ndcg_at_k(Y, P, k, mask)))


# --------------------------------------------------------------------------------------------------
# probability metrics
# --------------------------------------------------------------------------------------------------


def _pair_log_loss(y, p, eps):
    p = np.clip(p, eps, 1.0 - eps)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def log_loss(Y, P, mask=None, eps: float = 1e-12) -> float:
    """Mean binary cross-entropy over masked pairs, P clipped to [eps, 1-eps] (as sklearn's log_loss)."""
    Y, P, mask = _prepare(Y, P, mask, prob=True)
    y, p = _selected(Y, P, mask)
    if y.size == 0:
        return float("nan")
    return float(_pair_log_loss(y, p, eps).mean())


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def _check_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    return int(n_bins)


def ece(Y, P, mask=None, n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share) * |mean P - click rate| in the bin.

    Bins are equal-width on [0, 1]: [i/n, (i+1)/n), the last one closed at 1.
    """
    n_bins = _check_bins(n_bins)
    Y, P, mask = _prepare(Y, P, mask, prob=True)
    y, p = _selected(Y, P, mask)
    if y.size == 0:
        return float("nan")
    b = _bin_index(p, n_bins)
    gap = np.bincount(b, weights=p, minlength=n_bins) - np.bincount(b, weights=y, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)


def calibration_ratio(Y, P, mask=None) -> float:
    """Mean predicted CTR / observed CTR over masked pairs (1 is calibrated); nan when there is no click."""
    Y, P, mask = _prepare(Y, P, mask, prob=True)
    y, p = _selected(Y, P, mask)
    return float(_safe_div(p.sum(), y.sum()))


# --------------------------------------------------------------------------------------------------
# the metric table
# --------------------------------------------------------------------------------------------------


def _ndcg5(Y, P, mask=None) -> float:
    """Mean NDCG@5 over users with a positive."""
    return mean_ndcg_at_k(Y, P, 5, mask)


def _ndcg10(Y, P, mask=None) -> float:
    """Mean NDCG@10 over users with a positive."""
    return mean_ndcg_at_k(Y, P, 10, mask)


METRICS: dict[str, MetricFn] = {
    "auc": pooled_auc,
    "ad_auc": mean_per_ad_auc,
    "ndcg5": _ndcg5,
    "ndcg10": _ndcg10,
    "logloss": log_loss,
    "ece": ece,
    "calib_ratio": calibration_ratio,
}
