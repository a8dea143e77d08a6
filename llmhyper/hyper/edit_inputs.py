"""What the edit program sees and what its labels are measured against: the learned prior's weights for
every ad (out of fold for retired ads, so that a retired ad's prior never saw its own clicks), the size of
one edit step per feature, and the right edits of the retrieved past ads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmhyper.ctr.normalize import normalize_and_calibrate
from llmhyper.ctr.prepare import Prepared
from llmhyper.ctr.prior import (
    PriorSettings,
    RidgePrior,
    ad_blocks,
    cv_predictions,
    retired_validation,
    select_prior,
)
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.edit import Gate, right_edits
from llmhyper.hyper.views import ad_view


@dataclass
class EditContext:
    """The prior's (theta, intercept) per ad id, the edit unit per feature, and the chosen prior."""

    feature_names: list[str]
    theta: dict[str, np.ndarray]
    intercept: dict[str, float]
    units: np.ndarray
    prior: RidgePrior
    validation: dict[str, float]  # retired-ad validation AUC of knn_cal, ridge, ridge_cal
    groups: dict[str, str] | None = None  # retired ad -> its group, when out-of-fold priors leave groups out

    @property
    def calibrate(self) -> bool:
        """Serve through the normaliser when that did better on retired validation."""
        return self.validation["ridge_cal"] > self.validation["ridge"]

    def prior_weights(self, ad_id: str) -> dict[str, float]:
        return {f: round(float(w), 3) for f, w in zip(self.feature_names, self.theta[ad_id], strict=True)}


def edit_context(
    prep: Prepared,
    targets: list[str],
    encoder=None,
    settings: PriorSettings = PriorSettings(),
    group_by: str | None = None,
) -> EditContext:
    """Fit the ridge prior on the retired ads (inputs and penalty by CV there), keep its out-of-fold
    predictions for the retired ads and its predictions for `targets` (ads outside the retired pool;
    retired targets get their out-of-fold prior). One edit unit = the spread of the prior's out-of-fold
    errors for that feature.

    `group_by` (a metadata field, e.g. "topics") makes the out-of-fold priors leave whole groups out (by
    the field's first value): use it when cold ads are about things no retired ad is, so that held-out
    retired ads see a prior as ignorant of them as the cold ads will."""
    retired = prep.retired
    n = len(retired.ad_ids)
    outside = [a for a in targets if a not in set(retired.ad_ids)]
    blocks = ad_blocks(prep, retired.ad_ids + outside, encoder)
    retired_blocks = {k: v[:n] for k, v in blocks.items()}
    prior, oof = select_prior(prep, retired_blocks, settings)
    groups = None
    if group_by:
        ads = [prep.data.ad_by_id[a] for a in retired.ad_ids]
        folds = group_folds(ads, group_by)
        ((oof["oof_theta"], oof["oof_intercept"]),) = cv_predictions(
            tuple(prior.inputs), (prior.alpha,), ads, retired_blocks, retired.theta, retired.intercept, folds
        )
        groups = {a: str(f) for a, f in zip(retired.ad_ids, folds, strict=True)}
    theta = dict(zip(retired.ad_ids, oof["oof_theta"], strict=True))
    intercept = {a: float(b) for a, b in zip(retired.ad_ids, oof["oof_intercept"], strict=True)}
    if outside:
        th, b = prior.predict([prep.data.ad_by_id[a] for a in outside], {k: v[n:] for k, v in blocks.items()})
        theta.update(zip(outside, th, strict=True))
        intercept.update({a: float(x) for a, x in zip(outside, b, strict=True)})
    units = np.std(retired.theta - oof["oof_theta"], axis=0)
    units = np.where(units > 1e-9, units, 1.0)
    validation = retired_validation(prep, oof["oof_theta"], oof["oof_intercept"])
    return EditContext(list(retired.feature_names), theta, intercept, units, prior, validation, groups)


