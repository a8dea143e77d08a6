"""A learned content prior: ridge regression from what an ad says to the weights its own clicks would give.

Inputs are blocks of columns built from each ad:
- `meta`: one-hot flags of its categorical metadata (strings or lists of strings, e.g. MovieLens genres or
  synthetic topics). Numbers in metadata are left out: they are often counts from the log itself
  (MovieLens `n_ratings` counts the test users' ratings too) and would leak the outcome;
- `date`: its launch date (standardised), with a flag where it is missing;
- `vector`: its encoder vector as retrieval uses it (text and image mixed);
- `text`, `image`: the two halves of that vector, when the ads have images;
- any extra text encoder's vector under its own name (e.g. `lm`: the LM's own embedding of the ad).
The outputs are the retired ads' trained weights and intercept (one multi-output scikit-learn ridge).
Which blocks enter and the penalty are chosen by K-fold cross-validation on the retired ads only (never on
cold ads): the score is the pooled AUC of each held-out ad's predicted model on the train users' clicks of
that ad, the metric `evaluate` reports. The model is saved as npz + JSON (no pickle).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.ctr import baselines as bl
from llmhyper.ctr.metrics import pooled_auc
from llmhyper.ctr.normalize import calibrate_intercept, l2_normalize
from llmhyper.ctr.prepare import Prepared, embed
from llmhyper.data.contract import Ad
from llmhyper.errors import DataError
from llmhyper.store import load_pair, save_pair
from llmhyper.weights import WeightTable

STRUCTURED = ("meta", "date")
VECTORS = ("vector", "text", "image")
NPZ_NAME, JSON_NAME = "prior.npz", "prior.json"
MIN_VALUE_COUNT = 2  # a metadata value seen on fewer fit ads gets no column (ids, one-off tags)
MIN_CV_ADS = 4  # fewer retired models than this: no ridge rows (nothing to cross-validate on)


@dataclass(frozen=True)
class PriorSettings:
    alphas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    folds: int = 5
    seed: int = 0
    inputs: tuple[str, ...] | None = None  # fixed blocks; None = choose on retired validation


# -- turning ads into columns ----------------------------------------------------------------------


def categorical_vocab(ads: list[Ad], min_count: int = MIN_VALUE_COUNT) -> dict[str, list[str]]:
    """field -> values seen on at least `min_count` ads, for metadata fields of strings or lists of them."""
    counts: dict[str, dict[str, int]] = {}
    for ad in ads:
        for key, value in ad.metadata.items():
            values = _strings(value)
            if values is None:
                continue
            seen = counts.setdefault(key, {})
            for v in set(values):
                seen[v] = seen.get(v, 0) + 1
    vocab = {k: sorted(v for v, n in c.items() if n >= min_count) for k, c in sorted(counts.items())}
    return {k: v for k, v in vocab.items() if v}


def _strings(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None  # numbers, flags, objects: not categorical


def meta_columns(ads: list[Ad], vocab: dict[str, list[str]]) -> np.ndarray:
    cols = [(k, v) for k, vals in vocab.items() for v in vals]
    out = np.zeros((len(ads), len(cols)))
    pos = {c: j for j, c in enumerate(cols)}
    for i, ad in enumerate(ads):
        for key in vocab:
            for v in _strings(ad.metadata.get(key)) or []:
                if (key, v) in pos:
                    out[i, pos[(key, v)]] = 1.0
    return out


def _day(d: date | None) -> float:
    return float(d.toordinal()) if d is not None else np.nan


def date_columns(ads: list[Ad], mean: float, sd: float) -> np.ndarray:
    days = np.array([_day(a.launch_date) for a in ads])
    missing = ~np.isfinite(days)
    z = np.where(missing, 0.0, (np.nan_to_num(days) - mean) / sd)
    return np.column_stack([z, missing.astype(float)])


def ad_blocks(
    prep: Prepared, ad_ids: list[str], encoder=None, extra: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The vector blocks of `ad_ids`: `vector` always; `text` and `image` when an encoder is given and some
    ads have images. The image half is recovered exactly from the mixed vector c = unit(t + i) and the text
    vector t (both unit): i = 2 (c.t) c - t. `extra` names more text encoders (e.g. {"lm": the LM's own
    embedding}), each a block of its own."""
    C = np.stack([prep.vectors[a] for a in ad_ids]).astype(np.float64)
    out = {"vector": C}
    has_image = np.array([bool(prep.data.ad_by_id[a].image) for a in ad_ids])
    if encoder is not None and has_image.any():
        T = embed(prep.data, ad_ids, encoder, images=False).astype(np.float64)
        image = 2.0 * (C * T).sum(axis=1, keepdims=True) * C - T
        image[~has_image] = 0.0  # no image: no image signal (not a copy of the text)
        out["text"], out["image"] = T, image
    for name, enc in (extra or {}).items():
        if name in STRUCTURED + VECTORS:
            raise ValueError(f"extra block name {name!r} is taken")
        out[name] = embed(prep.data, ad_ids, enc, images=False).astype(np.float64)
    return out


