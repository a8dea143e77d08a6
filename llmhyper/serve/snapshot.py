"""The immutable view a request scores on: read-only float32 weights (features x ads), intercepts,
per-ad sources, the judge's flags and the feature scaling; built from one or two weight artifacts
(see `scorer` for the hand-over rules). Swapped whole by `Scorer`, never changed in place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.serve.artifact import merged_scaling
from llmhyper.weights import WeightTable

GENERATED, TRAINED = "generated", "trained"
_BLOCK_ELEMS = 256 * 1024  # float32 scores per block in `scores` (1 MiB: stays in L2/L3)


NO_SCALING = (
    "the weight artifact carries no feature scaling (the train users' means and standard deviations), "
    "so raw feature values cannot be z-scored: send z-scored features, or serve an artifact written by "
    "a current llmhyper (generate, edit run, evaluate --save)"
)


def _short(name: Any, limit: int = 40) -> str:
    text = str(name)
    return text if len(text) <= limit else text[:limit] + "..."


class FeatureError(LLMHyperError, ValueError):
    """User features that do not fit the artifact: wrong names, order, length, or non-finite values."""


def _sigmoid32(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def _top_one(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, CTRs) of the k largest logits of one user, best first, ties by position; -inf dropped."""
    m = z.shape[0]
    if k < m:
        top = np.argpartition(z, m - k)[m - k :]
        zt = z[top]
        cut = zt.min()
        if np.isfinite(cut) and np.count_nonzero(z == cut) > np.count_nonzero(zt == cut):
            top = np.argsort(-z, kind="stable")[:k]  # a tie at the cut: keep the first by position
        top.sort()
    else:
        top = np.arange(m)
    zt = z[top]
    order = np.argsort(-zt, kind="stable")
    top, zt = top[order], zt[order]
    if not np.isfinite(zt[-1]):
        keep = np.isfinite(zt)
        top, zt = top[keep], zt[keep]
    return top, _sigmoid32(zt)


