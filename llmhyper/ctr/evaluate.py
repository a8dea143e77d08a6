"""Score every method on the test users x cold ads and print a table in the shape of the paper's Table 1.

Rows: the baselines, LR_warm (upper bound), and any weight artifact passed in (LLM-HYPER runs, other
programs). When an artifact covers only some cold ads (a `--limit` run), every row is computed on exactly
those ads, so the comparison stays paired.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.ctr import baselines as bl
from llmhyper.ctr.metrics import METRICS, bootstrap_interval, paired_bootstrap
from llmhyper.ctr.prepare import Prepared, embed
from llmhyper.ctr.prior import PriorSettings, ridge_methods
from llmhyper.errors import LLMHyperError
from llmhyper.fmt import ci_cell, diff_cell, md_table
from llmhyper.weights import WeightTable

REFERENCE = "lr_cold"
BAR = "knn_cal"
PRIORS = ("knn_cal", "ridge", "ridge_cal")  # the best of them (on retired validation) is the bar as well
BAR_METRICS = ["auc", "ad_auc", "ndcg10", "logloss"]
TABLE_METRICS = ["auc", "ad_auc", "ndcg5", "ndcg10", "logloss", "ece", "calib_ratio"]
HEADERS = {
    "auc": "AUC",
    "ad_auc": "ad-AUC",
    "ndcg5": "NDCG@5",
    "ndcg10": "NDCG@10",
    "logloss": "log loss",
    "ece": "ECE",
    "calib_ratio": "pred/obs CTR",
}


def baseline_methods(
    prep: Prepared,
    encoder=None,
    seed: int = 0,
    prior: PriorSettings | None = None,
    prior_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every prior and baseline for the cold ads. `prior_extra`: more text encoders offered to the ridge
    prior as inputs (kept only if cross-validation on retired ads picks them)."""
    data, cold = prep.data, prep.data.cold_ads
    knn = bl.knn_prior(prep.retired, prep.neighbours, cold)
    methods: dict[str, Any] = {
        "lr_warm": prep.lr_warm,
        "lr_cold": bl.lr_cold(prep.retired, cold),
        "knn": knn,
        "knn_cal": bl.calibrated(knn, prep.X_cal, prep.alphas, "knn_cal"),
        **ridge_methods(prep, encoder, prior or PriorSettings(seed=seed), prior_extra),
        "popularity": bl.popularity(cold, data.feature_names, prep.alphas),
        "random": bl.random_weights(cold, data.feature_names, prep.X_cal, prep.alphas, seed),
    }
    if encoder is not None:
        methods["embsim"] = embedding_similarity(prep, encoder, seed)
    if data.truth is not None:  # a synthetic world: the weights that generated the clicks, as the ceiling
        methods["truth"] = data.truth.subset(cold).aligned(data.feature_names)
    return methods


def embedding_similarity(prep: Prepared, encoder, seed: int = 0, n_fit_users: int = 300):
    data = prep.data
    pool = data.warm_ads  # every retired movie shapes the profile, not only those with a model
    text_ids = pool + [a for a in data.cold_ads if a not in set(pool)]
    V = embed(data, text_ids, encoder, images=False)
    vecs = dict(zip(text_ids, V, strict=True))
    clicks = data.Y[:, data.cols(pool)]  # ratings of retired movies only: nothing from cold ones
    profiles = bl.user_profiles(clicks, np.stack([vecs[a] for a in pool]))
    rng = np.random.default_rng(seed)
    fit_users = rng.choice(data.train_users, size=min(n_fit_users, len(data.train_users)), replace=False)
    fit_ads = prep.retired.ad_ids
    S = profiles[fit_users] @ np.stack([vecs[a] for a in fit_ads]).T
    y = data.Y[np.ix_(fit_users, data.cols(fit_ads))]
    a, b = bl.fit_platt(S.ravel(), y.ravel())
    return bl.EmbeddingSimilarity(profiles, vecs, a, b)


def predict(method: Any, prep: Prepared, users: np.ndarray, ad_ids: list[str]) -> np.ndarray:
    if isinstance(method, WeightTable):
        return method.subset(ad_ids).aligned(prep.data.feature_names).predict(prep.data.X[users])
    return method.predict_users(users, ad_ids)


