"""Counterfactual robustness (paper appendix E, eq. 6-7, figure 7): rewrite an ad so that it appeals more,
less or neutrally to the users high on a target feature, generate its weights again with the same program and
the same neighbours, and check that the target feature's weight moved the right way:

    enhanced     w' > w          (the target weight goes up)
    diminished   w' < w          (it goes down)
    neutralised  |w'| < |w|      (it moves toward 0; a w already within `eps` of 0 must stay there)

Direction accuracy per type is the share of items that moved the right way. w is the target's raw weight the
program writes for the ORIGINAL ad and w' the one for the rewrite, both produced in this study with the same
program, LM, neighbours and feature batch, so nothing but the ad text differs. The image caption is kept
(only the title and description are rewritten).

The study folder is a `runs.RunDir` (resumable: finished items are skipped, rewrites are reused):

    OUT/config.json                          settings (a rerun with other settings is refused)
    OUT/rewrites/<ad>__<feature>__<type>.json  the rewrite (original and new title/description)
    OUT/items/<ad>__<feature>__<type>.json     weights before/after (type "original" holds w), verdict
    OUT/calls.jsonl                          every LLM call
    OUT/manifest.json                        LMs, versions, times
    OUT/robustness.json, OUT/robustness.md   direction accuracy per type
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dspy
from tqdm import tqdm

from llmhyper.fmt import ci_cell, md_table
from llmhyper.hyper.views import ad_view, captions_for, demonstrations
from llmhyper.llm.calls import lm_calls
from llmhyper.runs import RunDir
from llmhyper.store import now, remove_stale_temps, versions, write_json_atomic, write_text_atomic
from llmhyper.trust.explain import mean_ci, short_error, target_features
from llmhyper.trust.signatures import RewriteAd

TYPES = ("enhanced", "diminished", "neutralised")
CHANGES = {
    "enhanced": "enhanced: make the ad appeal MORE to users who score high on the target feature",
    "diminished": "diminished: make the ad appeal LESS to users who score high on the target feature",
    "neutralised": "neutralised: make the ad neither attract nor repel users who score high on the target "
    "feature (remove every cue aimed at them or against them)",
}
EPS = 1e-9
ITEMS, REWRITES = "items", "rewrites"


def item_id(ad_id: str, feature: str, kind: str) -> str:
    return f"{ad_id}__{feature}__{kind}"


def item_key(rec: dict[str, Any]) -> str:
    """The id of an item or rewrite record: one ad x target feature x type."""
    return item_id(rec["ad_id"], rec["feature"], rec["type"])


# -- direction accuracy -----------------------------------------------------------------------------


def direction_correct(kind: str, before: float, after: float, eps: float = EPS) -> bool:
    """Eq. 6-7: did the target weight move the way the rewrite asked?"""
    if kind == "enhanced":
        return after > before + eps
    if kind == "diminished":
        return after < before - eps
    if kind == "neutralised":
        if abs(before) <= eps:
            return abs(after) <= eps
        return abs(after) < abs(before) - eps
    raise ValueError(f"unknown counterfactual type {kind!r} (use {', '.join(TYPES)})")


def direction_accuracy(
    items: list[dict[str, Any]], eps: float = EPS, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per type (and overall): items, correct, accuracy with a bootstrap interval over items, mean change of
    the target weight. `items`: dicts with `type`, `before`, `after` (items lacking either are counted as
    failed, not scored)."""
    out: dict[str, Any] = {}
    for kind in list(TYPES) + ["overall"]:
        sel = [it for it in items if kind == "overall" or it["type"] == kind]
        scored = [it for it in sel if it.get("before") is not None and it.get("after") is not None]
        before = [float(it["before"]) for it in scored]
        after = [float(it["after"]) for it in scored]
        ok = [float(direction_correct(it["type"], b, a, eps)) for it, b, a in zip(scored, before, after)]
        ci = mean_ci(ok, n_boot, seed)
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        out[kind] = {
            "n": len(scored),
            "failed": len(sel) - len(scored),
            "correct": int(sum(ok)),
            # why a move failed: the weight did not move at all, or the rewrite left the description as it was
            "weight_unchanged": sum(abs(a - b) <= eps for b, a in zip(before, after)),
            "text_unchanged": sum(bool(it.get("text_unchanged")) for it in scored),
            "accuracy": ci["value"],
            "lo": ci["lo"],
            "hi": ci["hi"],
            "mean_change": mean([a - b for b, a in zip(before, after)]),
            "mean_abs_before": mean([abs(b) for b in before]),
            "mean_abs_after": mean([abs(a) for a in after]),
        }
    return out


