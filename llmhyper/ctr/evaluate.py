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
from llmhyper.weights import WeightTable

REFERENCE = "lr_cold"
BAR = "knn_cal"
BAR_METRICS = ["auc", "ad_auc", "ndcg10", "logloss"]
TABLE_METRICS = ["auc", "ad_auc", "ndcg5", "ndcg10", "logloss", "ece", "calib_ratio"]
HEADERS = {"auc": "AUC", "ad_auc": "ad-AUC", "ndcg5": "NDCG@5", "ndcg10": "NDCG@10", "logloss": "log loss",
           "ece": "ECE", "calib_ratio": "pred/obs CTR"}


def baseline_methods(prep: Prepared, encoder=None, seed: int = 0) -> dict[str, Any]:
    data, cold = prep.data, prep.data.cold_ads
    knn = bl.knn_prior(prep.retired, prep.neighbours, cold)
    methods: dict[str, Any] = {
        "lr_warm": prep.lr_warm,
        "lr_cold": bl.lr_cold(prep.retired, cold),
        "knn": knn,
        "knn_cal": bl.calibrated(knn, prep.X_cal, prep.alphas, "knn_cal"),
        "popularity": bl.popularity(cold, data.feature_names, prep.alphas),
        "random": bl.random_weights(cold, data.feature_names, prep.X_cal, prep.alphas, seed),
    }
    if encoder is not None:
        methods["embsim"] = embedding_similarity(prep, encoder, seed)
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


def ranking_latency_ms(method: Any, prep: Prepared, users: np.ndarray, ad_ids: list[str], k: int = 10) -> float:
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


def evaluate(prep: Prepared, methods: dict[str, Any], *, ad_ids: list[str] | None = None, n_boot: int = 1000,
             seed: int = 0, reference: str = REFERENCE, challengers: list[str] | None = None,
             bar: str = BAR) -> dict[str, Any]:
    """Every method on test users x `ad_ids`; each `challenger` (a weight artifact such as an LLM-HYPER
    run) is also compared, paired, with `bar` (the calibrated k-NN prior: the bar an LLM must clear)."""
    data = prep.data
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
                row[metric] = {"value": bs["a"], "lo": bs["a_lo"], "hi": bs["a_hi"],
                               "diff_vs_ref": bs["diff"], "diff_lo": bs["diff_lo"], "diff_hi": bs["diff_hi"],
                               "p_value": bs["p_value"]}
            else:
                v, lo, hi = bootstrap_interval(fn, Y, P, mask=M, n_boot=n_boot, seed=seed)
                row[metric] = {"value": v, "lo": lo, "hi": hi}
        row["latency_ms_per_user"] = ranking_latency_ms(methods[name], prep, users, ad_ids)
        if name in (challengers or []) and bar in preds:
            row[f"vs_{bar}"] = {}
            for metric in BAR_METRICS:
                bs = paired_bootstrap(METRICS[metric], Y, P, preds[bar], mask=M, n_boot=n_boot, seed=seed)
                row[f"vs_{bar}"][metric] = {"diff": bs["diff"], "lo": bs["diff_lo"], "hi": bs["diff_hi"],
                                            "p_value": bs["p_value"]}
        rows[name] = row
    return {
        "dataset": data.name, "n_test_users": int(len(users)), "n_ads": len(ad_ids),
        "ads_subset": len(ad_ids) < len(data.cold_ads), "ad_ids": list(ad_ids), "reference": reference,
        "n_boot": n_boot, "seed": seed, "k": prep.k, "encoder": prep.encoder_name,
        "clicks": int(Y[M].sum()), "impressions": int(M.sum()), "methods": rows,
    }


def _fmt(cell: dict[str, Any]) -> str:
    return f"{cell['value']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]"


def markdown_table(result: dict[str, Any]) -> str:
    ref = result["reference"]
    head = ["method"] + [HEADERS[m] for m in TABLE_METRICS] + ["ms/user", f"ΔAUC vs {ref} (p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["methods"].items():
        d = row["auc"]
        delta = (f"{d['diff_vs_ref']:+.3f} [{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}] (p={d['p_value']:.3f})"
                 if "diff_vs_ref" in d else "—")
        cells = [name] + [_fmt(row[m]) for m in TABLE_METRICS] + [f"{row['latency_ms_per_user']:.4f}", delta]
        lines.append("| " + " | ".join(cells) + " |")
    bar_rows = [(n, r) for n, r in result["methods"].items() if any(k.startswith("vs_") for k in r)]
    if bar_rows:
        key = next(k for k in bar_rows[0][1] if k.startswith("vs_"))
        lines += ["", f"Paired against {key[3:]} (difference, 95% interval, p):", "",
                  "| method | " + " | ".join(HEADERS[m] for m in BAR_METRICS) + " |",
                  "|---|" + "---|" * len(BAR_METRICS)]
        for name, row in bar_rows:
            cells = [f"{row[key][m]['diff']:+.3f} [{row[key][m]['lo']:+.3f}, {row[key][m]['hi']:+.3f}] "
                     f"(p={row[key][m]['p_value']:.3f})" for m in BAR_METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sub = " (subset of cold ads covered by every artifact)" if result["ads_subset"] else ""
    lines.append("")
    lines.append(f"{result['dataset']}: {result['n_test_users']} test users x {result['n_ads']} cold ads{sub}, "
                 f"{result['clicks']} clicks in {result['impressions']} impressions; 95% intervals from "
                 f"{result['n_boot']} paired bootstrap resamples of users; k={result['k']}, "
                 f"encoder {result['encoder']}. AUC pooled over (user, ad) pairs; ad-AUC = mean per-ad AUC.")
    return "\n".join(lines)


def load_artifacts(paths: list[str | Path]) -> dict[str, WeightTable]:
    out: dict[str, WeightTable] = {}
    for p in paths:
        t = WeightTable.load(p)
        name = t.method if t.method not in out else f"{t.method}:{Path(p).name}"
        out[name] = t
    return out
