"""The one artifact every CTR method produces: per-ad linear weights over the user features.

`p(user, ad) = sigmoid(theta[ad] . xi[user] + intercept[ad])`. Saved without pickle as
`weights.npz` (arrays) + `weights.json` (method name, feature names, per-ad notes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import DataError

NPZ_NAME, JSON_NAME = "weights.npz", "weights.json"


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclass
class WeightTable:
    method: str
    ad_ids: list[str]
    feature_names: list[str]
    theta: np.ndarray  # (n_ads, n_features)
    intercept: np.ndarray  # (n_ads,)
    # judge flags: ad id -> features the judge called an improper pairing (used by the scorer)
    flags: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ad_ids = [str(a) for a in self.ad_ids]
        self.theta = np.asarray(self.theta, dtype=np.float64)
        self.intercept = np.asarray(self.intercept, dtype=np.float64).reshape(-1)
        n, d = len(self.ad_ids), len(self.feature_names)
        if self.theta.shape != (n, d):
            raise ValueError(f"theta has shape {self.theta.shape}, expected ({n}, {d})")
        if self.intercept.shape != (n,):
            raise ValueError(f"intercept has shape {self.intercept.shape}, expected ({n},)")
        if len(set(self.ad_ids)) != n:
            raise ValueError("duplicate ad ids in a weight table")

    # -- scoring ------------------------------------------------------------------------------
    def logits(self, X: np.ndarray) -> np.ndarray:
        """Users x ads logits for a users x features matrix (columns in `feature_names` order)."""
        return np.asarray(X, dtype=np.float64) @ self.theta.T + self.intercept

    def predict(self, X: np.ndarray) -> np.ndarray:
        return sigmoid(self.logits(X))

    # -- selection ----------------------------------------------------------------------------
    def index_of(self, ad_ids: list[str]) -> np.ndarray:
        pos = {a: i for i, a in enumerate(self.ad_ids)}
        missing = [a for a in ad_ids if a not in pos]
        if missing:
            raise KeyError(f"{self.method}: no weights for ads {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return np.array([pos[a] for a in ad_ids], dtype=int)

    def subset(self, ad_ids: list[str]) -> WeightTable:
        idx = self.index_of([str(a) for a in ad_ids])
        ids = [self.ad_ids[i] for i in idx]
        return WeightTable(self.method, ids, list(self.feature_names), self.theta[idx], self.intercept[idx],
                           {a: self.flags[a] for a in ids if a in self.flags}, dict(self.meta))

    def aligned(self, feature_names: list[str]) -> WeightTable:
        """The same table with columns reordered to `feature_names` (all must be present)."""
        if list(feature_names) == self.feature_names:
            return self
        pos = {f: i for i, f in enumerate(self.feature_names)}
        missing = [f for f in feature_names if f not in pos]
        if missing:
            raise DataError(f"weights of '{self.method}' lack features {missing}")
        cols = [pos[f] for f in feature_names]
        return WeightTable(self.method, self.ad_ids, list(feature_names), self.theta[:, cols], self.intercept,
                           self.flags, self.meta)

    # -- persistence (no pickle) --------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / NPZ_NAME, theta=self.theta, intercept=self.intercept,
                 ad_ids=np.array(self.ad_ids, dtype=str), feature_names=np.array(self.feature_names, dtype=str))
        (d / JSON_NAME).write_text(json.dumps(
            {"method": self.method, "n_ads": len(self.ad_ids), "feature_names": self.feature_names,
             "flags": self.flags, "meta": self.meta}, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> WeightTable:
        d = Path(directory)
        npz, js = d / NPZ_NAME, d / JSON_NAME
        for p in (npz, js):
            if not p.exists():
                raise DataError(f"no weight artifact here (expected {NPZ_NAME} and {JSON_NAME})", file=str(p))
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        info = json.loads(js.read_text())
        return cls(info.get("method", d.name), [str(a) for a in arrays["ad_ids"]],
                   [str(f) for f in arrays["feature_names"]], arrays["theta"], arrays["intercept"],
                   info.get("flags", {}), info.get("meta", {}))
