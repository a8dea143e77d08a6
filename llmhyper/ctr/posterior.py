"""Bayesian logistic regression per ad, centred on any weight artifact: the prior a cold ad starts from and
the posterior its first clicks turn it into.

    w = (theta, intercept) ~ N(prior mean, diag(precision)^-1);   click ~ Bernoulli(sigmoid(theta . x + b))

`fit(prior, X, y)` finds the MAP by L-BFGS (scipy), polishes it with Newton steps (so two starts give the
same mode to ~1e-12), and returns the Laplace posterior: mean = the mode, precision = the Hessian of the
negative log posterior there. Feeding a posterior back in as the prior of the next batch is the online
update (warm start): it costs only the new events. (`solver="newton"` reaches the same mode by damped
Newton alone, faster for one ad's small problem.)

The prior's strength per artifact, one precision for the weights and one for the intercept, is chosen by
empirical Bayes on RETIRED ads (`choose_precision`): reveal n impressions of each, fit with each candidate,
keep the pair with the best held-out log-likelihood on that ad's other impressions. Cold ads never inform it.

`PosteriorTable` holds every ad's posterior as arrays (saved as npz + JSON, no pickle).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.optimize import minimize
from threadpoolctl import ThreadpoolController

from llmhyper.errors import DataError
from llmhyper.store import load_pair, save_pair
from llmhyper.weights import WeightTable, sigmoid

NPZ_NAME, JSON_NAME = "posterior.npz", "posterior.json"
_THREADS: list[ThreadpoolController] = []  # made on first use, after numpy's and scipy's BLAS are loaded
PRECISION_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
INTERCEPT_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass(frozen=True)
class PosteriorSettings:
    """The prior's precision (1 / variance) on each weight, and the solver's stopping rule."""

    precision: float = 5.0
    intercept_precision: float | None = None  # None: the same as `precision`
    max_iter: int = 200
    gtol: float = 1e-4  # loose on purpose: the Newton steps after it reach the mode to ~1e-12
    newton_steps: int = 3
    # "lbfgs": scipy's L-BFGS, then `newton_steps` Newton steps; "newton": damped Newton from the start
    # (the same mode, ~10x faster for one ad's (d+1)-sized problem: what the serving worker uses)
    solver: str = "lbfgs"

    def __post_init__(self) -> None:
        if self.solver not in ("lbfgs", "newton"):
            raise ValueError(f"solver must be 'lbfgs' or 'newton', got {self.solver!r}")
        for name in ("precision", "intercept_precision"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v}")


@dataclass
class Posterior:
    """One ad's Gaussian over w = (theta..., intercept): mean and precision matrix, and the data seen."""

    mean: np.ndarray  # (d + 1,)
    precision: np.ndarray  # (d + 1, d + 1)
    n: int = 0  # impressions folded in
    clicks: int = 0

    @property
    def theta(self) -> np.ndarray:
        return self.mean[:-1]

    @property
    def intercept(self) -> float:
        return float(self.mean[-1])

    def covariance(self) -> np.ndarray:
        return cho_solve(cho_factor(self.precision), np.eye(len(self.mean)))

    def variance(self) -> np.ndarray:
        return np.diag(self.covariance())

    def logits(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.theta + self.intercept

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Click probability at the posterior mean (what a ranker serves)."""
        return sigmoid(self.logits(X))

    def predict_moderated(self, X: np.ndarray) -> np.ndarray:
        """Posterior predictive click probability (probit approximation over the Laplace Gaussian)."""
        Xa = _augment(X)
        c, low = cho_factor(self.precision)
        s2 = np.einsum("ij,ji->i", Xa, cho_solve((c, low), Xa.T))
        return sigmoid(Xa @ self.mean / np.sqrt(1.0 + np.pi * s2 / 8.0))

    def sample(self, rng: np.random.Generator, size: int = 1) -> np.ndarray:
        """(size, d + 1) draws of w from the posterior (for Thompson sampling)."""
        L = np.linalg.cholesky(self.precision)  # precision = L L^T, so L^-T z has covariance precision^-1
        z = rng.standard_normal((len(self.mean), size))
        return (self.mean[:, None] + solve_triangular(L.T, z, lower=False)).T

    def distance_from(self, prior: Posterior) -> dict[str, float]:
        """How far the mean moved: Euclidean, and in prior standard deviations (Mahalanobis)."""
        delta = self.mean - prior.mean
        return {
            "l2": float(np.linalg.norm(delta)),
            "prior_sd": float(np.sqrt(max(delta @ prior.precision @ delta, 0))),
        }


def _augment(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    return np.hstack([X, np.ones((X.shape[0], 1))])


def prior_precision_matrix(d: int, settings: PosteriorSettings) -> np.ndarray:
    lam = np.full(d + 1, settings.precision, dtype=np.float64)
    if settings.intercept_precision is not None:
        lam[-1] = settings.intercept_precision
    return np.diag(lam)


def prior(theta: np.ndarray, intercept: float, settings: PosteriorSettings) -> Posterior:
    """The Gaussian centred on (theta, intercept) with the settings' precision."""
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    mean = np.append(theta, float(intercept))
    return Posterior(mean, prior_precision_matrix(len(theta), settings))


def fit(
    prior_post: Posterior,
    X: np.ndarray,
    y: np.ndarray,
    settings: PosteriorSettings = PosteriorSettings(),
    start: np.ndarray | None = None,
) -> Posterior:
    """The Laplace posterior after seeing clicks `y` (0/1) of users `X` under `prior_post` (a prior or an
    earlier posterior: the warm start). `start` is where the solver begins (default: the prior mean)."""
    Xa = _augment(X) if len(X) else np.zeros((0, len(prior_post.mean)))
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if Xa.shape[0] != y.shape[0]:
        raise ValueError(f"{Xa.shape[0]} feature rows but {y.shape[0]} labels")
    if Xa.shape[1] != len(prior_post.mean):
        raise ValueError(f"features have {Xa.shape[1] - 1} columns, the prior {len(prior_post.mean) - 1}")
    if not (np.isfinite(Xa).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("features must be finite and labels 0 or 1")
    if not len(y):
        return Posterior(prior_post.mean.copy(), prior_post.precision.copy(), prior_post.n, prior_post.clicks)
    if not _THREADS:
        _THREADS.append(ThreadpoolController())
    # (d+1)-sized algebra: BLAS threads only add wake-up latency (tens of ms on a busy machine)
    with _THREADS[0].limit(limits=1):
        return _fit(prior_post, Xa, y, settings, start)


def _fit(
    prior_post: Posterior,
    Xa: np.ndarray,
    y: np.ndarray,
    settings: PosteriorSettings,
    start: np.ndarray | None,
) -> Posterior:
    m, P = prior_post.mean, prior_post.precision
    n, clicks = prior_post.n + len(y), prior_post.clicks + int(y.sum())

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = Xa @ w
        dw = w - m
        Pd = P @ dw
        f = float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * dw @ Pd)
        return f, Xa.T @ (sigmoid(z) - y) + Pd

    w = m.copy() if start is None else np.asarray(start, dtype=np.float64).copy()
    steps = settings.newton_steps
    if settings.solver == "lbfgs":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(
                objective,
                w,
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": settings.max_iter, "gtol": settings.gtol},
            )
        w = res.x
    else:
        steps = settings.max_iter
    # Newton steps (halved while they do not descend): the objective is strictly convex, so this lands
    # on the mode whatever the start was
    f, g = objective(w)
    for _ in range(steps):
        if np.max(np.abs(g)) < 1e-11 * max(1.0, len(y)):
            break
        try:
            step = np.linalg.solve(_hessian(Xa, w, P), g)
        except np.linalg.LinAlgError:
            break
        t = 1.0
        for _ in range(30):
            f_new, g_new = objective(w - t * step)
            if f_new <= f + 1e-12 * abs(f):
                break
            t *= 0.5
        w, f, g = w - t * step, f_new, g_new
    return Posterior(w, _hessian(Xa, w, P), n, clicks)


def _hessian(Xa: np.ndarray, w: np.ndarray, P: np.ndarray) -> np.ndarray:
    p = sigmoid(Xa @ w)
    H = (Xa * (p * (1.0 - p))[:, None]).T @ Xa + P
    return 0.5 * (H + H.T)


def log_likelihood(post: Posterior, X: np.ndarray, y: np.ndarray) -> float:
    """Sum of log p(y | x, posterior mean) (the held-out score of empirical Bayes)."""
    z = post.logits(X)
    return float(np.sum(y * z - np.logaddexp(0.0, z)))


# -- empirical Bayes on retired ads ------------------------------------------------------------------


@dataclass(frozen=True)
class EBSettings:
    """The precisions to try (theta x intercept), the impressions to reveal, how many retired ads."""

    grid: tuple[float, ...] = PRECISION_GRID
    intercept_grid: tuple[float, ...] | None = INTERCEPT_GRID  # None: the intercept's precision is theta's
    reveal: tuple[int, ...] = (10, 25, 50, 100, 200)
    max_ads: int = 50
    seed: int = 0


@dataclass
class EBResult:
    precision: float
    intercept_precision: float
    candidates: list[dict[str, float]]  # each (precision, intercept_precision) and its held-out score
    n_ads: int
    reveal: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "intercept_precision": self.intercept_precision,
            "n_ads": self.n_ads,
            "reveal": self.reveal,
            "candidates": self.candidates,
        }

    def settings(self) -> PosteriorSettings:
        return PosteriorSettings(precision=self.precision, intercept_precision=self.intercept_precision)


