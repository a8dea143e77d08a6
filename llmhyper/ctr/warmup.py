"""The warm-up simulation: how many impressions a cold ad needs before its model is good, per prior.

For each cold ad, n random train users' labels are revealed (n in `impressions`, nested: the first 10 of
the 25, ...); the ad's Bayesian logistic regression (`ctr.posterior`) is fitted centred on each prior and
scored on the test users. Repeated with `repeats` seeds; every prior sees the same revealed users.

Each prior's precisions (weights, intercept) come from empirical Bayes on retired ads held out of the
pool (`retired_split`): the baselines are rebuilt for them from the remaining pool exactly as they are for
cold ads, so nothing of a cold ad (nor of the held-out ad itself) shapes its prior or its strength. A
weight artifact that covers no retired ad (an LLM run) takes the precisions of `knn_cal`, whose numeric
stage (L2-normalise, calibrate the intercept) LLM-HYPER shares. `none` is the no-prior reference: zero
weights with an empirical-Bayes ridge, a flat intercept. Ads are scored in a seeded random column order,
so a prior that ties every ad (none, lr_cold at 0 impressions) gets a chance-level NDCG.

The headline: the impressions each prior needs to reach `target` (95%) of LR_warm's AUC, interpolated
linearly between the grid's points, and the impressions it saves against `none`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from llmhyper.ctr import metrics
from llmhyper.ctr.evaluate import baseline_methods, predict
from llmhyper.ctr.posterior import EBSettings, PosteriorSettings, choose_precision, fit, prior
from llmhyper.ctr.prepare import Prepared
from llmhyper.errors import LLMHyperError
from llmhyper.fmt import ci_cell, md_table
from llmhyper.retrieval.index import AdIndex
from llmhyper.weights import WeightTable

NONE = "none"
WARMUP_METRICS = ("auc", "ad_auc", "ndcg10", "logloss")
HEADERS = {"auc": "AUC", "ad_auc": "ad-AUC", "ndcg10": "NDCG@10", "logloss": "log loss"}
FLAT = 1e-4  # precision of the no-prior intercept: practically flat
FALLBACK = ("knn_cal", "ridge_cal", "lr_cold")  # whose precision an artifact without retired ads takes


@dataclass(frozen=True)
class WarmupSettings:
    impressions: tuple[int, ...] = (0, 10, 25, 50, 100, 200)
    repeats: int = 5
    seed: int = 0
    n_boot: int = 200  # user resamples for the intervals (0: none)
    target: float = 0.95  # share of LR_warm's AUC that counts as warmed up
    precision: float | None = None  # one fixed precision for every prior; None: empirical Bayes
    intercept_precision: float | None = None  # with `precision`: the intercept's (None: the same)
    eb: EBSettings = field(default_factory=EBSettings)


# -- the priors on held-out retired ads (for empirical Bayes) ------------------------------------------


def retired_split(prep: Prepared, n_ads: int, seed: int = 0) -> Prepared:
    """A `Prepared` whose 'cold' ads are `n_ads` retired ads (seeded) taken out of the pool: their own
    trained models become the lr_warm of this view, the rest of the pool is what the baselines see."""
    pool = list(prep.retired.ad_ids)
    if len(pool) < 2 * prep.k + 1:
        raise LLMHyperError(f"only {len(pool)} retired ads with a model: too few for empirical Bayes")
    n_ads = min(n_ads, len(pool) // 2)
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(len(pool), size=n_ads, replace=False).tolist())
    held_ids = [pool[i] for i in held]
    rest = [a for a in pool if a not in set(held_ids)]
    data = dataclasses.replace(
        prep.data, warm_ads=[a for a in prep.data.warm_ads if a not in set(held_ids)], cold_ads=held_ids
    )
    retired = prep.retired.subset(rest)
    lr_warm = prep.retired.subset(held_ids)
    lr_warm.method = "lr_warm"
    index = AdIndex.from_vectors(
        rest, np.stack([prep.vectors[a] for a in rest]), encoder_name=prep.encoder_name
    )
    view = Prepared(
        data, retired, lr_warm, index, prep.vectors, {}, prep.X_cal, {}, prep.encoder_name, prep.k
    )
    view.neighbours = view.neighbours_of(held_ids)
    view.alphas = {a: view.alpha_for(nb) for a, nb in view.neighbours.items()}
    return view


def no_prior(ad_ids: list[str], feature_names: list[str]) -> WeightTable:
    n = len(ad_ids)
    return WeightTable(
        NONE,
        ad_ids,
        feature_names,
        np.zeros((n, len(feature_names))),
        np.zeros(n),
        meta={"rule": "no prior: zero weights, flat intercept"},
    )


def choose_precisions(
    prep: Prepared,
    names: list[str],
    artifacts: dict[str, WeightTable],
    settings: WarmupSettings,
    encoder=None,
) -> dict[str, dict[str, Any]]:
    """name -> {"precision", "intercept_precision", "from", "eb"} for every prior (`none`, baselines,
    artifacts)."""
    if settings.precision is not None:
        lam_b = settings.intercept_precision or settings.precision
        return {
            n: {
                "precision": settings.precision,
                "intercept_precision": FLAT if n == NONE else lam_b,
                "from": "fixed",
            }
            for n in [NONE, *names, *artifacts]
        }
    view = retired_split(prep, settings.eb.max_ads, settings.eb.seed)
    held = view.data.cold_ads
    users = view.data.train_users
    X = view.data.X[users]
    tables = {NONE: no_prior(held, view.data.feature_names)}
    if names:
        methods = baseline_methods(view, encoder, seed=settings.seed)
        tables.update({n: methods[n] for n in names})
    for name, table in artifacts.items():  # an artifact that also wrote weights for retired ads: its own EB
        covered = [a for a in held if a in set(table.ad_ids)]
        if len(covered) >= 5:
            tables[name] = table.subset(covered)
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        eb = dataclasses.replace(settings.eb, intercept_grid=(FLAT,)) if name == NONE else settings.eb
        t = table.aligned(view.data.feature_names)
        c = view.data.cols(t.ad_ids)
        res = choose_precision(t, X, view.data.Y[np.ix_(users, c)], view.data.M[np.ix_(users, c)], eb)
        where = "held-out retired ads" if name not in artifacts else "the retired ads it covers"
        out[name] = {
            "precision": res.precision,
            "intercept_precision": res.intercept_precision,
            "from": f"empirical Bayes on {where}",
            "eb": res.to_dict(),
        }
    for name in artifacts:
        if name not in out:
            donor = next((n for n in FALLBACK if n in out), NONE)
            out[name] = {
                "precision": out[donor]["precision"],
                "intercept_precision": out[donor]["intercept_precision"],
                "from": f"{donor}'s (the artifact covers no retired ad)",
            }
    return out


# -- the simulation --------------------------------------------------------------------------------------


def simulate(
    prep: Prepared,
    priors: dict[str, WeightTable],
    precisions: dict[str, PosteriorSettings],
    ad_ids: list[str],
    settings: WarmupSettings,
) -> dict[str, np.ndarray]:
    """name -> (repeats, len(impressions), test users, ads) predicted CTRs."""
    data = prep.data
    train, test = data.train_users, data.test_users
    Xtr, Xte = data.X[train], data.X[test]
    names = list(priors)
    grid = list(settings.impressions)
    out = {n: np.zeros((settings.repeats, len(grid), len(test), len(ad_ids))) for n in names}
    tables = {n: t.subset(ad_ids).aligned(data.feature_names) for n, t in priors.items()}
    for r in range(settings.repeats):
        for a, ad in enumerate(ad_ids):
            j = data.ad_index[ad]
            shown = np.flatnonzero(data.M[train, j])
            order = np.random.default_rng([settings.seed, r, j]).permutation(shown)
            y_all = data.Y[train, j].astype(np.float64)
            for name in names:
                s = precisions[name]
                t = tables[name]
                p0 = prior(t.theta[a], t.intercept[a], s)
                start = None
                for g, n in enumerate(grid):
                    seen = order[: min(n, len(order))]
                    post = fit(p0, Xtr[seen], y_all[seen], s, start=start)
                    start = post.mean
                    out[name][r, g, :, a] = post.predict(Xte)
    return out


def _cells(
    Y: np.ndarray, M: np.ndarray, P: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    """Per metric: the mean over repeats and a user-bootstrap interval of that mean (the same users
    resampled for every repeat, so the interval covers the users; repeats are averaged)."""
    out = {}
    idx = metrics.resample_indices(Y.shape[0], n_boot, seed) if n_boot else None
    for m in WARMUP_METRICS:
        fn = metrics.METRICS[m]
        value = float(np.nanmean([fn(Y, P[r], M) for r in range(P.shape[0])]))
        lo = hi = None
        if idx is not None:
            boots = np.mean([metrics.boot_values(fn, Y, P[r], M, idx) for r in range(P.shape[0])], axis=0)
            lo, hi = metrics.interval(boots)
        out[m] = {"value": value, "lo": lo, "hi": hi}
    return out


def crossing(grid: list[int], curve: list[float], target: float) -> float | None:
    """The first n where `curve` reaches `target`, linear between grid points; None if it never does."""
    for g, (n, v) in enumerate(zip(grid, curve, strict=True)):
        if v >= target:
            if g == 0:
                return float(n)
            n0, v0 = grid[g - 1], curve[g - 1]
            return float(n0 + (n - n0) * (target - v0) / (v - v0))
    return None


def run_warmup(
    prep: Prepared,
    names: list[str],
    artifacts: dict[str, WeightTable],
    settings: WarmupSettings = WarmupSettings(),
    encoder=None,
) -> dict[str, Any]:
    """The whole study: baselines `names` and `artifacts` as priors (plus `none`), on the cold ads all
    of them cover. Returns a JSON-able result (see `markdown` and `svg`)."""
    data = prep.data
    if sorted(settings.impressions) != list(settings.impressions) or min(settings.impressions) < 0:
        raise LLMHyperError(
            f"impressions must be increasing and at least 0, got {list(settings.impressions)}"
        )
    if settings.repeats < 1:
        raise LLMHyperError("repeats must be at least 1")
    with threadpool_limits(1):  # tiny matrices: BLAS threads only add overhead
        methods = baseline_methods(prep, encoder, seed=settings.seed) if names else {}
        unknown = [n for n in names if not isinstance(methods.get(n), WeightTable) or n == "lr_warm"]
        if unknown:
            usable = sorted(k for k, v in methods.items() if isinstance(v, WeightTable) and k != "lr_warm")
            raise LLMHyperError(
                f"unknown or non-linear priors {unknown}; use some of {usable} or RUN/weights"
            )
        clash = [n for n in artifacts if n in methods or n == NONE]
        if clash:
            raise LLMHyperError(f"weight artifacts named like a baseline: {clash}; rename their folders")
        ad_ids = [a for a in data.cold_ads if a in set(prep.lr_warm.ad_ids)]
        for t in artifacts.values():
            ad_ids = [a for a in ad_ids if a in set(t.ad_ids)]
        if not ad_ids:
            raise LLMHyperError(
                "the priors cover none of the cold ads (with an LR_warm model) of this data set"
            )
        # a seeded column order: ties (a prior that is the same for every ad) rank in no favoured order
        ad_ids = [ad_ids[i] for i in np.random.default_rng(settings.seed).permutation(len(ad_ids))]
        priors = {NONE: no_prior(ad_ids, data.feature_names), **{n: methods[n] for n in names}, **artifacts}
        chosen = choose_precisions(prep, names, artifacts, settings, encoder)
        post_settings = {
            n: PosteriorSettings(precision=c["precision"], intercept_precision=c["intercept_precision"])
            for n, c in chosen.items()
        }
        preds = simulate(prep, priors, post_settings, ad_ids, settings)
        _, Y, M = data.block(data.test_users, ad_ids)
        ref = predict(prep.lr_warm, prep, data.test_users, ad_ids)
        lr_warm = _cells(Y, M, ref[None], settings.n_boot, settings.seed)
    grid = [int(n) for n in settings.impressions]
    target = settings.target * lr_warm["auc"]["value"]
    rows: dict[str, Any] = {}
    for name, P in preds.items():
        curve = [_cells(Y, M, P[:, g], settings.n_boot, settings.seed) for g in range(len(grid))]
        per_repeat = [
            [metrics.pooled_auc(Y, P[r, g], M) for g in range(len(grid))] for r in range(P.shape[0])
        ]
        needs = [crossing(grid, c, target) for c in per_repeat]
        rows[name] = {
            **chosen[name],
            "curve": {m: [c[m] for c in curve] for m in WARMUP_METRICS},
            "auc_per_repeat": per_repeat,
            "impressions_to_target": crossing(grid, [c["auc"]["value"] for c in curve], target),
            "impressions_to_target_per_repeat": needs,
        }
    base = rows[NONE]["impressions_to_target"]
    for name, row in rows.items():
        row["saved_vs_none"] = _saved(base, row["impressions_to_target"], grid[-1])
    return {
        "dataset": data.name,
        "n_ads": len(ad_ids),
        "ad_ids": ad_ids,
        "n_test_users": int(len(data.test_users)),
        "impressions": grid,
        "repeats": settings.repeats,
        "seed": settings.seed,
        "n_boot": settings.n_boot,
        "target_share": settings.target,
        "target_auc": target,
        "lr_warm": lr_warm,
        "encoder": prep.encoder_name,
        "k": prep.k,
        "priors": rows,
    }


def _saved(base: float | None, mine: float | None, top: int) -> dict[str, Any]:
    """Impressions saved against `none`; a bound when one of them never reaches the target in the grid."""
    if mine is None:
        return {"value": None, "note": "does not reach the target"}
    if base is None:
        return {"value": top - mine, "note": f"at least (none does not reach the target by {top})"}
    return {"value": base - mine, "note": ""}


# -- presenting it ---------------------------------------------------------------------------------------


def _needed(row: dict[str, Any], top: int) -> str:
    n, reps = row["impressions_to_target"], row["impressions_to_target_per_repeat"]
    fmt = lambda v: f"> {top}" if v is None else f"{v:.0f}"  # noqa: E731
    cell = fmt(n)
    reached = [r for r in reps if r is not None]
    if len(reps) > 1 and reached:
        cell += f" [{fmt(min(reached))}, {fmt(None if len(reached) < len(reps) else max(reached))}]"
    return cell


def markdown(result: dict[str, Any], metrics_shown: tuple[str, ...] = WARMUP_METRICS) -> str:
    grid, names, top = result["impressions"], list(result["priors"]), result["impressions"][-1]
    parts = []
    for m in metrics_shown:
        head = [f"{HEADERS[m]} at impressions per ad", *names]
        rows = [
            [str(n), *[ci_cell(result["priors"][p]["curve"][m][g]) for p in names]]
            for g, n in enumerate(grid)
        ]
        rows.append(["LR_warm (all train users)", *[ci_cell(result["lr_warm"][m])] * len(names)])
        parts.append(md_table(head, rows))
    share = f"{result['target_share']:.0%}"
    head = [
        "prior",
        "precision: weights / intercept (from)",
        f"impressions to {share} of LR_warm AUC [range over repeats]",
        "saved vs none",
    ]
    rows = []
    for name, row in result["priors"].items():
        s = row["saved_vs_none"]
        saved = (
            "—"
            if s["value"] is None
            else (f"≥ {s['value']:.0f}" if s["note"].startswith("at least") else f"{s['value']:+.0f}")
        )
        rows.append(
            [
                name,
                f"{row['precision']:g} / {row['intercept_precision']:g} ({row['from']})",
                _needed(row, top),
                saved,
            ]
        )
    parts.append(md_table(head, rows))
    parts.append(
        f"{result['dataset']}: {result['n_test_users']} test users x {result['n_ads']} cold ads; "
        f"{result['repeats']} repeats of the revealed users; mean over repeats with 95% intervals from "
        f"{result['n_boot']} bootstrap resamples of test users. Target: {share} of LR_warm's AUC "
        f"{result['lr_warm']['auc']['value']:.3f} = {result['target_auc']:.3f}."
    )
    return "\n\n".join(parts)


PALETTE = ("#555555", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def svg(result: dict[str, Any], metric: str = "auc", width: int = 640, height: int = 400) -> str:
    """A line plot of `metric` against impressions per ad (one line per prior, intervals as bands),
    with LR_warm and the target as dashed lines. Plain SVG, no plotting library."""
    grid, priors = result["impressions"], result["priors"]
    left, right, top, bottom = 60, 150, 20, 45
    pw, ph = width - left - right, height - top - bottom
    vals = [
        c[k]
        for r in priors.values()
        for c in r["curve"][metric]
        for k in ("value", "lo", "hi")
        if c.get(k) is not None
    ]
    vals += [result["lr_warm"][metric]["value"]] + ([result["target_auc"]] if metric == "auc" else [])
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 0.01
    lo, hi = lo - pad, hi + pad

    def x(g: int) -> float:  # the grid's points evenly spaced (0, 10, 25, ... are far from linear)
        return left + pw * g / max(len(grid) - 1, 1)

    def y(v: float) -> float:
        return top + ph * (hi - v) / (hi - lo)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for t in np.linspace(lo + pad, hi - pad, 5):
        out.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:.3f}</text>')
    for g, n in enumerate(grid):
        out.append(f'<text x="{x(g):.1f}" y="{top + ph + 15}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">impressions per ad</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
        f'text-anchor="middle">{HEADERS[metric]}</text>'
    )
    refs = [("LR_warm", result["lr_warm"][metric]["value"])]
    if metric == "auc":
        refs.append((f"{result['target_share']:.0%} of LR_warm", result["target_auc"]))
    for label, v in refs:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#000" '
            f'stroke-dasharray="4 3"/><text x="{left + pw + 6}" y="{y(v) + 4:.1f}">{label}</text>'
        )
    for i, (name, row) in enumerate(priors.items()):
        colour = PALETTE[i % len(PALETTE)]
        cells = row["curve"][metric]
        if all(c.get("lo") is not None for c in cells):
            band = [(x(g), y(c["hi"])) for g, c in enumerate(cells)] + [
                (x(g), y(c["lo"])) for g, c in reversed(list(enumerate(cells)))
            ]
            out.append(
                f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="{colour}" '
                'fill-opacity="0.12" stroke="none"/>'
            )
        pts = " ".join(f"{x(g):.1f},{y(c['value']):.1f}" for g, c in enumerate(cells))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        ly = top + 110 + 14 * i  # below the reference lines' labels
        out.append(
            f'<line x1="{left + pw + 6}" x2="{left + pw + 22}" y1="{ly}" y2="{ly}" stroke="{colour}" '
            f'stroke-width="2"/><text x="{left + pw + 26}" y="{ly + 4}">{_esc(name)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