def held_out_neighbours(prep: Prepared, ctx: EditContext, ids: list[str]) -> dict[str, list]:
    """Neighbours for retired ads treated as cold: never the ad itself and, when the context leaves groups
    out, never an ad of its own group, so a held-out ad sees no more of its group than a cold ad would."""
    if not ctx.groups:
        return prep.neighbours_of(ids)
    members: dict[str, set[str]] = {}
    for a, g in ctx.groups.items():
        members.setdefault(g, set()).add(a)
    vecs = np.stack([prep.vectors[a] for a in ids])
    found = prep.index.search(
        vecs, prep.k, exclude_ids=[members.get(ctx.groups.get(a), set()) | {a} for a in ids]
    )
    return dict(zip(ids, found, strict=True))


def group_folds(ads: list, field: str) -> np.ndarray:
    """A fold per distinct first value of `ad.metadata[field]` (ads without it share one fold)."""
    keys = []
    for ad in ads:
        v = ad.metadata.get(field)
        keys.append(str(v[0] if isinstance(v, list) and v else v))
    uniq = sorted(set(keys))
    if len(uniq) < 2:
        raise LLMHyperError(f"grouping by '{field}' needs at least two groups among the retired ads")
    return np.array([uniq.index(k) for k in keys])


def edit_examples(
    prep: Prepared, ctx: EditContext, ad_id: str, captions: dict[str, str], neighbours: list | None = None
) -> list[dict[str, Any]]:
    """The retrieved past ads with, per feature, the label that would have moved their prior to their
    trained weights."""
    pool = prep.retired
    out = []
    for nb in neighbours if neighbours is not None else prep.neighbours[ad_id]:
        row = pool.index_of([nb.ad_id])[0]
        labels = right_edits(pool.theta[row], ctx.theta[nb.ad_id], ctx.units)
        out.append(
            {
                **ad_view(prep, nb.ad_id, captions),
                "similarity": float(nb.similarity),
                "edits": dict(zip(ctx.feature_names, labels.tolist(), strict=True)),
            }
        )
    return out


def edit_vector(ctx: EditContext, edits: dict[str, float]) -> np.ndarray:
    """The labels in feature order (NaN where the LM gave none)."""
    return np.array([edits.get(f, np.nan) for f in ctx.feature_names], dtype=np.float64)


def edit_weights(
    ctx: EditContext, ad_id: str, edits: dict[str, float], gate: Gate | float
) -> tuple[np.ndarray, float]:
    """The edited raw weights and the prior's intercept (features without an edit keep the prior)."""
    if not isinstance(gate, Gate):
        gate = Gate.scalar(float(gate), len(ctx.feature_names))
    return gate.theta(ctx.theta[ad_id], edit_vector(ctx, edits), ctx.units), ctx.intercept[ad_id]


def finish_edit(
    prep: Prepared, ctx: EditContext, ad_id: str, edits: dict[str, float], gate: Gate | float, alpha: float
) -> dict[str, Any]:
    """A servable record: raw edited weights with the prior's intercept, and the calibrated version
    (L2 norm + intercept shift to the neighbours' alpha), like every other generated record."""
    theta, b = edit_weights(ctx, ad_id, edits, gate)
    gamma = gate.record() if isinstance(gate, Gate) else gate
    theta_n, delta = normalize_and_calibrate(theta, prep.X_cal, alpha)
    names = ctx.feature_names
    return {
        "prior_weights": ctx.prior_weights(ad_id),
        "prior_intercept": round(b, 6),
        "gamma": gamma,
        "edits": {k: round(float(v), 4) for k, v in edits.items()},
        "raw_weights": dict(zip(names, np.round(theta, 6).tolist(), strict=True)),
        "raw_intercept": b,
        "normalized_weights": dict(zip(names, theta_n.round(6).tolist(), strict=True)),
        "delta": delta,
        "alpha": alpha,
    }


__all__ = ["EditContext", "edit_context", "edit_examples", "edit_vector", "edit_weights", "finish_edit"]