def choose_precision(
    prior_table: WeightTable, X: np.ndarray, Y: np.ndarray, M: np.ndarray, settings: EBSettings = EBSettings()
) -> EBResult:
    """The prior precisions (theta, intercept) that maximise held-out log-likelihood when `prior_table` is
    the prior.

    `X`: (users, d) features of the users the retired ads were shown to (train users); `Y`, `M`: (users,
    ads) clicks and impressions, columns in `prior_table.ad_ids` order. For each ad (at most `max_ads`,
    seeded) and each n in `reveal`, n of its impressions are revealed and the rest held out; the score of
    a candidate is the mean log-likelihood per held-out impression."""
    n_users, n_ads = Y.shape
    if M.shape != Y.shape or X.shape[0] != n_users or prior_table.theta.shape != (n_ads, X.shape[1]):
        raise ValueError("choose_precision: X, Y, M and the prior table do not line up")
    if not settings.grid or (settings.intercept_grid is not None and not settings.intercept_grid):
        raise ValueError("choose_precision: empty precision grid")
    rng = np.random.default_rng(settings.seed)
    ads = np.arange(n_ads)
    if n_ads > settings.max_ads:
        ads = np.sort(rng.choice(n_ads, size=settings.max_ads, replace=False))
    thetas = sorted(float(g) for g in settings.grid)
    inters = (
        sorted(float(g) for g in settings.intercept_grid) if settings.intercept_grid is not None else [None]
    )
    # strong to weak in a snake, so each fit starts at a near neighbour's mode
    combos = [(t, b) for i, t in enumerate(reversed(thetas)) for b in (inters if i % 2 else inters[::-1])]
    total = np.zeros(len(combos))
    count = 0
    for j in ads.tolist():
        shown = np.flatnonzero(M[:, j])
        for n in settings.reveal:
            if n < 1 or n >= len(shown):
                continue
            perm = rng.permutation(shown)
            seen, held = perm[:n], perm[n:]
            start = None
            for c, (lam, lam_b) in enumerate(combos):
                s = PosteriorSettings(precision=lam, intercept_precision=lam_b)
                post = fit(
                    prior(prior_table.theta[j], prior_table.intercept[j], s),
                    X[seen],
                    Y[seen, j],
                    s,
                    start=start,
                )
                start = post.mean
                total[c] += log_likelihood(post, X[held], Y[held, j])
            count += len(held)
    if count == 0:
        raise ValueError("choose_precision: no retired ad has more impressions than the smallest reveal")
    best = int(np.argmax(total))
    lam, lam_b = combos[best]
    cands = [
        {"precision": t, "intercept_precision": t if b is None else b, "heldout_loglik": float(v / count)}
        for (t, b), v in zip(combos, total, strict=True)
    ]
    return EBResult(lam, lam if lam_b is None else lam_b, cands, len(ads), [int(n) for n in settings.reveal])


