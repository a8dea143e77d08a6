"""Feature scaling: how a data set's raw user features become the z-scored features the weights are for.

    z = (raw - mean) / std        (mean and std of the train users, per feature)

The data layer computes it while z-scoring (`contract.standardize`) and keeps it on `CTRData.scaling`;
every writer of a weight artifact made from a data set stamps it into the artifact's meta with
`stamp_scaling(table, data.scaling)`, so a service can take raw feature values (`serve`, `score`):

    meta["feature_scaling"] = {"mean": {name: float, ...}, "std": {name: float, ...}}

`scaling_arrays` reads it back (checked: every feature, finite numbers, std > 0; a one-line DataError).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmhyper.errors import DataError
from llmhyper.weights import WeightTable

SCALING_KEY = "feature_scaling"
Scaling = dict[str, dict[str, float]]


def feature_scaling(names: Sequence[str], mean: Any, std: Any) -> Scaling:
    """The JSON-safe scaling of features `names` (in that order) from per-feature means and stds."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean.shape != (len(names),) or std.shape != (len(names),):
        raise ValueError(
            f"{len(names)} feature names but means of shape {mean.shape} and stds of {std.shape}"
        )
    return {
        "mean": {str(n): float(m) for n, m in zip(names, mean, strict=True)},
        "std": {str(n): float(s) for n, s in zip(names, std, strict=True)},
    }


def identity_scaling(names: Sequence[str]) -> Scaling:
    """Mean 0, std 1: the features are used as they are (data that was not z-scored)."""
    return feature_scaling(names, np.zeros(len(names)), np.ones(len(names)))


def stamp_scaling(table: WeightTable, scaling: Scaling | None) -> WeightTable:
    """`table` with `scaling` (restricted to its features) in its meta; unchanged when `scaling` is None or
    lacks one of its features (a partial scaling would be wrong for the rest)."""
    if not scaling:
        return table
    try:
        mean, std = scaling_arrays(scaling, table.feature_names)
    except DataError:
        return table
    return dataclasses.replace(
        table, meta={**table.meta, SCALING_KEY: feature_scaling(table.feature_names, mean, std)}
    )


def scaling_arrays(
    scaling: Any, names: Sequence[str], where: str = "feature_scaling"
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 arrays in the order of `names`; DataError naming `where` when malformed."""
    if not isinstance(scaling, Mapping) or not all(
        isinstance(scaling.get(k), Mapping) for k in ("mean", "std")
    ):
        raise DataError(f"{where} must be an object with 'mean' and 'std' objects {{feature: number}}")
    out = []
    for key in ("mean", "std"):
        part = scaling[key]
        missing = [n for n in names if n not in part]
        if missing:
            raise DataError(f"{where}.{key} lacks features {missing[:5]}")
        bad = [n for n in names if isinstance(part[n], bool) or not isinstance(part[n], (int, float))]
        if bad:
            raise DataError(f"{where}.{key} has values that are not numbers for {bad[:5]}")
        arr = np.array([float(part[n]) for n in names], dtype=np.float64)
        bad = [n for n, v in zip(names, arr, strict=True) if not np.isfinite(v) or (key == "std" and v <= 0)]
        if bad:
            what = "positive finite" if key == "std" else "finite"
            raise DataError(f"{where}.{key} must be {what} numbers; not so for {bad[:5]}")
        out.append(arr)
    return out[0], out[1]