# -- the rewrite ------------------------------------------------------------------------------------


class Rewriter:
    """One LLM call: the ad rewritten for a target feature and a change type."""

    def __init__(self):
        self.predict = dspy.Predict(RewriteAd)

    def __call__(self, ad: dict[str, Any], feature: dict[str, str], kind: str) -> dict[str, Any]:
        ad_txt = f"Title: {ad['title']}\nDescription: {ad.get('text') or ''}"
        target = f"{feature['name']}: {feature['description']}"
        try:
            adapter = dspy.settings.adapter or dspy.ChatAdapter(use_json_adapter_fallback=False)
            with dspy.context(adapter=adapter):
                pred = self.predict(ad=ad_txt, target=target, change=CHANGES[kind])
        except dspy.utils.exceptions.AdapterParseError as exc:
            return {"ok": False, "reason": f"AdapterParseError: {short_error(exc)}"}
        title, text = str(pred.rewritten_title or "").strip(), str(pred.rewritten_text or "").strip()
        if not text and not title:
            return {"ok": False, "reason": "empty rewrite"}
        return {"ok": True, "title": title or ad["title"], "text": text or (ad.get("text") or "")}


def choose_targets(data, ad_id: str, per_ad: int = 1) -> list[str]:
    """The ad's first `per_ad` ground-truth features (MovieLens: share_<first genre>, then like_<first
    genre>, ...; synthetic: interest_<main topic>, ...)."""
    return target_features(data.ad_by_id[ad_id], data.feature_names)[:per_ad]


def features_for(program, features: list[dict[str, str]], target: str, scope: str) -> list[dict[str, str]]:
    """ "all": every feature (the full program per item); "batch": only the program's batch that holds the
    target (the same batch, in the same order, as in a full run: the prompt differs only in the ad)."""
    if scope == "all":
        return features
    if scope != "batch":
        raise ValueError(f"scope must be 'batch' or 'all', not {scope!r}")
    return next(b for b in program.batches(features) if any(f["name"] == target for f in b))


# -- the study --------------------------------------------------------------------------------------


class _ItemFailed(Exception):
    pass


