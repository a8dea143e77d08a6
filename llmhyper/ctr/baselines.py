"""Baselines for cold ads. Each returns a `WeightTable`, so each scores exactly like LLM-HYPER.

- lr_cold: the element-wise median of the retired ads' weights and intercepts (as in the paper);
- knn: similarity-weighted mean of the k nearest retired ads' weights (retrieval without an LLM);
- knn_cal: the same weights through LLM-HYPER's normaliser and calibrator (the fair bar for the LLM);
- popularity: no user term, intercept = logit(alpha), the neighbours' mean CTR;
- random: a seeded random unit direction, calibrated to alpha;
- embsim: the user's text profile (mean MiniLM vector of the retired movies they clicked) against the ad's
  text vector, mapped to a CTR by a logistic fit on retired ads (the paper's EmbT5 analogue).
"""

from __future__ import annotations

import numpy as np

from llmhyper.ctr.normalize import calibrate_intercept, l2_normalize, logit
from llmhyper.retrieval.index import Neighbour
from llmhyper.weights import WeightTable, sigmoid


def lr_cold(retired: WeightTable, cold_ids: list[str]) -> WeightTable:
    theta = np.median(retired.theta, axis=0)
    b = float(np.median(retired.intercept))
    n = len(cold_ids)
    return WeightTable(
        "lr_cold",
        cold_ids,
        retired.feature_names,
        np.tile(theta, (n, 1)),
        np.full(n, b),
        meta={"rule": "element-wise median of retired ads' weights", "n_retired": len(retired.ad_ids)},
    )


def neighbour_weights(neighbours: list[Neighbour]) -> np.ndarray:
    """Similarity weights (negative similarities count as 0; all zero -> uniform)."""
    w = np.array([max(n.similarity, 0.0) for n in neighbours], dtype=np.float64)
    return w / w.sum() if w.sum() > 0 else np.full(len(neighbours), 1.0 / len(neighbours))


def knn_prior(
    retired: WeightTable, neighbours: dict[str, list[Neighbour]], cold_ids: list[str]
) -> WeightTable:
    thetas, bs = [], []
    for ad in cold_ids:
        nb = neighbours[ad]
        w = neighbour_weights(nb)
        idx = retired.index_of([n.ad_id for n in nb])
        thetas.append(w @ retired.theta[idx])
        bs.append(float(w @ retired.intercept[idx]))
    k = len(next(iter(neighbours.values()))) if neighbours else 0
    return WeightTable(
        "knn",
        cold_ids,
        retired.feature_names,
        np.array(thetas),
        np.array(bs),
        meta={"rule": "similarity-weighted mean of the k nearest retired ads", "k": k},
    )


def calibrated(table: WeightTable, X_cal: np.ndarray, alphas: dict[str, float], name: str) -> WeightTable:
    """LLM-HYPER's numeric stage applied to any weights: L2-normalise, then shift to alpha."""
    thetas, bs = [], []
    for i, ad in enumerate(table.ad_ids):
        t = l2_normalize(table.theta[i])
        thetas.append(t)
        bs.append(calibrate_intercept(t, X_cal, alphas[ad]))
    return WeightTable(
        name,
        table.ad_ids,
        table.feature_names,
        np.array(thetas),
        np.array(bs),
        dict(table.flags),
        {**table.meta, "calibrated": True, "from": table.method},
    )


def popularity(cold_ids: list[str], feature_names: list[str], alphas: dict[str, float]) -> WeightTable:
    n = len(cold_ids)
    return WeightTable(
        "popularity",
        cold_ids,
        feature_names,
        np.zeros((n, len(feature_names))),
        np.array([logit(alphas[a]) for a in cold_ids]),
        meta={"rule": "intercept only: logit of the neighbours' mean CTR"},
    )


def random_weights(
    cold_ids: list[str], feature_names: list[str], X_cal: np.ndarray, alphas: dict[str, float], seed: int = 0
) -> WeightTable:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((len(cold_ids), len(feature_names)))
    table = WeightTable(
        "random",
        cold_ids,
        feature_names,
        theta,
        np.zeros(len(cold_ids)),
        meta={"rule": "random Gaussian direction", "seed": seed},
    )
    return calibrated(table, X_cal, alphas, "random")


def user_profiles(clicks: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """Each user's L2-normalised mean vector of the items they clicked (zero vector if none)."""
    prof = clicks.astype(np.float64) @ item_vectors
    norm = np.linalg.norm(prof, axis=1, keepdims=True)
    return np.divide(prof, norm, out=np.zeros_like(prof), where=norm > 0)


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """p = sigmoid(a * score + b), fitted by (unregularised) logistic regression."""
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1e6, max_iter=1000).fit(scores.reshape(-1, 1), labels.astype(int))
    return float(m.coef_[0, 0]), float(m.intercept_[0])


class EmbeddingSimilarity:
    """Not a linear model over the features, so it scores (user profile, ad vector) pairs directly."""

    method = "embsim"

    def __init__(self, profiles: np.ndarray, ad_vectors: dict[str, np.ndarray], a: float, b: float):
        self.profiles, self.ad_vectors, self.a, self.b = profiles, ad_vectors, a, b

    def predict_users(self, users: np.ndarray, ad_ids: list[str]) -> np.ndarray:
        V = np.stack([self.ad_vectors[a] for a in ad_ids])
        return sigmoid(self.a * (self.profiles[users] @ V.T) + self.b)
