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
import time
from pathlib import Path
from typing import Any

import dspy
import numpy as np
from tqdm import tqdm

from llmhyper.ctr import baselines as bl
from llmhyper.ctr.warm import train_warm
from llmhyper.data.movielens import genre_key
from llmhyper.errors import LLMHyperError
from llmhyper.fmt import ci_cell, md_table
from llmhyper.hyper.program import format_ad
from llmhyper.llm.calls import lm_calls
from llmhyper.retrieval.index import Neighbour
from llmhyper.runs import RunDir
from llmhyper.store import now, versions, write_json_atomic, write_text_atomic
from llmhyper.trust.signatures import JudgeReasoningStance
from llmhyper.weights import WeightTable

K = 5
TAU = 0.1  # |raw weight| below this reads as "neutral" (raw weights typically lie in [-1, 1])
LABELS = ("positive", "neutral", "negative", "not_mentioned")
_SYNONYMS = {
    "pos": "positive", "+": "positive", "increase": "positive", "increases": "positive",
    "neg": "negative", "-": "negative", "decrease": "negative", "decreases": "negative",
    "none": "neutral", "zero": "neutral", "0": "neutral", "irrelevant": "neutral",
    "not mentioned": "not_mentioned", "notmentioned": "not_mentioned", "unmentioned": "not_mentioned",
    "not-mentioned": "not_mentioned", "n/a": "not_mentioned", "na": "not_mentioned",
}
COUNTS = ("judged", "match", "not_mentioned", "unlabelled", "no_weight")


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
    cov = sum(math.comb(n_truth, h) * math.comb(n_features - n_truth, k - h) / total * h / (k + n_truth - h)
              for h in range(0, min(k, n_truth) + 1))
    return hit, cov


def mean_ci(values: list[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float | int | None]:
    """Mean with a 95% percentile bootstrap interval over the items (nan items dropped)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not x.size:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1) if n_boot else np.array([x.mean()])
    return {"value": float(x.mean()), "lo": float(np.percentile(means, 2.5)),
            "hi": float(np.percentile(means, 97.5)), "n": int(x.size)}


def weights_from_run(run: str | Path, field: str = "raw_weights") -> dict[str, dict[str, float]]:
    """ad id -> weights of every finished (ok or partial) ad of a generate run. Raw weights are what the LLM
    wrote: features filled from the kNN prior are not among them, so they cannot count for the LLM."""
    return {a: {f: float(w) for f, w in rec[field].items()}
            for a, rec in sorted(RunDir(run).finished().items()) if rec.get(field)}


def finished_ads(run: str | Path, ads: list[str] | None = None, limit: int | None = None) -> list[str]:
    """The ads of a generate run a study covers: the finished ones (of `ads` when given), first `limit`."""
    records = RunDir(run).finished()
    ad_ids = [a for a in (ads or records) if a in records]
    ad_ids = ad_ids[:limit] if limit else ad_ids
    if not ad_ids:
        raise LLMHyperError(f"{run} holds no finished ads")
    return ad_ids


def weights_from_table(table: WeightTable) -> dict[str, dict[str, float]]:
    return {a: dict(zip(table.feature_names, map(float, table.theta[i]), strict=True))
            for i, a in enumerate(table.ad_ids)}


def baseline_tables(data, run: str | Path, ad_ids: list[str]) -> dict[str, WeightTable]:
    """The trained models to compare a run's weights with, on `ad_ids`: LR_warm (trained on the ads' own
    clicks), the kNN prior over the run's own neighbours, and LR_cold (one model for every ad)."""
    records = RunDir(run).finished()
    tables = {"lr_warm": train_warm(data, ad_ids, method="lr_warm", min_pos=1, min_neg=1, progress=False)}
    retired = train_warm(data, data.warm_ads, method="retired", progress=False)
    pool = set(retired.ad_ids)
    nbs = {a: [Neighbour(n["id"], float(n["similarity"])) for n in records[a].get("neighbours", [])
               if n["id"] in pool] for a in ad_ids}
    have = [a for a in ad_ids if nbs[a]]
    if have:
        tables["knn"] = bl.knn_prior(retired, {a: nbs[a] for a in have}, have)
    tables["lr_cold"] = bl.lr_cold(retired, ad_ids)
    return tables


