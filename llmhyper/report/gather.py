"""What the report shows, gathered as plain (JSON-able) data from generate runs, an `llmhyper evaluate --json`
result and the trust study folders: metrics with intervals, generated vs trained weights, calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.ctr.metrics import METRICS, bootstrap_interval, ece
from llmhyper.ctr.normalize import l2_normalize_rows
from llmhyper.ctr.warm import train_warm
from llmhyper.errors import LLMHyperError
from llmhyper.runs import RunDir
from llmhyper.store import read_json
from llmhyper.weights import WeightTable

METRIC_KEYS = ("ad_auc", "auc", "ndcg10")
METRIC_NAMES = {
    "ad_auc": "ad-AUC",
    "auc": "AUC",
    "ndcg10": "NDCG@10",
    "ndcg5": "NDCG@5",
    "logloss": "log loss",
    "ece": "ECE",
    "calib_ratio": "pred/obs CTR",
}


def run_name(run: Path, taken: set[str]) -> str:
    name = "llm_hyper" if "llm_hyper" not in taken else f"llm_hyper:{run.name}"
    i = 2
    while name in taken:
        name, i = f"llm_hyper:{run.name}#{i}", i + 1
    return name


def calibration_bins(Y: np.ndarray, P: np.ndarray, M: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-count bins of the predicted CTR: mean prediction, observed click rate, count."""
    y, p = Y[M].astype(np.float64), P[M].astype(np.float64)
    if not p.size:
        return []
    order = np.argsort(p, kind="stable")
    return [
        {"pred": float(p[c].mean()), "obs": float(y[c].mean()), "n": int(c.size)}
        for c in np.array_split(order, min(n_bins, p.size))
        if c.size
    ]


def load_summary(folder: str | Path | None, name: str) -> dict[str, Any] | None:
    """A trust study's summary (`<folder>/<name>.json`, or the JSON file itself); None without a folder."""
    if not folder:
        return None
    p = Path(folder)
    p = p / f"{name}.json" if p.is_dir() else p
    if not p.exists():
        raise LLMHyperError(f"no {name}.json in {folder} (run llmhyper trust first)")
    return read_json(p, f"{name} summary")


def _runs(runs: list[str | Path], names: list[str]) -> tuple[dict[str, WeightTable], list[dict[str, Any]]]:
    tables: dict[str, WeightTable] = {}
    info = []
    for path in runs:
        run = RunDir(path)
        if not run.weights_dir.exists():
            raise LLMHyperError(f"{path} is not a generate run (no weights/ folder)")
        name = run_name(run.path, set(tables))
        tables[name] = WeightTable.load(run.weights_dir).aligned(names)
        manifest = run.manifest()
        lm = (manifest.get("lm") or {}).get("model") or (manifest.get("config") or {}).get("lm")
        info.append(
            {
                "name": name,
                "path": str(run.path),
                "lm": lm,
                "totals": manifest.get("totals", {}),
                "config": manifest.get("config", {}),
            }
        )
    return tables, info


def _heatmap(
    data, tables: dict[str, WeightTable], lr_warm: WeightTable, ads_lr: list[str], max_ads: int
) -> dict[str, Any]:
    """Ads x features of LR_warm and of each run (rows L2-normalised), the first `max_ads` ads every panel
    has; the per-ad cosine between each run and LR_warm covers every ad, not just the rows shown."""
    shown = ads_lr[:max_ads]
    lr_all = l2_normalize_rows(lr_warm.theta)  # rows in ads_lr order, so shown = the first rows
    panels = [{"name": "lr_warm (trained, row-normalised)", "matrix": lr_all[: len(shown)].round(4).tolist()}]
    cosines = {}
    for n, t in tables.items():
        m = l2_normalize_rows(t.subset(ads_lr).theta)
        panels.append({"name": f"{n} (generated, normalised)", "matrix": m[: len(shown)].round(4).tolist()})
        cosines[n] = (m * lr_all).sum(axis=1).round(4).tolist()
    return {
        "ads": shown,
        "titles": [data.ad_by_id[a].title for a in shown],
        "features": list(data.feature_names),
        "panels": panels,
        "cosine_vs_lr_warm": cosines,
        "n_ads_total": len(ads_lr),
    }


def _from_evaluate(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["methods"]
    return {
        "source": "evaluate JSON",
        "n_ads": result.get("n_ads"),
        "n_test_users": result.get("n_test_users"),
        "n_boot": result.get("n_boot"),
        "methods": {n: {k: row[k] for k in METRIC_KEYS if k in row} for n, row in rows.items()},
        "vs_bar": {n: row[k] for n, row in rows.items() for k in row if k.startswith("vs_")},
        "bar": next((k[3:] for row in rows.values() for k in row if k.startswith("vs_")), None),
    }


def gather(
    data,
    runs: list[str | Path],
    *,
    eval_result: dict[str, Any] | None = None,
    explain: dict[str, Any] | None = None,
    robustness: dict[str, Any] | None = None,
    ablation: dict[str, Any] | None = None,
    lr_warm: WeightTable | None = None,
    max_ads: int = 60,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the page shows, as plain data (JSON-able)."""
    if not runs:
        raise LLMHyperError("give at least one run (--runs)")
    tables, run_info = _runs(runs, data.feature_names)
    covered = set.intersection(*(set(t.ad_ids) for t in tables.values()))
    ads = [a for a in data.cold_ads if a in covered]
    if not ads:
        raise LLMHyperError("the runs have no cold ad in common")
    if lr_warm is None:
        lr_warm = train_warm(data, ads, method="lr_warm", min_pos=1, min_neg=1, progress=False)
    lr_warm = lr_warm.aligned(data.feature_names)
    ads_lr = [a for a in ads if a in set(lr_warm.ad_ids)]
    methods = {"lr_warm": lr_warm.subset(ads_lr), **{n: t.subset(ads) for n, t in tables.items()}}
    heatmap = _heatmap(data, tables, methods["lr_warm"], ads_lr, max_ads)

    # calibration and metrics on the test users
    users = data.test_users
    calibration, computed = {}, {}
    for n, t in methods.items():
        _, Y, M = data.block(users, t.ad_ids)
        P = t.predict(data.X[users])
        calibration[n] = {
            "bins": calibration_bins(Y, P, M),
            "ece": float(ece(Y, P, M)),
            "mean_pred": float(P[M].mean()),
            "mean_obs": float(Y[M].mean()),
            "ads": len(t.ad_ids),
        }
        if eval_result is None:
            computed[n] = {}
            for key in METRIC_KEYS:
                v, lo, hi = bootstrap_interval(METRICS[key], Y, P, mask=M, n_boot=n_boot, seed=seed)
                computed[n][key] = {"value": v, "lo": lo, "hi": hi}
    if eval_result is not None:
        metrics = _from_evaluate(eval_result)
    else:
        metrics = {
            "source": "computed by the report (LR_warm and the runs only)",
            "n_ads": len(ads),
            "n_test_users": int(len(users)),
            "n_boot": n_boot,
            "methods": computed,
            "vs_bar": {},
        }
    return {
        "dataset": data.name,
        "runs": run_info,
        "first_run": next(iter(tables)),
        "n_ads": len(ads),
        "metrics": metrics,
        "heatmap": heatmap,
        "calibration": calibration,
        "explain": explain,
        "robustness": robustness,
        "ablation": ablation,
    }
