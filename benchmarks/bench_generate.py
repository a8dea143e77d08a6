"""Generation cost of a `llmhyper generate` run directory: seconds and tokens per ad, failures, judge flags,
and the prompt-prefix cache effect. Reads the run only (safe on a run that is still being written).

    nice -n 19 .venv/bin/python benchmarks/bench_generate.py --run results/ml100k-embedded-zero-shot

Per ad (OUT/ads/*.json): wall seconds, prompt/completion tokens (mean, median, p90), status, weight-call
parse failures (`parse_failures` / `calls`), judge flags (ads with improper-feature flags) and judge
rejections (ads whose first judge round named inconsistent features).

Per call (OUT/calls.jsonl): share of prompt tokens served from the server's prefix cache
(`usage.prompt_tokens_details.cached_tokens`), and seconds per call for calls with a high (>= 50%) vs low
cache share. A call's seconds are the gap to the previous call's timestamp (DSPy stamps a call when it
returns); the first call of an ad is timed from the ad's start, estimated as its last call's timestamp
minus the ad's recorded seconds. A least-squares fit seconds ~ a + b * uncached prompt tokens
+ c * completion tokens separates prefill from decoding cost; b * cached tokens estimates the time the
cache saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from _common import pct, update_section


def stats(values) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan")}
    return {"mean": float(v.mean()), "median": pct(v, 50), "p90": pct(v, 90)}


def read_ads(run: Path) -> list[dict]:
    recs = []
    for p in sorted((run / "ads").glob("*.json")):
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, ValueError):  # being replaced right now
            continue
    return recs


def read_calls(run: Path) -> list[dict]:
    calls = []
    path = run / "calls.jsonl"
    if not path.exists():
        return calls
    with open(path) as fh:
        for line in fh:
            try:
                c = json.loads(line)
            except ValueError:  # a line still being written
                continue
            u = c.get("usage") or {}
            details = u.get("prompt_tokens_details") or {}
            calls.append({"ad_id": str(c.get("ad_id")), "ts": datetime.fromisoformat(c["timestamp"]),
                          "prompt": int(u.get("prompt_tokens") or 0), "completion": int(u.get("completion_tokens") or 0),
                          "cached": int(details.get("cached_tokens") or 0)})
    return calls


def call_seconds(calls: list[dict], ads: dict[str, dict]) -> list[dict]:
    by_ad = defaultdict(list)
    for c in calls:
        by_ad[c["ad_id"]].append(c)
    out = []
    for ad, cs in by_ad.items():
        cs.sort(key=lambda c: c["ts"])
        rec = ads.get(ad)
        start = None
        if rec is not None and rec.get("seconds"):
            start = cs[-1]["ts"].timestamp() - float(rec["seconds"])
        prev = start
        for c in cs:
            t = c["ts"].timestamp()
            if prev is not None and t >= prev:
                out.append({**c, "seconds": t - prev})
            prev = t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a generate run directory (OUT)")
    ap.add_argument("--label", help="row label (default: the run folder's name)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, help="LM threads of the run, when its folder does not record them")
    args = ap.parse_args(argv)
    run = Path(args.run)
    label = args.label or run.name
    recs = read_ads(run)
    if not recs:
        print(f"no finished ads in {run}/ads yet", file=sys.stderr)
        return 1
    ads = {str(r["ad_id"]): r for r in recs}
    calls = read_calls(run)
    # a generate run has manifest.json; an edit run (or an edit compile's OUT.gate/shots-N) has config.json
    meta_file = next((run / n for n in ("manifest.json", "config.json") if (run / n).exists()), None)
    manifest = json.loads(meta_file.read_text()) if meta_file else {}
    lm = manifest.get("lm", {})
    threads = lm.get("n_threads") or args.threads
    lm_desc = f"{lm.get('model') or lm.get('spec', '?')}, {threads or '?'} thread(s)" if lm else "?"

    # an ad answered wholly from the LM cache took no LM time: keep it out of the timing
    def from_cache(r: dict) -> bool:
        attempts = r.get("attempts") or []
        return bool(attempts) and all(a.get("cached") for a in attempts)

    n_cached = sum(from_cache(r) for r in recs)
    secs = [float(r.get("seconds", 0.0)) for r in recs if not from_cache(r)]
    ptok = [r.get("tokens", {}).get("prompt_tokens", 0) for r in recs]
    ctok = [r.get("tokens", {}).get("completion_tokens", 0) for r in recs]
    weight_calls = sum(r.get("calls", 0) for r in recs)
    failures = sum(r.get("parse_failures", 0) for r in recs)
    status = defaultdict(int)
    for r in recs:
        status[r.get("status", "?")] += 1
    flagged = sum(bool(r.get("flags")) for r in recs)
    rejected = sum(bool(r.get("judge") and r["judge"][0].get("inconsistent_features")) for r in recs)
    s, pt, ct = stats(secs), stats(ptok), stats(ctok)
    ad_row = {
        "case": label, "LM": lm_desc,
        "ads (ok/partial/failed)": f"{len(recs)} ({status['ok']}/{status['partial']}/{status['failed']})"
        + (f", {n_cached} from cache (not timed)" if n_cached else ""),
        "s/ad mean": s["mean"], "s/ad median": s["median"], "s/ad p90": s["p90"],
        "prompt tok/ad mean / median / p90": f"{pt['mean']:.0f} / {pt['median']:.0f} / {pt['p90']:.0f}",
        "completion tok/ad mean / median / p90": f"{ct['mean']:.0f} / {ct['median']:.0f} / {ct['p90']:.0f}",
        "parse failures / weight call": f"{failures}/{weight_calls} = {failures / weight_calls:.1%}"
        if weight_calls else "n/a",
        "ads with judge flags": f"{flagged}/{len(recs)} = {flagged / len(recs):.1%}",
        "ads judge-rejected": f"{rejected}/{len(recs)} = {rejected / len(recs):.1%}",
    }
    print(json.dumps(ad_row, indent=1, default=str))

    timed = call_seconds(calls, ads)
    total_prompt = sum(c["prompt"] for c in calls)
    total_cached = sum(c["cached"] for c in calls)
    share = total_cached / total_prompt if total_prompt else float("nan")
    hi = [c for c in timed if c["prompt"] and c["cached"] / c["prompt"] >= 0.5]
    lo = [c for c in timed if c["prompt"] and c["cached"] / c["prompt"] < 0.5]

    def group(cs):
        if not cs:
            return "n/a"
        sec = pct([c["seconds"] for c in cs], 50)
        comp = pct([c["completion"] for c in cs], 50)
        per = pct([c["seconds"] / max(c["completion"], 1) for c in cs], 50)
        return f"{len(cs)} calls: {sec:.1f} s/call, {comp:.0f} completion tok, {1000 * per:.0f} ms/completion tok"

    fit = "n/a (fewer than 8 timed calls)"
    saved = float("nan")
    if len(timed) >= 8:
        A = np.array([[1.0, c["prompt"] - c["cached"], c["completion"]] for c in timed])
        y = np.array([c["seconds"] for c in timed])
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        saved = coef[1] * total_cached
        total_time = float(y.sum())
        fit = (f"{coef[0]:.2f} s + {1000 * coef[1]:.1f} ms/uncached prompt tok + {1000 * coef[2]:.0f} ms/completion tok"
               f" (n={len(timed)}{', rough' if len(timed) < 30 else ''}); cache saved ~{saved:.0f} s of {total_time:.0f} s timed")
    cache_row = {"case": label, "calls": len(calls),
                 "prompt tok cached": f"{total_cached}/{total_prompt} = {share:.1%}" if total_prompt else "n/a",
                 "high cache (>=50%)": group(hi), "low cache (<50%)": group(lo), "fit": fit}
    print(json.dumps(cache_row, indent=1, default=str))
    if not args.no_write:
        update_section(
            "generate", "Generation cost per ad (from a generate run directory)",
            "From `OUT/ads/*.json` of a run (a run still being written is read as it stands; rerun to update). "
            "Seconds are wall time per ad, including the judge, under whatever else shared the CPU during that run "
            "(the LM column gives the LLM's thread count). Parse failures: weight-writing calls whose reply could "
            "not be parsed (retried or filled from the k-NN prior). Judge flags: ads with at least one "
            "improper-feature flag (the scorer drops them for users strong in that feature).",
            ["LM", "ads (ok/partial/failed)", "s/ad mean", "s/ad median", "s/ad p90",
             "prompt tok/ad mean / median / p90", "completion tok/ad mean / median / p90",
             "parse failures / weight call", "ads with judge flags", "ads judge-rejected"], [ad_row])
        update_section(
            "generate-cache", "Prompt-prefix cache effect (from calls.jsonl)",
            "Share of prompt tokens the LLM server served from its prefix cache, and per-call seconds for calls "
            "with a high vs low cached share (median). Per-call seconds are gaps between DSPy's call-return "
            "timestamps (an ad's first call: from the ad's estimated start), so they include the little "
            "Python work between calls. Completion length differs between the groups, hence ms per "
            "completion token and the least-squares fit.",
            ["calls", "prompt tok cached", "high cache (>=50%)", "low cache (<50%)", "fit"], [cache_row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
