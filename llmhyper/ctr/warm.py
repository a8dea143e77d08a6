"""Warm per-ad models: L2-regularised logistic regression with intercept, one per ad.

Trained on the train users' impressions only. For retired ads these are the weights the LLM sees in its
few-shot examples; for active ads they are the LR_warm upper bound (what a week of clicks would give).
"""

from __future__ import annotations

import warnings

import numpy as np
from tqdm import tqdm

from llmhyper.data.contract import CTRData
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


def train_warm(data: CTRData, ad_ids: list[str], *, C: float = 0.1, min_pos: int = 20, min_neg: int = 20,
               method: str = "lr_warm", progress: bool = True) -> WeightTable:
    """Fit one LR per ad on train users; ads with fewer than `min_pos` clicks or `min_neg` non-clicks
    among train users are skipped (recorded in `meta['skipped']`)."""
    users = data.train_users
    X = data.X[users]
    kept, thetas, intercepts, skipped = [], [], [], {}
    for ad in tqdm(ad_ids, desc=f"train {method}", disable=not progress, leave=False):
        j = data.ad_index[ad]
        shown = data.M[users, j]
        y = data.Y[users, j][shown].astype(int)
        pos, neg = int(y.sum()), int(len(y) - y.sum())
        if pos < min_pos or neg < min_neg:
            skipped[ad] = f"{pos} clicks / {neg} non-clicks among train users"
            continue
        theta, b = fit_logistic(X[shown], y, C)
        kept.append(ad)
        thetas.append(theta)
        intercepts.append(b)
    d = len(data.features)
    return WeightTable(method, kept, data.feature_names,
                       np.array(thetas).reshape(len(kept), d), np.array(intercepts),
                       meta={"C": C, "min_pos": min_pos, "min_neg": min_neg, "trained_on": "train users",
                             "skipped": skipped})