# ---------------------------------------------------------------------------------------------
# the immutable snapshot
# ---------------------------------------------------------------------------------------------
def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One consistent, read-only view of the served weights. Build with `Snapshot.build`."""

    ad_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    theta: np.ndarray  # (n_features, n_ads) float32, C-contiguous
    intercept: np.ndarray  # (n_ads,) float32
    sources: tuple[str, ...]  # GENERATED or TRAINED per ad
    flags: Mapping[str, tuple[str, ...]]  # ad id -> flagged feature names (those the artifact knows)
    flag_threshold: float
    version: str
    loaded_at: str
    paths: Mapping[str, str | None] = field(default_factory=dict)
    # raw -> z-scored features: (mean, std) float64 in feature order, from the artifact; None: unknown
    scaling: tuple[np.ndarray, np.ndarray] | None = None
    # derived
    _flag_cols: np.ndarray = field(default=None, repr=False)  # feature indices with any flag
    _flag_mask: np.ndarray = field(default=None, repr=False)  # (len(_flag_cols), n_ads) float32 0/1
    _pos: Mapping[str, int] = field(default=None, repr=False)
    _fpos: Mapping[str, int] = field(default=None, repr=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        generated: WeightTable,
        trained: WeightTable | None = None,
        *,
        flag_threshold: float = 1.0,
        catalog: str = GENERATED,
        version: str | None = None,
        paths: Mapping[str, str | None] | None = None,
    ) -> Snapshot:
        if catalog not in (GENERATED, "union"):
            raise ValueError(f"catalog must be 'generated' or 'union', not {catalog!r}")
        if not np.isfinite(flag_threshold) or flag_threshold <= 0:
            raise ValueError(f"flag_threshold must be a positive number, got {flag_threshold}")
        names = list(generated.feature_names)
        if len(set(names)) != len(names):
            raise DataError(f"duplicate feature names in the '{generated.method}' artifact")
        ids = list(generated.ad_ids)
        theta = np.array(generated.theta, dtype=np.float64)
        b = np.array(generated.intercept, dtype=np.float64)
        sources = [GENERATED] * len(ids)
        flags: dict[str, set[str]] = {a: set(f) for a, f in generated.flags.items()}
        if trained is not None:
            if set(trained.feature_names) != set(names):
                extra = sorted(set(trained.feature_names) - set(names))
                missing = sorted(set(names) - set(trained.feature_names))
                raise DataError(
                    f"the trained artifact '{trained.method}' has other features than the "
                    f"generated one (missing {missing[:5]}, extra {extra[:5]})"
                )
            trained = trained.aligned(names)
            pos = {a: i for i, a in enumerate(ids)}
            new_ids, new_theta, new_b = [], [], []
            for j, a in enumerate(trained.ad_ids):
                if a in pos:  # hand-over: trained wins
                    i = pos[a]
                    theta[i], b[i], sources[i] = trained.theta[j], trained.intercept[j], TRAINED
                elif catalog == "union":
                    new_ids.append(a)
                    new_theta.append(trained.theta[j])
                    new_b.append(trained.intercept[j])
            if new_ids:
                ids += new_ids
                theta = np.vstack([theta, np.array(new_theta)])
                b = np.concatenate([b, np.array(new_b)])
                sources += [TRAINED] * len(new_ids)
            for a, f in trained.flags.items():
                flags.setdefault(a, set()).update(f)
        if not (np.isfinite(theta).all() and np.isfinite(b).all()):
            raise DataError("non-finite weights in the artifacts")
        scaling = merged_scaling(generated, trained, names)
        fpos = {f: i for i, f in enumerate(names)}
        apos = {a: i for i, a in enumerate(ids)}
        kept = {a: tuple(sorted(f for f in fs if f in fpos)) for a, fs in flags.items() if a in apos}
        kept = {a: fs for a, fs in kept.items() if fs}
        cols = sorted({fpos[f] for fs in kept.values() for f in fs})
        cpos = {c: i for i, c in enumerate(cols)}
        mask = np.zeros((len(cols), len(ids)), dtype=np.float32)
        for a, fs in kept.items():
            for f in fs:
                mask[cpos[fpos[f]], apos[a]] = 1.0
        if version is None:
            h = hashlib.sha256(theta.tobytes() + b.tobytes())
            h.update(json.dumps([ids, names, sources, kept]).encode())
            if scaling is not None:
                h.update(scaling[0].tobytes() + scaling[1].tobytes())
            version = h.hexdigest()[:12]
        return cls(
            tuple(ids),
            tuple(names),
            _frozen(theta.T.astype(np.float32)),
            _frozen(b.astype(np.float32)),
            tuple(sources),
            kept,
            float(flag_threshold),
            version,
            datetime.now(UTC).isoformat(timespec="seconds"),
            dict(paths or {}),
            None if scaling is None else (_frozen(scaling[0]), _frozen(scaling[1])),
            _frozen(np.array(cols, dtype=np.intp)),
            _frozen(mask),
            apos,
            fpos,
        )

    def with_weights(self, theta: np.ndarray, intercept: np.ndarray, version: str) -> Snapshot:
        """The same ads, sources and flags with other weights: `theta` (ads, features) in this snapshot's
        ad and feature order (the feedback worker's posterior means, or a Thompson draw)."""
        theta = np.asarray(theta, dtype=np.float32)
        intercept = np.asarray(intercept, dtype=np.float32).reshape(-1)
        if theta.shape != (self.n_ads, self.n_features) or intercept.shape != (self.n_ads,):
            raise ValueError(
                f"weights of shape {theta.shape} do not fit {self.n_ads} ads x {self.n_features} features"
            )
        if not (np.isfinite(theta).all() and np.isfinite(intercept).all()):
            raise DataError("non-finite weights")
        return dataclasses.replace(
            self,
            theta=_frozen(theta.T),
            intercept=_frozen(intercept),
            version=version,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    # -- facts --------------------------------------------------------------------------------
    @property
    def n_ads(self) -> int:
        return len(self.ad_ids)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def source_of(self, ad_id: str) -> str:
        return self.sources[self._pos[str(ad_id)]]

    def counts(self) -> dict[str, int]:
        return {
            GENERATED: self.sources.count(GENERATED),
            TRAINED: self.sources.count(TRAINED),
            "flagged_ads": len(self.flags),
        }

    # -- inputs -------------------------------------------------------------------------------
    def check_feature_names(self, feature_names: Sequence[str]) -> None:
        """FeatureError unless `feature_names` is exactly the artifact's feature order."""
        got = [str(f) for f in feature_names]
        if got == list(self.feature_names):
            return
        unknown = [f for f in got if f not in self._fpos]
        missing = [f for f in self.feature_names if f not in set(got)]
        if unknown or missing:
            raise FeatureError(
                f"feature names do not match the artifact: unknown {unknown[:5]}, missing {missing[:5]}"
            )
        first = next(i for i, (g, e) in enumerate(zip(got, self.feature_names)) if g != e)
        raise FeatureError(
            f"features are in another order than the artifact's: position {first} is "
            f"'{got[first]}', the artifact has '{self.feature_names[first]}' there"
        )

    def vectorize(self, features: Mapping[str, Any] | Sequence[Any], *, raw: bool = False) -> np.ndarray:
        """One user's (n_features,) float32 row from {name: value} (all names, no others) or a list in
        the artifact's order; `raw`: the values are raw and are z-scored with the artifact's scaling.
        FeatureError says what is wrong."""
        d = self.n_features
        if isinstance(features, Mapping):
            unknown = [_short(k) for k in features if k not in self._fpos]
            missing = [f for f in self.feature_names if f not in features]
            if unknown or missing:
                parts = []
                if unknown:
                    parts.append(f"unknown features {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
                if missing:
                    parts.append(f"missing features {missing[:10]}{' ...' if len(missing) > 10 else ''}")
                raise FeatureError("; ".join(parts))
            values = [features[f] for f in self.feature_names]
            labels = list(self.feature_names)
        elif isinstance(features, Sequence) and not isinstance(features, (str, bytes)):
            if len(features) != d:
                raise FeatureError(
                    f"expected {d} feature values (in the order of /health 'features'), got {len(features)}"
                )
            values, labels = list(features), [f"{i} ({f})" for i, f in enumerate(self.feature_names)]
        else:
            raise FeatureError("features must be an object {name: value} or a list of numbers")
        bad = [
            lab
            for lab, v in zip(labels, values, strict=True)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
        ]
        if bad:
            raise FeatureError(f"feature values must be numbers: {bad[:5]}")
        try:
            x = np.array(values, dtype=np.float64)
        except OverflowError:  # an integer beyond the float range (a number with hundreds of digits)
            bad = [
                lab for lab, v in zip(labels, values, strict=True) if isinstance(v, int) and abs(v) > 1e308
            ]
            raise FeatureError(f"feature values too large to be numbers of this model: {bad[:5]}") from None
        if not np.isfinite(x).all():
            bad = [lab for lab, v in zip(labels, x, strict=True) if not np.isfinite(v)]
            raise FeatureError(f"non-finite feature values: {bad[:5]}")
        if raw:
            x = self.zscore(x)
        with np.errstate(over="ignore"):
            out = x.astype(np.float32)
        if not np.isfinite(out).all():
            bad = [lab for lab, v in zip(labels, out, strict=True) if not np.isfinite(v)]
            after = " after z-scoring" if raw else ""
            raise FeatureError(f"feature values beyond the float32 range{after}: {bad[:5]}")
        return out

    def zscore(self, X: Any) -> np.ndarray:
        """Raw feature values (a row or a users x features matrix, artifact order) z-scored with the
        artifact's scaling, float64; FeatureError when the artifact has none."""
        if self.scaling is None:
            raise FeatureError(NO_SCALING)
        mean, std = self.scaling
        return (np.asarray(X, dtype=np.float64) - mean) / std

    def _matrix(self, X: Any, feature_names: Sequence[str] | None) -> np.ndarray:
        if feature_names is not None:
            self.check_feature_names(feature_names)
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise FeatureError(f"expected a (users, {self.n_features}) feature matrix, got shape {X.shape}")
        if not np.isfinite(X).all():
            raise FeatureError("non-finite feature values (NaN or infinity) in the feature matrix")
        return X

    # -- scoring ------------------------------------------------------------------------------
    def logits(self, X: Any, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """(users, ads) float32 logits."""
        X = self._matrix(X, feature_names)
        z = X @ self.theta
        z += self.intercept
        return z

    def scores(self, X: Any, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """(users, ads) float32 click probabilities (flags are NOT applied; see `allowed`).

        Computed in blocks of users whose scores fit in cache (~1 MiB), so the element-wise passes of
        the logistic run in cache and each score goes to memory once."""
        X = self._matrix(X, feature_names)
        n, m = X.shape[0], self.n_ads
        out = np.empty((n, m), dtype=np.float32)
        rows = max(1, _BLOCK_ELEMS // max(m, 1))
        for i in range(0, n, rows):
            z = out[i : i + rows]
            np.matmul(X[i : i + rows], self.theta, out=z)
            z += self.intercept
            z *= 0.5
            np.tanh(z, out=z)  # sigmoid(t) = (1 + tanh(t / 2)) / 2, no overflow
            z *= 0.5
            z += 0.5
        return out

    def allowed(self, X: Any, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """(users, ads) bool: False where a judge flag drops the ad for that user."""
        X = self._matrix(X, feature_names)
        if not len(self._flag_cols):
            return np.ones((X.shape[0], self.n_ads), dtype=bool)
        strong = (np.abs(X[:, self._flag_cols]) >= self.flag_threshold).astype(np.float32)
        return (strong @ self._flag_mask) == 0

    def rank_indices(
        self, X: Any, k: int = 10, feature_names: Sequence[str] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user: (ad indices, CTRs) of the top k allowed ads, best first. Ranked by logit (no float32
        saturation ties); ties broken by ad position. Fewer than k when flags drop ads."""
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        X = self._matrix(X, feature_names)
        z = self.logits(X)
        if len(self._flag_cols):
            z[~self.allowed(X)] = -np.inf
        n, m = z.shape
        k = min(int(k), m)
        if k == 0:
            return [(np.zeros(0, np.intp), np.zeros(0, np.float32)) for _ in range(n)]
        if n == 1:  # the serving case: 1-d operations, a few microseconds cheaper than the batch path
            return [_top_one(z[0], k)]
        if k < m:
            top = np.argpartition(z, m - k, axis=1)[:, m - k :]
            # a tie at the cut: argpartition keeps any of the tied ads; redo such rows to keep the first
            zt = np.take_along_axis(z, top, axis=1)
            cut = zt.min(axis=1, keepdims=True)
            tied_out = (z == cut).sum(axis=1) > (zt == cut).sum(axis=1)
            for i in np.flatnonzero(tied_out & np.isfinite(cut[:, 0])).tolist():
                top[i] = np.argsort(-z[i], kind="stable")[:k]
        else:
            top = np.broadcast_to(np.arange(m), (n, m))
        top = np.sort(top, axis=1)  # by ad position, so the stable sort below breaks ties by position
        zt = np.take_along_axis(z, top, axis=1)
        order = np.argsort(-zt, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        zt = np.take_along_axis(zt, order, axis=1)
        ctr = _sigmoid32(zt)
        kept = np.isfinite(zt).sum(axis=1)  # dropped ads (-inf) sort last
        if (kept == k).all():
            return list(zip(top, ctr))
        return [(t[:c], p[:c]) for t, p, c in zip(top, ctr, kept.tolist())]

    def rank(
        self, X: Any, k: int = 10, feature_names: Sequence[str] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Per user: the top k allowed ads as [(ad_id, ctr), ...], best first."""
        ids = self.ad_ids
        return [
            [(ids[j], float(c)) for j, c in zip(idx.tolist(), ctr.tolist())]
            for idx, ctr in self.rank_indices(X, k, feature_names)
        ]
