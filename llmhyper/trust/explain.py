"""Explainability (paper appendix B-C): do the features a model weights most match what the ad is about, and
does the sign of each generated weight agree with the reasoning the LLM gave for it?

- Ground truth per ad (`target_features`): `metadata["target_features"]` when an ad carries it (any data
  set); MovieLens: share_<G> and like_<G> for every genre G of the movie; synthetic: interest_<t> for every
  topic t of the ad.
- HitRate@k: 1 if any of the k features with the largest weight is in the ground truth, else 0.
- Coverage@k: Jaccard of those k features and the ground truth, |top-k & T| / |top-k | T|.
  Both are averaged over ads (95% bootstrap interval over ads) for a generate run's raw weights and for any
  WeightTable (LR_warm, kNN prior, LR_cold), on the same ads.
- Consistency Rate: an LLM judge (`JudgeReasoningStance`) labels what each batch's reasoning says about each
  feature of the batch (positive / neutral / negative / not mentioned); a label matches the weight of that
  same sample when positive <-> w >= tau, negative <-> w <= -tau, neutral <-> |w| < tau. The rate is the
  share of matches among the features the reasoning takes a stance on; not-mentioned ones are counted apart.

The consistency judge is a resumable run folder (`runs.RunDir`, records in OUT/consistency/<ad>.json, every
LLM call in OUT/calls.jsonl); HitRate and Coverage cost no LLM call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.ctr import baselines as bl
from llmhyper.ctr.warm import train_warm
from llmhyper.data.movielens import genre_key
from llmhyper.errors import LLMHyperError
from llmhyper.fmt import ci_cell, md_table
from llmhyper.retrieval.index import Neighbour
from llmhyper.runs import RunDir
from llmhyper.store import now, write_json_atomic, write_text_atomic
from llmhyper.trust.consistency import (  # noqa: F401  (TAU, mean_ci, short_error re-exported)
    TAU,
    consistency_study,
    mean_ci,
    short_error,
)
from llmhyper.weights import WeightTable

K = 5
# -- ground truth -----------------------------------------------------------------------------------


def target_features(ad: Any, feature_names: list[str]) -> list[str]:
    """The features an ad is about (ground truth for HitRate/Coverage), in the order given, restricted to
    `feature_names`. `ad`: a data.Ad or a dict with `metadata`."""
    meta = dict((ad.get("metadata") if isinstance(ad, dict) else getattr(ad, "metadata", None)) or {})
    if meta.get("target_features"):
        names = [str(n) for n in meta["target_features"]]
    elif meta.get("genres"):
        names = [f"{p}_{genre_key(str(g))}" for g in meta["genres"] for p in ("share", "like")]
    elif meta.get("topics"):
        names = [f"interest_{t}" for t in meta["topics"]]
    else:
        names = []
    known = set(feature_names)
    return list(dict.fromkeys(n for n in names if n in known))


def targets_for(data, ad_ids: list[str]) -> dict[str, list[str]]:
    return {a: target_features(data.ad_by_id[a], data.feature_names) for a in ad_ids}


# -- HitRate@k and Coverage@k -----------------------------------------------------------------------


def top_k(weights: dict[str, float], k: int = K, rank: str = "signed") -> list[str]:
    """The k features with the largest weight ("signed": most positive first; "abs": largest |w|);
    ties broken by name so the answer is deterministic."""
    if rank not in ("signed", "abs"):
        raise ValueError(f"rank must be 'signed' or 'abs', not {rank!r}")
    key = (lambda kv: (-abs(kv[1]), kv[0])) if rank == "abs" else (lambda kv: (-kv[1], kv[0]))
    return [f for f, _ in sorted(((f, float(w)) for f, w in weights.items()), key=key)[:k]]


def hit_rate_at_k(weights: dict[str, float], truth: list[str], k: int = K, rank: str = "signed") -> float:
    return float(bool(set(top_k(weights, k, rank)) & set(truth)))


def coverage_at_k(weights: dict[str, float], truth: list[str], k: int = K, rank: str = "signed") -> float:
    top, t = set(top_k(weights, k, rank)), set(truth)
    union = top | t
    return len(top & t) / len(union) if union else float("nan")


def random_expectation(n_features: int, n_truth: int, k: int = K) -> tuple[float, float]:
    """(expected HitRate@k, expected Coverage@k) of k features drawn at random (hypergeometric)."""
    k = min(k, n_features)
    total = math.comb(n_features, k)
    hit = 1.0 - math.comb(n_features - n_truth, k) / total
    cov = sum(
        math.comb(n_truth, h) * math.comb(n_features - n_truth, k - h) / total * h / (k + n_truth - h)
        for h in range(0, min(k, n_truth) + 1)
    )
    return hit, cov


def weights_from_run(run: str | Path, field: str = "raw_weights") -> dict[str, dict[str, float]]:
    """ad id -> weights of every finished (ok or partial) ad of a generate run. Raw weights are what the LLM
    wrote: features filled from the kNN prior are not among them, so they cannot count for the LLM."""
    return {
        a: {f: float(w) for f, w in rec[field].items()}
        for a, rec in sorted(RunDir(run).finished().items())
        if rec.get(field)
    }


def finished_ads(run: str | Path, ads: list[str] | None = None, limit: int | None = None) -> list[str]:
    """The ads of a generate run a study covers: the finished ones (of `ads` when given), first `limit`."""
    records = RunDir(run).finished()
    ad_ids = [a for a in (ads or records) if a in records]
    ad_ids = ad_ids[:limit] if limit else ad_ids
    if not ad_ids:
        raise LLMHyperError(f"{run} holds no finished ads")
    return ad_ids


def weights_from_table(table: WeightTable) -> dict[str, dict[str, float]]:
    return {
        a: dict(zip(table.feature_names, map(float, table.theta[i]), strict=True))
        for i, a in enumerate(table.ad_ids)
    }


def baseline_tables(data, run: str | Path, ad_ids: list[str]) -> dict[str, WeightTable]:
    """The trained models to compare a run's weights with, on `ad_ids`: LR_warm (trained on the ads' own
    clicks), the kNN prior over the run's own neighbours, and LR_cold (one model for every ad)."""
    records = RunDir(run).finished()
    tables = {"lr_warm": train_warm(data, ad_ids, method="lr_warm", min_pos=1, min_neg=1, progress=False)}
    retired = train_warm(data, data.warm_ads, method="retired", progress=False)
    pool = set(retired.ad_ids)
    nbs = {
        a: [
            Neighbour(n["id"], float(n["similarity"]))
            for n in records[a].get("neighbours", [])
            if n["id"] in pool
        ]
        for a in ad_ids
    }
    have = [a for a in ad_ids if nbs[a]]
    if have:
        tables["knn"] = bl.knn_prior(retired, {a: nbs[a] for a in have}, have)
    tables["lr_cold"] = bl.lr_cold(retired, ad_ids)
    return tables