# -- every ad's posterior, as arrays ------------------------------------------------------------------


@dataclass
class PosteriorTable:
    """Posteriors of many ads over one feature list: means (ads, d + 1), precisions (ads, d + 1, d + 1)."""

    method: str
    ad_ids: list[str]
    feature_names: list[str]
    mean: np.ndarray
    precision: np.ndarray
    n: np.ndarray  # (ads,) impressions folded in
    clicks: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ad_ids = [str(a) for a in self.ad_ids]
        a, d1 = len(self.ad_ids), len(self.feature_names) + 1
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.precision = np.asarray(self.precision, dtype=np.float64)
        self.n = np.asarray(self.n, dtype=np.int64).reshape(-1)
        self.clicks = np.asarray(self.clicks, dtype=np.int64).reshape(-1)
        if (
            self.mean.shape != (a, d1)
            or self.precision.shape != (a, d1, d1)
            or self.n.shape != (a,)
            or self.clicks.shape != (a,)
        ):
            raise ValueError(f"posterior arrays do not fit {a} ads x {d1 - 1} features")
        self._pos = {ad: i for i, ad in enumerate(self.ad_ids)}

    @classmethod
    def from_weights(cls, table: WeightTable, settings: PosteriorSettings) -> PosteriorTable:
        """Every ad's prior: centred on the artifact's weights."""
        a, d = table.theta.shape
        P = np.broadcast_to(prior_precision_matrix(d, settings), (a, d + 1, d + 1)).copy()
        return cls(
            table.method,
            list(table.ad_ids),
            list(table.feature_names),
            np.hstack([table.theta, table.intercept[:, None]]),
            P,
            np.zeros(a),
            np.zeros(a),
            {
                "prior": table.method,
                "precision": settings.precision,
                "intercept_precision": settings.intercept_precision,
            },
        )

    def get(self, ad_id: str) -> Posterior:
        i = self._pos[str(ad_id)]
        return Posterior(self.mean[i].copy(), self.precision[i].copy(), int(self.n[i]), int(self.clicks[i]))

    def set(self, ad_id: str, post: Posterior) -> None:
        i = self._pos[str(ad_id)]
        self.mean[i], self.precision[i], self.n[i], self.clicks[i] = (
            post.mean,
            post.precision,
            post.n,
            post.clicks,
        )

    def copy(self) -> PosteriorTable:
        return PosteriorTable(
            self.method,
            list(self.ad_ids),
            list(self.feature_names),
            self.mean.copy(),
            self.precision.copy(),
            self.n.copy(),
            self.clicks.copy(),
            dict(self.meta),
        )

    def to_weights(self, method: str | None = None) -> WeightTable:
        """The posterior means as a weight artifact (what a ranker serves)."""
        return WeightTable(
            method or self.method,
            list(self.ad_ids),
            list(self.feature_names),
            self.mean[:, :-1].copy(),
            self.mean[:, -1].copy(),
            meta=dict(self.meta),
        )

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        save_pair(
            d,
            NPZ_NAME,
            JSON_NAME,
            {
                "mean": self.mean,
                "precision": self.precision,
                "n": self.n,
                "clicks": self.clicks,
                "ad_ids": np.array(self.ad_ids, dtype=str),
                "feature_names": np.array(self.feature_names, dtype=str),
            },
            {
                "method": self.method,
                "n_ads": len(self.ad_ids),
                "feature_names": self.feature_names,
                "meta": self.meta,
            },
        )
        return d

    @classmethod
    def load(cls, directory: str | Path) -> PosteriorTable:
        d = Path(directory)
        z, info = load_pair(d, NPZ_NAME, JSON_NAME, "posterior")
        try:
            return cls(
                str(info.get("method", d.name)),
                [str(a) for a in z["ad_ids"]],
                [str(f) for f in z["feature_names"]],
                z["mean"],
                z["precision"],
                z["n"],
                z["clicks"],
                info.get("meta", {}) or {},
            )
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"damaged posterior arrays ({exc})", file=str(d / NPZ_NAME)) from None