def explainability(sources: dict[str, dict[str, dict[str, float]]], truth: dict[str, list[str]], *,
                   k: int = K, rank: str = "signed", n_features: int | None = None, paired: bool = True,
                   n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
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
        per_ad = {a: {"top": top_k(by_ad[a], k, rank), "truth": truth[a],
                      "hit": hit_rate_at_k(by_ad[a], truth[a], k, rank),
                      "coverage": coverage_at_k(by_ad[a], truth[a], k, rank)} for a in use}
        rows[name] = {"n_ads": len(use),
                      "hit_rate": mean_ci([r["hit"] for r in per_ad.values()], n_boot, seed),
                      "coverage": mean_ci([r["coverage"] for r in per_ad.values()], n_boot, seed),
                      "per_ad": per_ad}
    if n_features:
        use = sorted(ads)
        exp = [random_expectation(n_features, len(truth[a]), k) for a in use]
        expected = lambda i: {"value": float(np.mean([e[i] for e in exp])) if exp else None,  # noqa: E731
                              "lo": None, "hi": None, "n": len(use)}
        rows["random (expected)"] = {"n_ads": len(use), "per_ad": {}, "hit_rate": expected(0),
                                     "coverage": expected(1)}
    return {"k": k, "rank": rank, "paired": paired, "n_ads_with_truth": len(with_truth), "methods": rows}


# -- Consistency Rate -------------------------------------------------------------------------------


def normalize_label(value: Any) -> str | None:
    s = str(value).strip().strip("\"'.").lower().replace("_", " ")
    s = _SYNONYMS.get(s, s).replace(" ", "_")
    return s if s in LABELS else None


def stance_matches(label: str, weight: float, tau: float = TAU) -> bool:
    if label == "positive":
        return weight >= tau
    if label == "negative":
        return weight <= -tau
    if label == "neutral":
        return abs(weight) < tau
    raise ValueError(f"no stance to compare: {label!r}")


def batch_views(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch of a generate record: its features, the reasoning of the sample the program reports for it
    (the first sample with reasoning) and that same sample's weights (what the reasoning produced)."""
    out = []
    for i, b in enumerate(record.get("batches") or []):
        sample = next((s for s in b.get("samples", []) if s.get("reasoning")), None) or {}
        out.append({"batch": i, "features": list(b.get("features", [])),
                    "reasoning": sample.get("reasoning", ""), "weights": dict(sample.get("weights", {}))})
    return out


def score_consistency(views: list[dict[str, Any]], stances: list[dict[str, Any] | None],
                      tau: float = TAU) -> dict[str, Any]:
    """Compare each batch's labels (feature -> label, or None when the judge failed) with its weights."""
    n = dict.fromkeys(COUNTS, 0)
    by_label = {lab: {"n": 0, "match": 0} for lab in LABELS[:3]}
    details = []
    for view, st in zip(views, stances, strict=True):
        for f in view["features"]:
            raw = None if st is None else st.get(f)
            label = normalize_label(raw) if raw is not None else None
            w = view["weights"].get(f)
            row = {"batch": view["batch"], "feature": f, "label": label, "raw_label": raw, "weight": w}
            if label is None:
                n["unlabelled"] += 1
            elif label == "not_mentioned":
                n["not_mentioned"] += 1
            elif w is None:
                n["no_weight"] += 1
            else:
                ok = stance_matches(label, float(w), tau)
                row["match"] = ok
                n["judged"] += 1
                n["match"] += ok
                by_label[label]["n"] += 1
                by_label[label]["match"] += ok
            details.append(row)
    rate = n["match"] / n["judged"] if n["judged"] else None
    return {**n, "rate": rate, "by_label": by_label, "details": details}


class StanceJudge:
    """One LLM call per batch: what the reasoning says about each feature of the batch."""

    def __init__(self):
        self.predict = dspy.Predict(JudgeReasoningStance)

    def __call__(self, ad_txt: str, features: list[dict[str, str]], reasoning: str) -> dict[str, Any]:
        feat_txt = "\n".join(f"- {f['name']}: {_first_clause(f['description'])}" for f in features)
        try:
            adapter = dspy.settings.adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)
            with dspy.context(adapter=adapter):
                pred = self.predict(ad=ad_txt, features=feat_txt, reasoning=reasoning)
        except dspy.utils.exceptions.AdapterParseError as exc:
            return {"ok": False, "reason": f"AdapterParseError: {short_error(exc)}"}
        st = pred.stances if isinstance(pred.stances, dict) else {}
        names = {f["name"] for f in features}
        loose = {_loose(k): v for k, v in st.items()}
        got = {n: st.get(n, loose.get(_loose(n))) for n in names}
        loose_names = {_loose(n) for n in names}
        unknown = sorted(str(k) for k in st if str(k) not in names and _loose(k) not in loose_names)
        stances = {n: v for n, v in got.items() if v is not None}
        return {"ok": True, "stances": stances, "unknown_names": unknown}


def consistency_study(data, run: str | Path, out: str | Path, lm_handle, *, ad_ids: list[str] | None = None,
                      tau: float = TAU, hide_titles: bool | None = None, config: dict[str, Any] | None = None,
                      force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Label every batch's reasoning of a generate run; one record per ad in OUT/consistency/<ad>.json
    (resumable: finished ads are skipped), every LLM call in OUT/calls.jsonl. Returns the totals."""
    source = RunDir(run)
    records = source.finished()
    hide = bool((source.settings() or {}).get("hide_titles")) if hide_titles is None else hide_titles
    settings = {"study": "consistency", "run": str(Path(run).resolve()), "tau": tau, "hide_titles": hide,
                **(config or {})}
    todo_ids = [a for a in (ad_ids or list(records)) if a in records]
    specs = {f.name: f.model_dump() for f in data.features}
    judge = StanceJudge()
    with RunDir(out, records="consistency") as study:
        study.check_settings(settings, force=force)
        done = study.finished(("ok",))
        times = study.session_times(resuming=bool(done))
        for ad_id in tqdm(todo_ids, desc="consistency", unit="ad", disable=not progress):
            if ad_id in done:
                continue
            ad = data.ad_by_id[ad_id]
            ad_txt = format_ad({"title": ad.title, "text": ad.text, "caption": ad.caption}, hide)
            views = batch_views(records[ad_id])
            mark, t0 = len(lm_handle.lm.history), time.time()
            verdicts: list[dict[str, Any]] = []
            with dspy.context(lm=lm_handle.lm):
                for v in views:
                    if not v["reasoning"].strip() or not v["weights"]:
                        verdicts.append({"ok": False, "reason": "no reasoning or weights in this batch"})
                        continue
                    feats = [specs[f] for f in v["features"] if f in specs]
                    verdicts.append(judge(ad_txt, feats, v["reasoning"]))
            stances = [vd.get("stances") if vd.get("ok") else None for vd in verdicts]
            scored = score_consistency(views, stances, tau)
            result = {"ad_id": ad_id, "status": "ok" if all(vd.get("ok") for vd in verdicts) else "partial",
                      "batches": [{**v, "verdict": vd} for v, vd in zip(views, verdicts, strict=True)],
                      **{k: scored[k] for k in (*COUNTS, "rate", "by_label", "details")},
                      "seconds": round(time.time() - t0, 2)}
            calls = lm_calls(lm_handle.lm, since=mark)
            study.append_calls(ad_id, [{"study": "consistency", **c} for c in calls])
            study.write_record(ad_id, result, settings)
        totals = consistency_totals(out, todo_ids)
        study.write_manifest({"study": "consistency", "config": settings,
                              "lm": getattr(lm_handle, "description", {}), "versions": versions(), **times,
                              "updated": now(), "totals": totals})
    return totals


def consistency_totals(out: str | Path, ad_ids: list[str] | None = None) -> dict[str, Any]:
    """Pooled Consistency Rate over the per-ad records of a consistency study (features pooled; the per-ad
    mean and its bootstrap interval too); only `ad_ids`' records when given (a rerun with a smaller
    --consistency-limit keeps the other records on disk but does not count them)."""
    by_id = RunDir(out, records="consistency").records()
    recs = [by_id[a] for a in ad_ids if a in by_id] if ad_ids is not None else list(by_id.values())
    tot = {k: sum(r.get(k, 0) for r in recs) for k in COUNTS}
    by_label = {lab: {"n": sum(r["by_label"][lab]["n"] for r in recs),
                      "match": sum(r["by_label"][lab]["match"] for r in recs)} for lab in LABELS[:3]}
    for v in by_label.values():
        v["rate"] = v["match"] / v["n"] if v["n"] else None
    return {"ads": len(recs), "ads_fully_judged": sum(r["status"] == "ok" for r in recs), **tot,
            "rate": tot["match"] / tot["judged"] if tot["judged"] else None,
            "per_ad_rate": mean_ci([r["rate"] for r in recs if r.get("rate") is not None]),
            "by_label": by_label}


# -- the whole study --------------------------------------------------------------------------------


def explain_study(data, run: str | Path, out: str | Path, *, tables: dict[str, WeightTable] | None = None,
                  lm_handle=None, k: int = K, rank: str = "signed", tau: float = TAU,
                  ad_ids: list[str] | None = None, n_boot: int = 1000, seed: int = 0, force: bool = False,
                  progress: bool = True, config: dict[str, Any] | None = None,
                  consistency_limit: int | None = None) -> dict[str, Any]:
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
        "study": "explainability", "run": str(run), "updated": now(), "tau": tau,
        **explainability(sources, truth, k=k, rank=rank, n_features=len(data.feature_names), n_boot=n_boot,
                         seed=seed)}
    if lm_handle is not None:
        judged = sorted(llm)[:consistency_limit] if consistency_limit else sorted(llm)
        summary["consistency"] = consistency_study(data, run, out, lm_handle, ad_ids=judged, tau=tau,
                                                   config=config, force=force, progress=progress)
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
    lines.append(f"Top-{summary['k']} features by {rank} against each ad's ground-truth features "
                 f"({summary['n_ads_with_truth']} ads with a ground truth; every row on the same ads); 95% "
                 "bootstrap intervals over ads. llm_hyper: the LLM's raw weights.")
    cons = summary.get("consistency")
    if cons:
        lines.append(f"Consistency Rate: judge labels vs the sign of the same sample's weight (neutral: "
                     f"|w| < {summary['tau']}), pooled over {cons['judged']} labelled features of "
                     f"{cons['ads']} ads; {cons['not_mentioned']} features not mentioned by the reasoning, "
                     f"{cons['unlabelled']} unlabelled. By label: "
                     + ", ".join(f"{lab} {v['match']}/{v['n']}" for lab, v in cons["by_label"].items()) + ".")
    return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------------


def short_error(exc: Exception, n: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + "..."


def _loose(s: Any) -> str:
    return "".join(ch for ch in str(s).lower() if ch.isalnum())


def _first_clause(text: str, n: int = 80) -> str:
    head = text.split(" (")[0].split("; ")[0]
    return head if len(head) <= n else head[:n].rsplit(" ", 1)[0] + "..."