def robustness_study(
    prep,
    encoder,
    program,
    lm_handle,
    rewrite_handle,
    ad_ids: list[str],
    out: str | Path,
    config: dict[str, Any],
    *,
    targets_per_ad: int = 1,
    types: tuple[str, ...] = TYPES,
    scope: str = "batch",
    eps: float = EPS,
    force: bool = False,
    n_boot: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the counterfactual study on `ad_ids`; returns the summary (also written to OUT)."""
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise ValueError(f"unknown counterfactual types {bad} (use {', '.join(TYPES)})")
    settings = {
        "study": "robustness",
        **config,
        "targets_per_ad": targets_per_ad,
        "types": list(types),
        "scope": scope,
        "eps": eps,
    }
    data = prep.data
    features = [f.model_dump() for f in data.features]
    specs = {f["name"]: f for f in features}
    plan = [(a, t) for a in ad_ids for t in choose_targets(data, a, targets_per_ad)]
    skipped = [a for a in ad_ids if not choose_targets(data, a, targets_per_ad)]
    lms = [lm_handle.lm] + ([rewrite_handle.lm] if rewrite_handle.lm is not lm_handle.lm else [])

    def weigh(view, feats, captions) -> dict[str, Any]:
        with dspy.context(lm=lm_handle.lm):
            pred = program(ad=view, examples=demonstrations(prep, view["id"], captions), features=feats)
        return {
            "raw_weights": dict(pred.weights),
            "failed_features": dict(pred.failed_features),
            "reasoning": list(pred.reasoning),
            "judge": pred.judge,
            "calls": pred.calls,
            "parse_failures": pred.parse_failures,
        }

    with RunDir(out, records=ITEMS) as study:
        # the program is identified by its hash (its path may differ between checkouts); a study made before
        # runs recorded the data's fingerprint is not refused for lacking it
        old = study.settings() or {}
        new_keys = tuple(k for k in ("data_fingerprint",) if old and k not in old)
        study.check_settings(settings, force=force, ignore=("program", *new_keys))
        rewrites = RunDir(out, records=REWRITES)  # a second record folder of the same (locked) run
        if rewrites.records_dir.exists():
            remove_stale_temps(rewrites.records_dir)
        done = study.finished(("ok",), key=item_key)
        times = study.session_times(resuming=bool(done))
        needed = sorted(set(ad_ids) | {n.ad_id for a in ad_ids for n in prep.neighbours[a]})
        captions = captions_for(prep, encoder, needed)
        rewriter = Rewriter()
        bar = tqdm(plan, desc="robustness", unit="ad-feature", disable=not progress)
        for ad_id, target in bar:
            base = ad_view(prep, ad_id, captions)
            feats = features_for(program, features, target, scope)
            for kind in ("original",) + tuple(types):
                iid = item_id(ad_id, target, kind)
                if iid in done:
                    continue
                marks = [len(lm.history) for lm in lms]
                t0 = time.time()
                item: dict[str, Any] = {
                    "ad_id": ad_id,
                    "feature": target,
                    "type": kind,
                    "scope": scope,
                    "features": [f["name"] for f in feats],
                }
                try:
                    view = base
                    if kind != "original":
                        rw = rewrites.read_record(iid)
                        if not rw or not rw.get("ok"):
                            with dspy.context(lm=rewrite_handle.lm):
                                rw = {
                                    "ad_id": ad_id,
                                    "feature": target,
                                    "type": kind,
                                    "original": {"title": base["title"], "text": base["text"]},
                                    **rewriter(base, specs[target], kind),
                                }
                            rewrites.write_record(iid, rw)
                        item["rewrite"] = {k: rw.get(k) for k in ("ok", "title", "text", "reason")}
                        if not rw.get("ok"):
                            raise _ItemFailed(f"rewrite failed: {rw.get('reason')}")
                        view = {**base, "title": rw["title"], "text": rw["text"]}
                    got = weigh(view, feats, captions)
                    item.update(got)
                    item["weight"] = got["raw_weights"].get(target)
                    item["status"] = "ok" if item["weight"] is not None else "failed"
                    if item["weight"] is None:
                        why = got["failed_features"].get(target, "missing")
                        item["reason"] = f"no weight for {target}: {why}"
                except _ItemFailed as exc:
                    item.update({"status": "failed", "reason": str(exc)})
                except Exception as exc:  # one item's trouble must not stop the study
                    item.update({"status": "failed", "reason": f"{type(exc).__name__}: {short_error(exc)}"})
                item["seconds"] = round(time.time() - t0, 2)
                calls = [c for lm, m in zip(lms, marks, strict=True) for c in lm_calls(lm, since=m)]
                study.append_calls(
                    ad_id, [{"study": "robustness", "feature": target, "type": kind, **c} for c in calls]
                )
                study.write_record(iid, item, settings)
                bar.set_postfix(ad=ad_id, type=kind, status=item["status"])
        summary = robustness_summary(out, eps=eps, n_boot=n_boot)
        summary.update({"started": times["started"], "config": config, "ads_without_target": skipped})
        write_json_atomic(Path(out) / "robustness.json", summary)
        write_text_atomic(Path(out) / "robustness.md", robustness_markdown(summary) + "\n")
        lm_desc = {"lm": lm_handle.description, "rewrite_lm": rewrite_handle.description}
        study.write_manifest(
            {
                "study": "robustness",
                "config": settings,
                **lm_desc,
                "versions": versions(),
                **times,
                "updated": now(),
                "totals": summary["accuracy"]["overall"],
            }
        )
    return summary


def load_pairs(out: str | Path) -> list[dict[str, Any]]:
    """(before, after) per counterfactual item of a study folder: before = the original's target weight."""
    items = list(RunDir(out, records=ITEMS).records(key=item_key).values())
    rewrites = RunDir(out, records=REWRITES)
    originals = {(it["ad_id"], it["feature"]): it for it in items if it["type"] == "original"}
    pairs = []
    for it in items:
        if it["type"] == "original":
            continue
        orig = originals.get((it["ad_id"], it["feature"]))
        before = orig.get("weight") if orig and orig.get("status") == "ok" else None
        after = it.get("weight") if it.get("status") == "ok" else None
        rw = rewrites.read_record(item_key(it)) or {}
        correct = direction_correct(it["type"], before, after) if None not in (before, after) else None
        pairs.append(
            {
                "ad_id": it["ad_id"],
                "feature": it["feature"],
                "type": it["type"],
                "before": before,
                "after": after,
                "rewrite": it.get("rewrite"),
                "text_unchanged": text_unchanged(rw),
                "correct": correct,
                "reason": it.get("reason") or (orig or {}).get("reason"),
            }
        )
    return pairs


def text_unchanged(rewrite: dict[str, Any]) -> bool | None:
    """Did the rewriter hand back the original description (a title edit alone does not change the ad's
    content)? None when the rewrite or its original is missing."""
    if not rewrite.get("ok") or not rewrite.get("original"):
        return None
    norm = lambda t: " ".join(str(t or "").split()).lower()  # noqa: E731
    return norm(rewrite.get("text")) == norm(rewrite["original"].get("text"))


def robustness_summary(out: str | Path, eps: float = EPS, n_boot: int = 1000) -> dict[str, Any]:
    pairs = load_pairs(out)
    for p in pairs:
        if p["before"] is not None and p["after"] is not None:
            p["correct"] = direction_correct(p["type"], p["before"], p["after"], eps)
    return {
        "study": "robustness",
        "updated": now(),
        "eps": eps,
        "items": len(pairs),
        "ads": len({p["ad_id"] for p in pairs}),
        "accuracy": direction_accuracy(pairs, eps, n_boot),
        "pairs": pairs,
    }


EXPECT = {"enhanced": "w' > w", "diminished": "w' < w", "neutralised": "|w'| < |w|", "overall": ""}


def robustness_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = [
        "type",
        "expected move",
        "items",
        "correct",
        "direction accuracy",
        "mean Δw",
        "mean |w| before → after",
        "w unchanged",
        "description unchanged",
        "failed",
    ]
    rows = []
    for kind, r in summary["accuracy"].items():
        acc = ci_cell({"value": r["accuracy"], "lo": r["lo"], "hi": r["hi"]})
        move = "—" if r["mean_change"] is None else f"{r['mean_change']:+.3f}"
        ab = (
            "—" if r["mean_abs_before"] is None else f"{r['mean_abs_before']:.3f} → {r['mean_abs_after']:.3f}"
        )
        same = [str(r.get(k, "—")) for k in ("weight_unchanged", "text_unchanged")]
        rows.append(
            [
                kind,
                EXPECT.get(kind, ""),
                str(r["n"]),
                str(r["correct"]),
                acc,
                move,
                ab,
                *same,
                str(r["failed"]),
            ]
        )
    return head, rows


def example_rows(summary: dict[str, Any], n: int, split: bool = False) -> tuple[list[str], list[list[str]]]:
    """The first `n` items with a rewrite: the rewritten ad (title and description in one cell, or in two
    with `split`), the weight move and whether it went the right way."""
    shown = [p for p in summary.get("pairs", []) if (p.get("rewrite") or {}).get("ok")][:n]
    ad_head = ["rewritten title", "rewritten description"] if split else ["rewritten ad"]
    head = ["ad", "feature", "type", *ad_head, "w → w'", "right way"]
    right = {True: "yes", False: "no", None: "—"}
    rows = []
    for p in shown:
        rw = p["rewrite"]
        ad = [rw["title"], rw["text"]] if split else [f"{rw['title']}: {rw['text']}"]
        rows.append([p["ad_id"], p["feature"], p["type"], *ad, pair_cell(p), right[p.get("correct")]])
    return head, rows


def robustness_markdown(summary: dict[str, Any], examples: int = 3) -> str:
    lines = [
        md_table(*robustness_rows(summary)),
        "",
        f"{summary['items']} counterfactual items on {summary['ads']} ads; w = the target feature's raw "
        "weight for the original ad, w' = for the rewrite (same program, LM, neighbours and feature "
        "batch); 95% bootstrap intervals over items; w unchanged = |w' - w| <= eps; description "
        "unchanged = the rewriter returned the original description (only the title may differ); "
        "failed = no rewrite or no weight (not scored).",
    ]
    head, rows = example_rows(summary, examples)
    if rows:
        lines += ["", "Examples of rewrites (all are in rewrites/):", "", md_table(head, rows)]
    return "\n".join(lines)


def pair_cell(p: dict[str, Any]) -> str:
    f = lambda x: "—" if x is None else f"{x:+.3f}"  # noqa: E731
    return f"{f(p.get('before'))} → {f(p.get('after'))}"
