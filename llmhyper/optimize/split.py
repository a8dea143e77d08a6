"""Which retired ads train the optimiser and which validate it, and the examples GEPA runs on them.

Retired (warm) ads are treated as new: each gets neighbours that are never itself and a calibration alpha,
and the program sees it exactly as `generate` sees a cold ad."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dspy
import numpy as np

from llmhyper.ctr.prepare import Prepared
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper.views import ad_view, demonstrations
from llmhyper.optimize.recipe import Recipe


@dataclass
class Split:
    train: list[str]
    val: list[str]
    eligible: int  # retired ads with enough test-user clicks and non-clicks
    rule: str


def test_counts(prep: Prepared, ad_id: str) -> tuple[int, int]:
    """(impressions, clicks) of an ad among the data set's test users."""
    data = prep.data
    j = data.ad_index[ad_id]
    shown = data.M[data.test_users, j]
    return int(shown.sum()), int(data.Y[data.test_users, j][shown].sum())


def eligible_ads(prep: Prepared, min_clicks: int, min_nonclicks: int) -> list[str]:
    out = []
    for a in prep.retired.ad_ids:
        n, c = test_counts(prep, a)
        if c >= min_clicks and n - c >= min_nonclicks:
            out.append(a)
    return out


def select_split(recipe: Recipe, prep: Prepared, recipe_path: str | Path) -> Split:
    """Explicit ids are checked (they must be retired ads with a trained model and enough test-user clicks);
    counts are drawn, seeded, from the other eligible ads: the val ads first, so a change of n_train keeps
    the val set."""
    s, file = recipe.split, str(recipe_path)
    data, retired = prep.data, set(prep.retired.ad_ids)
    ok = eligible_ads(prep, s.min_test_clicks, s.min_test_nonclicks)
    ok_set = set(ok)
    for part in ("train", "val"):
        for a in getattr(s, f"{part}_ids") or []:
            if a not in data.ad_index:
                raise DataError(f"unknown ad id '{a}'", file=file, field=f"split.{part}_ids")
            if a not in retired:
                raise DataError(
                    f"ad '{a}' is not a retired ad with a trained model (only those can be "
                    "scored against trained weights)",
                    file=file,
                    field=f"split.{part}_ids",
                )
            if a not in ok_set:
                n, c = test_counts(prep, a)
                raise DataError(
                    f"ad '{a}' has {c} clicks in {n} test-user impressions; it needs at least "
                    f"{s.min_test_clicks} clicks and {s.min_test_nonclicks} non-clicks",
                    file=file,
                    field=f"split.{part}_ids",
                )
    taken = set(s.train_ids or []) | set(s.val_ids or [])
    pool = [a for a in ok if a not in taken]
    need = (0 if s.val_ids else recipe.n_val) + (0 if s.train_ids else recipe.n_train)
    if need > len(pool):
        raise DataError(
            f"only {len(pool)} more retired ads have >= {s.min_test_clicks} test clicks and >= "
            f"{s.min_test_nonclicks} test non-clicks, but {need} are asked for",
            file=file,
            field="split",
        )
    seed = recipe.data.seed if s.seed is None else s.seed
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    val = list(s.val_ids) if s.val_ids else order[: recipe.n_val]
    rest = order[recipe.n_val :] if not s.val_ids else order
    train = list(s.train_ids) if s.train_ids else rest[: recipe.n_train]
    rule = (
        f"retired ads with >= {s.min_test_clicks} clicks and >= {s.min_test_nonclicks} non-clicks among "
        f"test users; seeded draw (seed {seed}), val first"
    )
    return Split(train, val, len(ok), rule)


def register_ads(prep: Prepared, ad_ids: list[str]) -> None:
    """Give retired ads (treated as cold) neighbours (never themselves) and a calibration alpha."""
    todo = [a for a in ad_ids if a not in prep.neighbours]
    if not todo:
        return
    missing = [a for a in todo if a not in prep.vectors]
    if missing:
        raise LLMHyperError(f"no embedding for ads {missing[:5]}")
    prep.neighbours.update(prep.neighbours_of(todo))
    prep.alphas.update({a: prep.alpha_for(prep.neighbours[a]) for a in todo})


def make_examples(prep: Prepared, ad_ids: list[str], captions: dict[str, str]) -> list[dspy.Example]:
    """dspy.Examples: inputs ad/examples/features (as in `generate`), label ad_id."""
    features = [f.model_dump() for f in prep.data.features]
    return [
        dspy.Example(
            ad=ad_view(prep, a, captions),
            examples=demonstrations(prep, a, captions),
            features=features,
            ad_id=a,
        ).with_inputs("ad", "examples", "features")
        for a in ad_ids
    ]
