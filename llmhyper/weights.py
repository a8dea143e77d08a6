"""The one artifact every CTR method produces: per-ad linear weights over the user features.

`p(user, ad) = sigmoid(theta[ad] . xi[user] + intercept[ad])`. Saved without pickle as
`weights.npz` (arrays) + `weights.json` (method name, feature names, per-ad notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import DataError
from llmhyper.store import file_sha256, read_json, save_npz_atomic, write_json_atomic

NPZ_NAME, JSON_NAME = "weights.npz", "weights.json"
# a logit weight this large is a broken artifact, not a model (float32 serving would overflow near 3e38)
MAX_ABS_WEIGHT = 1e6


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
            raise KeyError(
                f"{self.method}: no weights for ads {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        return np.array([pos[a] for a in ad_ids], dtype=int)

    def subset(self, ad_ids: list[str]) -> WeightTable:
        idx = self.index_of([str(a) for a in ad_ids])
        ids = [self.ad_ids[i] for i in idx]
        return WeightTable(
            self.method,
            ids,
            list(self.feature_names),
            self.theta[idx],
            self.intercept[idx],
            {a: self.flags[a] for a in ids if a in self.flags},
            dict(self.meta),
        )

    def aligned(self, feature_names: list[str]) -> WeightTable:
        """The same table with columns reordered to `feature_names` (all must be present)."""
        if list(feature_names) == self.feature_names:
            return self
        pos = {f: i for i, f in enumerate(self.feature_names)}
        missing = [f for f in feature_names if f not in pos]
        if missing:
            raise DataError(f"weights of '{self.method}' lack features {missing}")
        cols = [pos[f] for f in feature_names]
        return WeightTable(
            self.method,
            self.ad_ids,
            list(feature_names),
            self.theta[:, cols],
            self.intercept,
            self.flags,
            self.meta,
        )

    # -- persistence (no pickle) --------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write `weights.npz` then `weights.json`, each atomically. The JSON names the npz's SHA-256, so a
        reader that catches the folder between the two renames sees a mismatch, never mixed weights."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise DataError("a weight artifact folder is expected here, found a file", file=str(d))
        arrays = {
            "theta": self.theta,
            "intercept": self.intercept,
            "ad_ids": np.array(self.ad_ids, dtype=str),
            "feature_names": np.array(self.feature_names, dtype=str),
        }
        npz = save_npz_atomic(d / NPZ_NAME, **arrays)
        write_json_atomic(
            d / JSON_NAME,
            {
                "method": self.method,
                "n_ads": len(self.ad_ids),
                "feature_names": self.feature_names,
                "flags": self.flags,
                "meta": self.meta,
                "npz_sha256": file_sha256(npz),
            },
        )
        return d

    @classmethod
    def load(cls, directory: str | Path) -> WeightTable:
        """Read an artifact; any damage (missing, cut short, mismatched, non-finite) is a one-line DataError."""
        d = Path(directory)
        npz, js = d / NPZ_NAME, d / JSON_NAME
        if not d.is_dir():
            raise DataError(
                f"no weight artifact here (expected a folder with {NPZ_NAME} and {JSON_NAME})", file=str(d)
            )
        for p in (npz, js):
            if not p.is_file():
                raise DataError(f"no weight artifact here (expected {NPZ_NAME} and {JSON_NAME})", file=str(p))
        info = read_json(js, "weight artifact description")
        if not isinstance(info, dict):
            raise DataError("expected a JSON object", file=str(js))
        want = info.get("npz_sha256")
        if want is not None and want != file_sha256(npz):
            raise DataError(
                f"does not match {JSON_NAME} (a save was interrupted or the files were mixed); "
                "rerun the command that wrote it",
                file=str(npz),
            )
        try:
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # zipfile / numpy raise many kinds for a damaged file
            raise DataError(
                f"damaged weight arrays ({type(exc).__name__}: {str(exc)[:80]})", file=str(npz)
            ) from None
        missing = [k for k in ("theta", "intercept", "ad_ids", "feature_names") if k not in arrays]
        if missing:
            raise DataError(f"weight arrays lack {missing}", file=str(npz))
        for name in ("ad_ids", "feature_names"):
            if arrays[name].ndim != 1:
                raise DataError(
                    f"'{name}' must be a 1-d array, has shape {arrays[name].shape}", file=str(npz), field=name
                )
        method = info.get("method", d.name)
        if not isinstance(method, str) or not method.strip():
            raise DataError("'method' must be a non-empty string", file=str(js), field="method")
        names = [str(f) for f in arrays["feature_names"]]
        if "feature_names" in info and info["feature_names"] != names:
            raise DataError(
                f"feature names differ from those in {NPZ_NAME}", file=str(js), field="feature_names"
            )
        if "n_ads" in info and info["n_ads"] != len(arrays["ad_ids"]):
            raise DataError(
                f"n_ads is {info['n_ads']!r} but {NPZ_NAME} holds {len(arrays['ad_ids'])} ads",
                file=str(js),
                field="n_ads",
            )
        flags, meta = info.get("flags", {}), info.get("meta", {})
        if not isinstance(flags, dict) or not all(isinstance(v, list) for v in flags.values()):
            raise DataError("'flags' must map ad ids to lists of feature names", file=str(js), field="flags")
        if not isinstance(meta, dict):
            raise DataError("'meta' must be an object", file=str(js), field="meta")
        try:
            theta = np.asarray(arrays["theta"], dtype=np.float64)
            intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError("theta and intercept must be numbers", file=str(npz)) from None
        for name, arr in (("theta", theta), ("intercept", intercept)):
            bad = ~np.isfinite(arr) | (np.abs(arr) > MAX_ABS_WEIGHT)
            if bad.any():
                raise DataError(
                    f"{int(bad.sum())} values are not finite or exceed {MAX_ABS_WEIGHT:g} in magnitude",
                    file=str(npz),
                    field=name,
                )
        try:
            return cls(method, [str(a) for a in arrays["ad_ids"]], names, theta, intercept, flags, meta)
        except ValueError as exc:
            raise DataError(str(exc), file=str(npz)) from None