def ranking_latency_ms(
    method: Any, prep: Prepared, users: np.ndarray, ad_ids: list[str], k: int = 10
) -> float:
    """Median wall time to score one user against all ads and take the top k (float32, in-process)."""
    if isinstance(method, WeightTable):
        t = method.subset(ad_ids).aligned(prep.data.feature_names)
        W, b = t.theta.astype(np.float32).T.copy(), t.intercept.astype(np.float32)
        X = prep.data.X[users].astype(np.float32)
    else:
        W = np.stack([method.ad_vectors[a] for a in ad_ids]).astype(np.float32).T.copy()
        b = np.zeros(len(ad_ids), np.float32)
        X = method.profiles[users].astype(np.float32)
    kk = min(k, len(ad_ids) - 1)
    times = []
    for x in X:
        t0 = time.perf_counter()
        s = x @ W + b
        top = np.argpartition(-s, kk)[:kk]
        top[np.argsort(-s[top])]
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def best_prior(methods: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    """The prior with the best pooled AUC on held-out RETIRED ads (recorded by `ridge_methods`), among
    those present; choosing it on the cold ads would tune on the test set."""
    val: dict[str, float] = {}
    for m in methods.values():
        if isinstance(m, WeightTable) and "retired_validation_auc" in m.meta:
            val = dict(m.meta["retired_validation_auc"])
            break
    known = {k: v for k, v in val.items() if k in methods and k in PRIORS and np.isfinite(v)}
    return (max(known, key=known.get) if known else None), val


def evaluate(
    prep: Prepared,
    methods: dict[str, Any],
    *,
    ad_ids: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    reference: str = REFERENCE,
    challengers: list[str] | None = None,
    bar: str = BAR,
) -> dict[str, Any]:
    """Every method on test users x `ad_ids`; each `challenger` (a weight artifact such as an LLM-HYPER
    run) is also compared, paired, with the best prior (chosen on retired validation, see `best_prior`)
    and with `bar` (the calibrated k-NN prior)."""
    data = prep.data
    best, val_auc = best_prior(methods)
    bars = [b for b in dict.fromkeys([best, bar]) if b is not None and b in methods]
    ad_ids = ad_ids or data.cold_ads
    users = data.test_users
    _, Y, M = data.block(users, ad_ids)
    preds = {name: predict(m, prep, users, ad_ids) for name, m in methods.items()}
    ref = preds.get(reference)
    rows: dict[str, Any] = {}
    for name, P in preds.items():
        row: dict[str, Any] = {}
        for metric in TABLE_METRICS:
            fn = METRICS[metric]
            if ref is not None and name != reference:
                bs = paired_bootstrap(fn, Y, P, ref, mask=M, n_boot=n_boot, seed=seed)
                row[metric] = {
                    "value": bs["a"],
                    "lo": bs["a_lo"],
                    "hi": bs["a_hi"],
                    "diff_vs_ref": bs["diff"],
                    "diff_lo": bs["diff_lo"],
                    "diff_hi": bs["diff_hi"],
                    "p_value": bs["p_value"],
                }
            else:
                v, lo, hi = bootstrap_interval(fn, Y, P, mask=M, n_boot=n_boot, seed=seed)
                row[metric] = {"value": v, "lo": lo, "hi": hi}
        row["latency_ms_per_user"] = ranking_latency_ms(methods[name], prep, users, ad_ids)
        for b in bars if name in (challengers or []) else []:
            row[f"vs_{b}"] = {}
            for metric in BAR_METRICS:
                bs = paired_bootstrap(METRICS[metric], Y, P, preds[b], mask=M, n_boot=n_boot, seed=seed)
                row[f"vs_{b}"][metric] = {
                    "diff": bs["diff"],
                    "lo": bs["diff_lo"],
                    "hi": bs["diff_hi"],
                    "p_value": bs["p_value"],
                }
        rows[name] = row
    return {
        "dataset": data.name,
        "n_test_users": int(len(users)),
        "n_ads": len(ad_ids),
        "ads_subset": len(ad_ids) < len(data.cold_ads),
        "ad_ids": list(ad_ids),
        "reference": reference,
        "n_boot": n_boot,
        "seed": seed,
        "k": prep.k,
        "encoder": prep.encoder_name,
        "clicks": int(Y[M].sum()),
        "impressions": int(M.sum()),
        "methods": rows,
        "best_prior": best,
        "bars": bars,
        "retired_validation_auc": val_auc,
        "prior": _prior_info(methods),
    }


def _prior_info(methods: dict[str, Any]) -> dict[str, Any] | None:
    """What the ridge prior chose (inputs, penalty, its CV score), without the per-candidate table."""
    m = methods.get("ridge")
    if not isinstance(m, WeightTable):
        return None
    keep = ("inputs", "alpha", "chosen_by", "cv_auc", "cv_mse", "n_fit_ads", "encoder")
    info = {k: m.meta[k] for k in keep if k in m.meta}
    by_inputs: dict[str, dict[str, float]] = {}  # each input set at its best penalty
    for c in m.meta.get("candidates", []):
        key = "+".join(c["inputs"])
        if key not in by_inputs or c["score"] > by_inputs[key]["cv_auc"]:
            by_inputs[key] = {"cv_auc": c["score"], "alpha": c["alpha"]}
    if by_inputs:
        info["cv_auc_by_inputs"] = by_inputs
    return info


def _fmt(cell: dict[str, Any]) -> str:
    return ci_cell(cell)


def markdown_table(result: dict[str, Any]) -> str:
    ref = result["reference"]
    head = ["method"] + [HEADERS[m] for m in TABLE_METRICS] + ["ms/user", f"ΔAUC vs {ref} (p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["methods"].items():
        d = row["auc"]
        delta = diff_cell(
            {
                "diff": d.get("diff_vs_ref"),
                "lo": d.get("diff_lo"),
                "hi": d.get("diff_hi"),
                "p_value": d.get("p_value"),
            }
        )
        cells = [name] + [_fmt(row[m]) for m in TABLE_METRICS] + [f"{row['latency_ms_per_user']:.4f}", delta]
        lines.append("| " + " | ".join(cells) + " |")
    keys = list(dict.fromkeys(k for r in result["methods"].values() for k in r if k.startswith("vs_")))
    val = result.get("retired_validation_auc") or {}
    for key in keys:
        why = (
            " (the best prior by pooled AUC on held-out retired ads: "
            + ", ".join(f"{n} {v:.3f}" for n, v in val.items())
            + ")"
            if key[3:] == result.get("best_prior")
            else ""
        )
        bar_rows = [
            [name] + [diff_cell(row[key][m]) for m in BAR_METRICS]
            for name, row in result["methods"].items()
            if key in row
        ]
        lines += [
            "",
            f"Paired against {key[3:]}{why} (difference, 95% interval, p):",
            "",
            md_table(["method"] + [HEADERS[m] for m in BAR_METRICS], bar_rows),
        ]
    if result.get("prior"):
        p = result["prior"]
        lines += [
            "",
            f"ridge prior: inputs {'+'.join(p.get('inputs', []))}, penalty {p.get('alpha')}, "
            f"{p.get('chosen_by', '')}.",
        ]
        if p.get("cv_auc_by_inputs"):
            lines.append(
                "CV AUC by inputs (at its best penalty): "
                + ", ".join(
                    f"{k} {v['cv_auc']:.3f}"
                    for k, v in sorted(p["cv_auc_by_inputs"].items(), key=lambda kv: -kv[1]["cv_auc"])
                )
                + "."
            )
    sub = " (subset of cold ads covered by every artifact)" if result["ads_subset"] else ""
    lines.append("")
    lines.append(
        f"{result['dataset']}: {result['n_test_users']} test users x {result['n_ads']} cold ads{sub}, "
        f"{result['clicks']} clicks in {result['impressions']} impressions; "
        + (
            f"95% intervals from {result['n_boot']} paired bootstrap resamples of users"
            if result["n_boot"]
            else "no intervals (0 bootstrap resamples)"
        )
        + f"; k={result['k']}, "
        f"encoder {result['encoder']}. AUC pooled over (user, ad) pairs; ad-AUC = mean per-ad AUC."
    )
    return "\n".join(lines)


def load_artifacts(paths: list[str | Path], reserved: tuple[str, ...] = ()) -> dict[str, WeightTable]:
    """Each artifact by its method name (`method:folder` on a clash); damage, a folder given twice or a name
    in `reserved` (the baselines' rows) is a one-line error."""
    out: dict[str, WeightTable] = {}
    seen: set[Path] = set()
    for p in paths:
        where = Path(p).expanduser().resolve()
        if where in seen:
            raise LLMHyperError(f"the weight artifact {p} is given twice")
        seen.add(where)
        t = WeightTable.load(p)
        if t.method in reserved:
            raise LLMHyperError(
                f"the weight artifact {p} is called '{t.method}', the name of a baseline; "
                "change 'method' in its weights.json"
            )
        name, n = t.method, 1
        while name in out:  # two artifacts of one method: tell them apart by folder (and number)
            name = f"{t.method}:{Path(p).name}" + (f":{n}" if n > 1 else "")
            n += 1
        out[name] = t
    return out


def evaluable_ads(prep: Prepared) -> tuple[list[str], list[str]]:
    """The cold ads that can be scored: shown to some test user (labels to score against) and with an
    LR_warm model (a click and a non-click among train users). Returns them and notes on any left out;
    none at all is a one-line error saying what the data lacks."""
    data = prep.data
    if len(data.test_users) == 0:
        raise LLMHyperError(
            f"{data.name}: no test users ({len(data.user_ids)} users in all); evaluation needs more users"
        )
    shown = data.M[np.ix_(data.test_users, data.cols(data.cold_ads))].any(axis=0)
    unseen = [a for a, s in zip(data.cold_ads, shown, strict=True) if not s]
    warm = set(prep.lr_warm.ad_ids)
    no_model = [a for a, s in zip(data.cold_ads, shown, strict=True) if s and a not in warm]
    left_out = set(unseen) | set(no_model)
    ads = [a for a in data.cold_ads if a not in left_out]
    notes = []
    if unseen:
        notes.append(
            f"{len(unseen)} of {len(data.cold_ads)} cold ads have no impressions among the test "
            "users and are left out of the evaluation"
        )
    if no_model:
        notes.append(
            f"{len(no_model)} cold ads lack a click or a non-click among the train users (no "
            "LR_warm model) and are left out of the evaluation"
        )
    if not ads:
        raise LLMHyperError(
            f"{data.name}: none of the {len(data.cold_ads)} cold ads can be evaluated: each "
            "needs impressions among the test users, with a click and a non-click among the "
            'train users (mark ads {"cold": true} in their metadata and keep their impressions)'
        )
    return ads, notes