def explainability(
    sources: dict[str, dict[str, dict[str, float]]],
    truth: dict[str, list[str]],
    *,
    k: int = K,
    rank: str = "signed",
    n_features: int | None = None,
    paired: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """HitRate@k and Coverage@k per source (name -> ad -> feature -> weight). With `paired`, every source is
    scored on the ads all of them cover (and that have a ground truth). With `n_features`, a row for k
    features drawn at random (its exact expectation) is added."""
    with_truth = {a for a, t in truth.items() if t}
    ads = set(with_truth)
    if paired:
        for w in sources.values():
            ads &= set(w)
    rows: dict[str, Any] = {}
    for name, by_ad in sources.items():
        use = sorted(ads if paired else (set(by_ad) & with_truth))
        per_ad = {
            a: {
                "top": top_k(by_ad[a], k, rank),
                "truth": truth[a],
                "hit": hit_rate_at_k(by_ad[a], truth[a], k, rank),
                "coverage": coverage_at_k(by_ad[a], truth[a], k, rank),
            }
            for a in use
        }
        rows[name] = {
            "n_ads": len(use),
            "hit_rate": mean_ci([r["hit"] for r in per_ad.values()], n_boot, seed),
            "coverage": mean_ci([r["coverage"] for r in per_ad.values()], n_boot, seed),
            "per_ad": per_ad,
        }
    if n_features:
        use = sorted(ads)
        exp = [random_expectation(n_features, len(truth[a]), k) for a in use]
        expected = lambda i: {
            "value": float(np.mean([e[i] for e in exp])) if exp else None,  # noqa: E731
            "lo": None,
            "hi": None,
            "n": len(use),
        }
        rows["random (expected)"] = {
            "n_ads": len(use),
            "per_ad": {},
            "hit_rate": expected(0),
            "coverage": expected(1),
        }
    return {"k": k, "rank": rank, "paired": paired, "n_ads_with_truth": len(with_truth), "methods": rows}


# -- the whole study --------------------------------------------------------------------------------


def explain_study(
    data,
    run: str | Path,
    out: str | Path,
    *,
    tables: dict[str, WeightTable] | None = None,
    lm_handle=None,
    k: int = K,
    rank: str = "signed",
    tau: float = TAU,
    ad_ids: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    consistency_limit: int | None = None,
) -> dict[str, Any]:
    """HitRate/Coverage for the run (raw weights) and each table, plus the Consistency Rate when an LM is
    given (on the first `consistency_limit` ads only, when set: it costs LLM calls, the rest is free);
    writes OUT/explain.json and OUT/explain.md and returns the summary."""
    out = Path(out)
    llm = weights_from_run(run)
    if ad_ids is not None:
        llm = {a: w for a, w in llm.items() if a in set(ad_ids)}
    sources = {"llm_hyper": llm}
    for name, table in (tables or {}).items():
        sources[name] = weights_from_table(table.aligned(data.feature_names))
    truth = targets_for(data, sorted(llm))
    summary: dict[str, Any] = {
        "study": "explainability",
        "run": str(run),
        "updated": now(),
        "tau": tau,
        **explainability(
            sources, truth, k=k, rank=rank, n_features=len(data.feature_names), n_boot=n_boot, seed=seed
        ),
    }
    if lm_handle is not None:
        judged = sorted(llm)[:consistency_limit] if consistency_limit else sorted(llm)
        summary["consistency"] = consistency_study(
            data, run, out, lm_handle, ad_ids=judged, tau=tau, config=config, force=force, progress=progress
        )
        summary["consistency_lm"] = getattr(lm_handle, "description", {})
    write_json_atomic(out / "explain.json", summary)
    write_text_atomic(out / "explain.md", explain_markdown(summary) + "\n")
    return summary


def explain_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    k = summary["k"]
    head = ["method", "ads", f"HitRate@{k}", f"Coverage@{k}", "Consistency Rate"]
    cons = summary.get("consistency")
    rows = []
    for name, r in summary["methods"].items():
        c = "—"
        if name == "llm_hyper" and cons and cons.get("rate") is not None:
            c = f"{cons['rate']:.3f} ({cons['match']}/{cons['judged']})"
        rows.append([name, str(r["n_ads"]), ci_cell(r["hit_rate"]), ci_cell(r["coverage"]), c])
    return head, rows


def explain_markdown(summary: dict[str, Any]) -> str:
    lines = [md_table(*explain_rows(summary)), ""]
    rank = "largest weight" if summary["rank"] == "signed" else "largest |weight|"
    lines.append(
        f"Top-{summary['k']} features by {rank} against each ad's ground-truth features "
        f"({summary['n_ads_with_truth']} ads with a ground truth; every row on the same ads); 95% "
        "bootstrap intervals over ads. llm_hyper: the LLM's raw weights."
    )
    cons = summary.get("consistency")
    if cons:
        lines.append(
            f"Consistency Rate: judge labels vs the sign of the same sample's weight (neutral: "
            f"|w| < {summary['tau']}), pooled over {cons['judged']} labelled features of "
            f"{cons['ads']} ads; {cons['not_mentioned']} features not mentioned by the reasoning, "
            f"{cons['unlabelled']} unlabelled. By label: "
            + ", ".join(f"{lab} {v['match']}/{v['n']}" for lab, v in cons["by_label"].items())
            + "."
        )
    return "\n".join(lines)