# -- the model ---------------------------------------------------------------------------------


@dataclass
class RidgePrior:
    """Multi-output ridge from an ad's blocks to (theta, intercept). `fit` learns with fixed inputs and
    penalty; `select_prior` chooses them by cross-validation first."""

    inputs: list[str]
    alpha: float
    feature_names: list[str] = field(default_factory=list)
    vocab: dict[str, list[str]] = field(default_factory=dict)
    date_stats: tuple[float, float] = (0.0, 1.0)
    scales: dict[str, float] = field(default_factory=dict)
    coef: np.ndarray | None = None  # (n_features + 1, n_columns): the last output is the intercept
    bias: np.ndarray | None = None  # (n_features + 1,)
    meta: dict[str, Any] = field(default_factory=dict)

    def _raw(self, ads: list[Ad], blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name in self.inputs:
            if name == "meta":
                out[name] = meta_columns(ads, self.vocab)
            elif name == "date":
                out[name] = date_columns(ads, *self.date_stats)
            elif name in blocks:
                out[name] = np.asarray(blocks[name], dtype=np.float64)
            else:
                raise DataError(f"the prior needs the '{name}' block of the ads, which was not given")
            if len(out[name]) != len(ads):
                raise ValueError(f"block '{name}' has {len(out[name])} rows for {len(ads)} ads")
        return out

    def design(self, ads: list[Ad], blocks: dict[str, np.ndarray]) -> np.ndarray:
        raw = self._raw(ads, blocks)
        cols = [raw[n] / self.scales[n] for n in self.inputs]
        return np.hstack(cols) if cols else np.zeros((len(ads), 0))

    def setup(self, ads: list[Ad], blocks: dict[str, np.ndarray]) -> np.ndarray:
        """Learn the column encoding (metadata vocabulary, date scale, block scales) from the fit ads and
        return their design matrix."""
        self.vocab = categorical_vocab(ads) if "meta" in self.inputs else {}
        if "date" in self.inputs:
            days = np.array([_day(a.launch_date) for a in ads])
            ok = days[np.isfinite(days)]
            sd = float(ok.std()) if len(ok) > 1 else 0.0
            self.date_stats = (float(ok.mean()) if len(ok) else 0.0, sd if sd > 0 else 1.0)
        # each block scaled to unit mean squared (centred) row norm, so one penalty suits all of them
        self.scales = {}
        for name, m in self._raw(ads, blocks).items():
            spread = float(((m - m.mean(axis=0)) ** 2).sum(axis=1).mean())
            self.scales[name] = float(np.sqrt(spread)) if spread > 1e-12 else 1.0
        return self.design(ads, blocks)

    def fit(
        self,
        ads: list[Ad],
        blocks: dict[str, np.ndarray],
        theta: np.ndarray,
        intercept: np.ndarray,
        feature_names: list[str],
    ) -> RidgePrior:
        from sklearn.linear_model import Ridge

        self.feature_names = list(feature_names)
        Z = self.setup(ads, blocks)
        T = np.column_stack([theta, intercept])
        model = Ridge(alpha=self.alpha).fit(Z, T)
        self.coef, self.bias = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
        return self

    def predict(self, ads: list[Ad], blocks: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.coef is None or self.bias is None:
            raise ValueError("the prior is not fitted")
        out = self.design(ads, blocks) @ self.coef.T + self.bias
        return out[:, :-1], out[:, -1]

    def table(
        self, ad_ids: list[str], ads: list[Ad], blocks: dict[str, np.ndarray], method: str = "ridge"
    ) -> WeightTable:
        theta, b = self.predict(ads, blocks)
        return WeightTable(
            method,
            ad_ids,
            self.feature_names,
            theta,
            b,
            meta={
                "rule": "ridge from the ad's content to retired ads' trained weights",
                "inputs": self.inputs,
                "alpha": self.alpha,
                **self.meta,
            },
        )

    # -- persistence (no pickle) ----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        if self.coef is None or self.bias is None:
            raise ValueError("the prior is not fitted")
        save_pair(
            d,
            NPZ_NAME,
            JSON_NAME,
            {"coef": self.coef, "bias": self.bias},
            {
                "kind": "ridge_prior",
                "inputs": self.inputs,
                "alpha": self.alpha,
                "feature_names": self.feature_names,
                "vocab": self.vocab,
                "date_stats": list(self.date_stats),
                "scales": self.scales,
                "meta": self.meta,
            },
        )
        return d

    @classmethod
    def load(cls, directory: str | Path) -> RidgePrior:
        d = Path(directory)
        arrays, info = load_pair(d, NPZ_NAME, JSON_NAME, "prior")
        npz = d / NPZ_NAME
        if info.get("kind") != "ridge_prior":
            raise DataError("not a ridge prior description", file=str(d / JSON_NAME))
        try:
            coef, bias = arrays["coef"], arrays["bias"]
            prior = cls(
                list(info["inputs"]),
                float(info["alpha"]),
                list(info["feature_names"]),
                {k: list(v) for k, v in info["vocab"].items()},
                tuple(info["date_stats"]),
                {k: float(v) for k, v in info["scales"].items()},
                coef,
                bias,
                dict(info["meta"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"damaged prior ({type(exc).__name__}: {exc})", file=str(d)) from None
        n_out = len(prior.feature_names) + 1
        if coef.ndim != 2 or coef.shape[0] != n_out or bias.shape != (n_out,) or not np.isfinite(coef).all():
            raise DataError(
                f"prior arrays have shapes {coef.shape}/{bias.shape}, expected ({n_out}, .)", file=str(npz)
            )
        return prior


# -- choosing inputs and penalty on retired ads ------------------------------------------------------


def candidate_inputs(ads: list[Ad], blocks: dict[str, np.ndarray]) -> list[tuple[str, ...]]:
    """Structured only, vectors only, and both; the text and image halves separately where present."""
    structured: list[tuple[str, ...]] = []
    if categorical_vocab(ads):
        structured.append(("meta",))
    if any(a.launch_date is not None for a in ads):
        structured += [s + ("date",) for s in structured] or [("date",)]
    vectors = [(v,) for v in ("vector", "text") if v in blocks]
    if "text" in blocks and "image" in blocks:
        vectors.append(("text", "image"))
    base = ("text",) if "text" in blocks else ("vector",)
    for name in sorted(set(blocks) - set(VECTORS)):  # extra encoders: alone and beside the ad's text
        vectors += [(name,), base + (name,)]
    return structured + vectors + [s + v for s in structured for v in vectors]


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """A fold number per row (shuffled, seeded); at least 2 folds, at most n."""
    k = max(2, min(folds, n))
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % k)


def ridge_path(
    Z: np.ndarray, T: np.ndarray, alphas: tuple[float, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(coef, bias) of ridge with an intercept (as scikit-learn's Ridge) for every penalty, from one SVD of
    the centred design: cross-validation over the penalty grid costs one decomposition per fold."""
    z_mean, t_mean = Z.mean(axis=0), T.mean(axis=0)
    if Z.shape[1] == 0:  # no columns (e.g. no metadata value seen twice in this fold): the mean
        return [(np.zeros((T.shape[1], 0)), t_mean) for _ in alphas]
    U, sv, Vt = np.linalg.svd(Z - z_mean, full_matrices=False)
    UtT = U.T @ (T - t_mean)
    out = []
    for alpha in alphas:
        coef = (Vt.T * (sv / (sv**2 + alpha))) @ UtT  # (n_columns, n_outputs)
        out.append((coef.T, t_mean - z_mean @ coef))
    return out


def cv_predictions(
    inputs: tuple[str, ...],
    alphas: tuple[float, ...],
    ads: list[Ad],
    blocks: dict[str, np.ndarray],
    theta: np.ndarray,
    intercept: np.ndarray,
    folds: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Out-of-fold (theta, intercept) of every row, for each penalty: each fold is predicted by a ridge fit
    on the others (the column encoding too is learned without the held-out fold)."""
    T = np.column_stack([theta, intercept])
    preds = [np.zeros_like(T) for _ in alphas]
    for f in np.unique(folds):
        tr, va = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        m = RidgePrior(list(inputs), 0.0)
        Ztr = m.setup([ads[i] for i in tr], _rows(blocks, tr))
        Zva = m.design([ads[i] for i in va], _rows(blocks, va))
        for P, (coef, bias) in zip(preds, ridge_path(Ztr, T[tr], alphas)):
            P[va] = Zva @ coef.T + bias
    return [(P[:, :-1], P[:, -1]) for P in preds]


def _rows(blocks: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in blocks.items()}


def select_penalty(
    ads: list[Ad],
    blocks: dict[str, np.ndarray],
    theta: np.ndarray,
    intercept: np.ndarray,
    inputs: tuple[str, ...],
    alphas: tuple[float, ...],
    folds: np.ndarray,
    score,
) -> list[dict[str, Any]]:
    """One row per penalty: its out-of-fold `score(theta_hat, b_hat)` (higher is better) and weight MSE."""
    rows = []
    truth = np.column_stack([theta, intercept])
    for alpha, (th, b) in zip(alphas, cv_predictions(inputs, alphas, ads, blocks, theta, intercept, folds)):
        rows.append(
            {
                "inputs": list(inputs),
                "alpha": float(alpha),
                "score": float(score(th, b)),
                "mse": float(np.mean((np.column_stack([th, b]) - truth) ** 2)),
            }
        )
    return rows


def retired_auc_scorer(prep: Prepared):
    """Pooled AUC over train users x retired ads of the predicted models (rows in retired order)."""
    data = prep.data
    users = data.train_users
    _, Y, M = data.block(users, prep.retired.ad_ids)
    X = data.X[users]
    return lambda th, b: pooled_auc(Y, X @ th.T + b, mask=M)


def select_prior(
    prep: Prepared, blocks: dict[str, np.ndarray], settings: PriorSettings = PriorSettings()
) -> tuple[RidgePrior, dict[str, Any]]:
    """Choose inputs and penalty by K-fold CV on the retired ads (`blocks`: one row per retired ad, in
    `prep.retired` order), refit on all of them. Returns the prior (every candidate's score in its meta)
    and the out-of-fold predictions of the chosen one."""
    retired = prep.retired
    ads = [prep.data.ad_by_id[a] for a in retired.ad_ids]
    rb = blocks
    if any(len(v) != len(ads) for v in rb.values()):
        raise ValueError("select_prior needs one block row per retired ad, in retired order")
    if len(ads) < MIN_CV_ADS:
        raise DataError(
            f"the ridge prior needs at least {MIN_CV_ADS} retired ads with a trained model to "
            f"cross-validate, found {len(ads)}"
        )
    folds = fold_ids(len(ads), settings.folds, settings.seed)
    score = retired_auc_scorer(prep)
    cands = [tuple(settings.inputs)] if settings.inputs else candidate_inputs(ads, rb)
    table = [
        r
        for inputs in cands
        for r in select_penalty(
            ads, rb, retired.theta, retired.intercept, inputs, settings.alphas, folds, score
        )
    ]
    # ties (and undefined AUCs) go to the stronger penalty
    best = max(table, key=lambda r: (np.nan_to_num(r["score"], nan=-np.inf), r["alpha"]))
    prior = RidgePrior(best["inputs"], best["alpha"]).fit(
        ads, rb, retired.theta, retired.intercept, retired.feature_names
    )
    oof = cv_predictions(
        tuple(prior.inputs), (prior.alpha,), ads, rb, retired.theta, retired.intercept, folds
    )[0]
    prior.meta = {
        "chosen_by": f"{len(np.unique(folds))}-fold CV on {len(ads)} retired ads: pooled AUC on "
        "train users' clicks of the held-out ads",
        "cv_auc": best["score"],
        "cv_mse": best["mse"],
        "n_fit_ads": len(ads),
        "encoder": prep.encoder_name,
        "candidates": table,
    }
    return prior, {"oof_theta": oof[0], "oof_intercept": oof[1], "folds": folds}


# -- the rows `evaluate` shows ----------------------------------------------------------------------


def retired_validation(prep: Prepared, oof_theta: np.ndarray, oof_intercept: np.ndarray) -> dict[str, float]:
    """Pooled AUC on train users x retired ads of knn_cal, ridge and ridge_cal, each ad held out (its
    ridge weights out of fold; its neighbours and alpha from the other retired ads): the choice of the
    best prior is made here, never on the cold ads."""
    retired = prep.retired
    ids = retired.ad_ids
    nbs = prep.neighbours_of(ids)
    alphas = {a: prep.alpha_for(nbs[a]) for a in ids}
    knn = bl.knn_prior(retired, nbs, ids)
    knn_cal = bl.calibrated(knn, prep.X_cal, alphas, "knn_cal")
    theta_cal = np.array([l2_normalize(t) for t in oof_theta])
    b_cal = np.array([calibrate_intercept(t, prep.X_cal, alphas[a]) for t, a in zip(theta_cal, ids)])
    score = retired_auc_scorer(prep)
    return {
        "knn_cal": float(score(knn_cal.theta, knn_cal.intercept)),
        "ridge": float(score(oof_theta, oof_intercept)),
        "ridge_cal": float(score(theta_cal, b_cal)),
    }


def ridge_methods(
    prep: Prepared,
    encoder=None,
    settings: PriorSettings = PriorSettings(),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, WeightTable]:
    """`ridge` (its own intercept) and `ridge_cal` (L2-normalised, intercept shifted to the neighbours'
    alpha, like knn_cal) for the cold ads; the retired validation AUCs ride in both tables' meta. `extra`:
    more text encoders offered to the prior as input blocks (see `ad_blocks`)."""
    cold = prep.data.cold_ads
    if len(prep.retired.ad_ids) < MIN_CV_ADS:
        return {}  # too few retired models to learn from; evaluate shows the other rows
    ids = prep.retired.ad_ids + cold
    blocks = ad_blocks(prep, ids, encoder, extra)
    n = len(prep.retired.ad_ids)
    prior, val = select_prior(prep, {k: v[:n] for k, v in blocks.items()}, settings)
    prior.meta["retired_validation_auc"] = retired_validation(prep, val["oof_theta"], val["oof_intercept"])
    table = prior.table(cold, [prep.data.ad_by_id[a] for a in cold], {k: v[n:] for k, v in blocks.items()})
    return {"ridge": table, "ridge_cal": bl.calibrated(table, prep.X_cal, prep.alphas, "ridge_cal")}
