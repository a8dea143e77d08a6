"""The Consistency Rate (the paper's appendix C.2 judge, as a trust study): an LLM reads each batch's
reasoning and labels its stance on every feature (positive, neutral, negative, not mentioned); a stance
matches when the raw weight has that sign (|w| < TAU reads as neutral). Resumable on a RunDir."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import dspy
import numpy as np
from tqdm import tqdm

from llmhyper.hyper.program import format_ad
from llmhyper.llm.calls import lm_calls
from llmhyper.paths import repo_relative
from llmhyper.runs import RunDir
from llmhyper.store import now, versions
from llmhyper.trust.signatures import JudgeReasoningStance

TAU = 0.1  # |raw weight| below this reads as "neutral" (raw weights typically lie in [-1, 1])
LABELS = ("positive", "neutral", "negative", "not_mentioned")
_SYNONYMS = {
    "pos": "positive",
    "+": "positive",
    "increase": "positive",
    "increases": "positive",
    "neg": "negative",
    "-": "negative",
    "decrease": "negative",
    "decreases": "negative",
    "none": "neutral",
    "zero": "neutral",
    "0": "neutral",
    "irrelevant": "neutral",
    "not mentioned": "not_mentioned",
    "notmentioned": "not_mentioned",
    "unmentioned": "not_mentioned",
    "not-mentioned": "not_mentioned",
    "n/a": "not_mentioned",
    "na": "not_mentioned",
}
COUNTS = ("judged", "match", "not_mentioned", "unlabelled", "no_weight")


def mean_ci(values: list[float], n_boot: int = 1000, seed: int = 0) -> dict[str, float | int | None]:
    """Mean with a 95% percentile bootstrap interval over the items (nan items dropped)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not x.size:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1) if n_boot else np.array([x.mean()])
    return {
        "value": float(x.mean()),
        "lo": float(np.percentile(means, 2.5)),
        "hi": float(np.percentile(means, 97.5)),
        "n": int(x.size),
    }


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
        out.append(
            {
                "batch": i,
                "features": list(b.get("features", [])),
                "reasoning": sample.get("reasoning", ""),
                "weights": dict(sample.get("weights", {})),
            }
        )
    return out


def score_consistency(
    views: list[dict[str, Any]], stances: list[dict[str, Any] | None], tau: float = TAU
) -> dict[str, Any]:
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


def consistency_study(
    data,
    run: str | Path,
    out: str | Path,
    lm_handle,
    *,
    ad_ids: list[str] | None = None,
    tau: float = TAU,
    hide_titles: bool | None = None,
    config: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Label every batch's reasoning of a generate run; one record per ad in OUT/consistency/<ad>.json
    (resumable: finished ads are skipped), every LLM call in OUT/calls.jsonl. Returns the totals."""
    source = RunDir(run)
    records = source.finished()
    hide = bool((source.settings() or {}).get("hide_titles")) if hide_titles is None else hide_titles
    settings = {
        "study": "consistency",
        "run": repo_relative(run),
        "tau": tau,
        "hide_titles": hide,
        **(config or {}),
    }
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
            result = {
                "ad_id": ad_id,
                "status": "ok" if all(vd.get("ok") for vd in verdicts) else "partial",
                "batches": [{**v, "verdict": vd} for v, vd in zip(views, verdicts, strict=True)],
                **{k: scored[k] for k in (*COUNTS, "rate", "by_label", "details")},
                "seconds": round(time.time() - t0, 2),
            }
            calls = lm_calls(lm_handle.lm, since=mark)
            study.append_calls(ad_id, [{"study": "consistency", **c} for c in calls])
            study.write_record(ad_id, result, settings)
        totals = consistency_totals(out, todo_ids)
        study.write_manifest(
            {
                "study": "consistency",
                "config": settings,
                "lm": getattr(lm_handle, "description", {}),
                "versions": versions(),
                **times,
                "updated": now(),
                "totals": totals,
            }
        )
    return totals


def consistency_totals(out: str | Path, ad_ids: list[str] | None = None) -> dict[str, Any]:
    """Pooled Consistency Rate over the per-ad records of a consistency study (features pooled; the per-ad
    mean and its bootstrap interval too); only `ad_ids`' records when given (a rerun with a smaller
    --consistency-limit keeps the other records on disk but does not count them)."""
    by_id = RunDir(out, records="consistency").records()
    recs = [by_id[a] for a in ad_ids if a in by_id] if ad_ids is not None else list(by_id.values())
    tot = {k: sum(r.get(k, 0) for r in recs) for k in COUNTS}
    by_label = {
        lab: {
            "n": sum(r["by_label"][lab]["n"] for r in recs),
            "match": sum(r["by_label"][lab]["match"] for r in recs),
        }
        for lab in LABELS[:3]
    }
    for v in by_label.values():
        v["rate"] = v["match"] / v["n"] if v["n"] else None
    return {
        "ads": len(recs),
        "ads_fully_judged": sum(r["status"] == "ok" for r in recs),
        **tot,
        "rate": tot["match"] / tot["judged"] if tot["judged"] else None,
        "per_ad_rate": mean_ci([r["rate"] for r in recs if r.get("rate") is not None]),
        "by_label": by_label,
    }


# -- helpers ----------------------------------------------------------------------------------------


def short_error(exc: Exception, n: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + "..."


def _loose(s: Any) -> str:
    return "".join(ch for ch in str(s).lower() if ch.isalnum())


def _first_clause(text: str, n: int = 80) -> str:
    head = text.split(" (")[0].split("; ")[0]
    return head if len(head) <= n else head[:n].rsplit(" ", 1)[0] + "..."
