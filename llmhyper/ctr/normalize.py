"""Normaliser and calibrator (numpy/scipy only): make generated weights servable.

An LLM gets the direction of effects roughly right but not their scale, so the weight vector is
L2-normalised; then the intercept is set so that the mean predicted CTR over sampled users equals alpha,
the mean predicted CTR of the retrieved similar ads:  mean_u sigmoid(theta~ . xi_u + delta) = alpha.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

from llmhyper.weights import sigmoid


def l2_normalize(theta: np.ndarray) -> np.ndarray:
    """theta / ||theta||_2; an all-zero vector stays zero (there is no direction to keep). Computed on
    theta / max|theta| when the plain norm overflows or underflows, so that huge finite weights (1e200)
    keep their direction instead of becoming zeros; ordinary vectors are computed exactly as before."""
    theta = np.asarray(theta, dtype=np.float64)
    _require_finite(theta, "theta")
    with np.errstate(over="ignore", under="ignore"):  # an overflow is handled below
        norm = float(np.linalg.norm(theta))
    if np.isfinite(norm) and norm > 1e-150:
        return theta / norm
    big = float(np.abs(theta).max(initial=0.0))
    if big == 0.0:
        return theta.copy()
    scaled = theta / big
    return scaled / float(np.linalg.norm(scaled))


def l2_normalize_rows(thetas: np.ndarray) -> np.ndarray:
    """`l2_normalize` for each row of a 2-d array (all-zero rows stay zero)."""
    thetas = np.asarray(thetas, dtype=np.float64)
    _require_finite(thetas, "theta")
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(thetas, axis=1, keepdims=True)
    plain = np.isfinite(norms) & (norms > 1e-150)
    if plain.all():
        return thetas / norms
    return np.vstack([l2_normalize(row) for row in thetas]).reshape(thetas.shape)


def _require_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds {int((~np.isfinite(a)).sum())} values that are not finite")


def logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def calibrate_intercept(theta: np.ndarray, X: np.ndarray, alpha: float, tol: float = 1e-12) -> float:
    """The delta with mean_u sigmoid(X[u] . theta + delta) = alpha (monotone in delta: one root)."""
    if not (0.0 < alpha < 1.0) or not np.isfinite(alpha):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if X.shape[0] == 0:
        raise ValueError("calibration needs at least one user")
    z = X @ np.asarray(theta, dtype=np.float64)
    _require_finite(z, "X . theta")  # inf or nan logits have no calibrating shift
    if X.shape[0] == 1 or np.ptp(z) == 0.0:
        return logit(alpha) - float(z[0])  # exact closed form
    target = lambda d: float(sigmoid(z + d).mean()) - alpha  # noqa: E731
    lo, hi = logit(alpha) - float(z.max()) - 1.0, logit(alpha) - float(z.min()) + 1.0  # brackets the root
    return float(brentq(target, lo, hi, xtol=tol, maxiter=500))


def neighbour_alpha(neighbour_theta: np.ndarray, neighbour_intercept: np.ndarray, X: np.ndarray) -> float:
    """alpha: the mean predicted CTR of the retrieved ads' own models over the sampled users."""
    p = sigmoid(np.asarray(X) @ np.asarray(neighbour_theta).T + np.asarray(neighbour_intercept))
    return float(p.mean())


def normalize_and_calibrate(theta: np.ndarray, X: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    theta_n = l2_normalize(theta)
    return theta_n, calibrate_intercept(theta_n, X, alpha)


def calibration_users(n_train: int, n_sample: int = 500, seed: int = 0) -> np.ndarray:
    """Positions (into the train users) of the users sampled for calibration, seeded."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=min(n_sample, n_train), replace=False))
