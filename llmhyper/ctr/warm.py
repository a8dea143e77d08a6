"""Warm per-ad models: L2-regularised logistic regression with intercept, one per ad.

Trained on the train users' impressions only. For retired ads these are the weights the LLM sees in its
few-shot examples; for active ads they are the LR_warm upper bound (what a week of clicks would give).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from tqdm import tqdm

from llmhyper.data.contract import CTRData
from llmhyper.errors import DataError
from llmhyper.weights import WeightTable


def fit_logistic(X: np.ndarray, y: np.ndarray, C: float = 0.1) -> tuple[np.ndarray, float]:
    """One L2-regularised logistic regression (lbfgs); returns (theta, intercept)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=2000, solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def train_warm(
    data: CTRData,
    ad_ids: list[str],
    *,
    C: float = 0.1,
    min_pos: int = 20,
    min_neg: int = 20,
    method: str = "lr_warm",
    progress: bool = True,
) -> WeightTable:
    """Fit one LR per ad on train users; ads with fewer than `min_pos` clicks or `min_neg` non-clicks
    among train users are skipped (recorded in `meta['skipped']`).

    When no ad reaches the floor (a small data set), the floor is lowered to the highest one that keeps three
    ads (or as many as have a click and a non-click), said on stderr and in `meta['floor_lowered']`, rather
    than returning nothing to retrieve from; if no ad has both, asking for a floor above 1 is a DataError."""
    users = data.train_users
    counts = {}
    for ad in ad_ids:
        j = data.ad_index[ad]
        shown = data.M[users, j]
        y = data.Y[users, j][shown]
        counts[ad] = (int(y.sum()), int(shown.sum()) - int(y.sum()))
    lowered = None
    if ad_ids and not any(p >= min_pos and n >= min_neg for p, n in counts.values()):
        floors = sorted((min(p, n) for p, n in counts.values()), reverse=True)
        floor = min(floors[min(2, len(floors) - 1)] or floors[0], min_pos, min_neg)
        if floor >= 1 and (floor < min_pos or floor < min_neg):
            lowered = {"from": [min_pos, min_neg], "to": floor}
            print(
                f"llmhyper: no {method} ad has {min_pos} clicks and {min_neg} non-clicks among the "
                f"{len(users)} train users; training with a floor of {floor} of each instead",
                file=sys.stderr,
            )
            min_pos = min_neg = floor
    X = data.X[users]
    kept, thetas, intercepts, skipped = [], [], [], {}
    for ad in tqdm(ad_ids, desc=f"train {method}", disable=not progress, leave=False):
        pos, neg = counts[ad]
        if pos < min_pos or neg < min_neg:
            skipped[ad] = f"{pos} clicks / {neg} non-clicks among train users"
            continue
        j = data.ad_index[ad]
        shown = data.M[users, j]
        theta, b = fit_logistic(X[shown], data.Y[users, j][shown].astype(int), C)
        kept.append(ad)
        thetas.append(theta)
        intercepts.append(b)
    if ad_ids and not kept and (min_pos > 1 or min_neg > 1):
        raise DataError(
            f"too few clicks to train any {method} model: none of the {len(ad_ids)} ads has "
            f"both a click and a non-click among the {len(users)} train users"
        )
    d = len(data.features)
    meta = {"C": C, "min_pos": min_pos, "min_neg": min_neg, "trained_on": "train users", "skipped": skipped}
    if lowered:
        meta["floor_lowered"] = lowered
    return WeightTable(
        method,
        kept,
        data.feature_names,
        np.array(thetas).reshape(len(kept), d),
        np.array(intercepts),
        meta=meta,
    )
