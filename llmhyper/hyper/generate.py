"""Generation: the program writes weights for every cold ad; the normaliser makes them servable.

A run folder (`runs.RunDir`) holds everything of one run and resumes where it stopped:

    OUT/config.json        the run's settings, saved with the first record (a rerun with others is refused)
    OUT/ads/<ad>.json      one record per ad (raw weights, spread, reasoning, judge, flags, neighbours,
                           normalised weights, delta, alpha, tokens, seconds), written atomically; the file
                           name is `store.safe_name(ad id)`, so no id can leave the folder
    OUT/calls.jsonl        every LLM call (messages, outputs, usage), appended per ad before its record
    OUT/weights/           the servable artifact (WeightTable, method "llm_hyper") over the finished ads
    OUT/manifest.json      model + hash, program + hash, data, git commit, times, tokens, counts
    OUT/.lock              held while a process works here: a second process is refused

The artifact and the manifest are rebuilt from the records at the start and the end of every run (and after
each ad), so a kill at any moment is repaired by the next run, which redoes no finished ad.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import numpy as np
from tqdm import tqdm

from llmhyper.ctr.prepare import Prepared, embed, prepare
from llmhyper.data import CTRData, load_dataset
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper.program import DEFAULT_PROGRAM, LLMHyper, load_program
from llmhyper.hyper.settings import GenerateSettings, data_fingerprint, judge_settings_for, run_settings
from llmhyper.hyper.views import ad_view, captions_for, demonstrations, finish_ad
from llmhyper.llm.build import LMHandle, build_lm
from llmhyper.llm.calls import lm_calls, lm_usage
from llmhyper.llm.settings import LMSettings
from llmhyper.retrieval.encoders import get_encoder
from llmhyper.runs import DONE, RunDir
from llmhyper.store import git_commit, now, remove_stale_temps, versions
from llmhyper.weights import WeightTable

METHOD = "llm_hyper"
__all__ = [
    "DEFAULT_PROGRAM",
    "METHOD",
    "GenerateSettings",
    "collect",
    "data_fingerprint",
    "generate",
    "judge_settings_for",
    "rebuild",
    "run_generate",
    "run_settings",
]


def _ignored(run: RunDir, config: dict[str, Any]) -> tuple[str, ...]:
    """Keys a resume may differ in: the program's path, and what an older run did not record yet."""
    old = run.settings() or {}
    return ("program",) + tuple(k for k in ("data_fingerprint",) if k in config and old and k not in old)


# -- the artifact from the records ------------------------------------------------------------


def collect(out: RunDir | str | Path, feature_names: list[str]) -> tuple[WeightTable, dict[str, Any]]:
    """The weight artifact and the run's totals, from the per-ad records on disk."""
    run = out if isinstance(out, RunDir) else RunDir(out)
    recs = run.records()
    ids, thetas, bs, flags = [], [], [], {}
    for ad_id, rec in recs.items():
        if rec.get("status") not in DONE:
            continue
        weights = rec.get("normalized_weights")
        missing = [f for f in feature_names if not isinstance(weights, dict) or f not in weights]
        if missing:
            raise DataError(
                f"the record has no weights for features {missing[:5]} (made for other data?)",
                file=str(run.record_path(ad_id)),
            )
        ids.append(ad_id)
        thetas.append([weights[f] for f in feature_names])
        bs.append(rec.get("delta"))
        if rec.get("flags"):
            flags[ad_id] = rec["flags"]
    d = len(feature_names)
    try:
        table = WeightTable(
            METHOD,
            ids,
            feature_names,
            np.array(thetas, dtype=np.float64).reshape(len(ids), d),
            np.array(bs, dtype=np.float64),
            flags,
            meta={"source": str(run.path)},
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"damaged run records: {exc}", file=str(run.records_dir)) from None
    rs = list(recs.values())
    calls = sum(r.get("calls", 0) for r in rs)
    failures = sum(r.get("parse_failures", 0) for r in rs)
    totals = {
        "ads_done": len(rs),
        "ads_ok": sum(r.get("status") == "ok" for r in rs),
        "ads_partial": sum(r.get("status") == "partial" for r in rs),
        "ads_failed": sum(r.get("status") == "failed" for r in rs),
        "weight_calls": calls,
        "parse_failures": failures,
        "parse_failure_rate": failures / calls if calls else None,
        "features_filled_from_prior": sum(len(r.get("filled_from_knn_prior", {})) for r in rs),
        "ads_with_judge_flags": sum(bool(r.get("flags")) for r in rs),
        "ads_judge_rejected": sum(
            bool(r.get("judge") and r["judge"][0].get("inconsistent_features")) for r in rs
        ),
        "prompt_tokens": sum(r.get("tokens", {}).get("prompt_tokens", 0) for r in rs),
        "completion_tokens": sum(r.get("tokens", {}).get("completion_tokens", 0) for r in rs),
        "seconds": round(sum(r.get("seconds", 0.0) for r in rs), 1),
    }
    return table, totals


def rebuild(run: RunDir, feature_names: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """Save the artifact and the manifest from the records (each file atomically); returns the totals.
    `info` updates the manifest's other entries (missing ones keep their last value)."""
    table, totals = collect(run, feature_names)
    if run.weights_dir.is_dir():
        remove_stale_temps(run.weights_dir)  # left by a kill during an earlier save
    table.save(run.weights_dir)
    run.write_manifest({"method": METHOD, **run.manifest(), **info, "updated": now(), "totals": totals})
    return totals


# -- the loop ---------------------------------------------------------------------------------


def generate(
    prep: Prepared,
    encoder,
    program: LLMHyper,
    lm_handle: LMHandle,
    judge_handle: LMHandle,
    ad_ids: list[str],
    out: RunDir | str | Path,
    config: dict[str, Any],
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Weights for `ad_ids` into the run folder `out`, skipping finished ads; returns the run's totals.
    The program must already hold its judge LM (`judge_handle` is what its calls are counted and logged
    from). Given a path, the folder is locked for the call; a given `RunDir` must be held by the caller."""
    if not isinstance(out, RunDir):
        with RunDir(out) as run:
            return generate(
                prep, encoder, program, lm_handle, judge_handle, ad_ids, run, config, progress, force
            )
    run = out
    run.check_settings(config, force=force, ignore=_ignored(run, config))
    data, names = prep.data, prep.data.feature_names
    done = run.finished()
    todo = list(dict.fromkeys(a for a in ad_ids if a not in done))
    info = {
        **_info(run, config, data, ad_ids, resuming=bool(todo)),
        "lm": lm_handle.description,
        "judge_lm": judge_handle.description,
        "encoder": prep.encoder_name,
        "k": prep.k,
    }
    if run.records() or not todo:  # repairs a kill after the last record or during the artifact save
        totals = rebuild(run, names, info)
    if not todo:
        return totals
    old = run.settings()
    save_forced = force and old is not None and old != config  # --force: the folder takes the new settings
    features = [f.model_dump() for f in data.features]
    needed = sorted(set(todo) | {n.ad_id for a in todo for n in prep.neighbours[a]})
    captions = captions_for(prep, encoder, needed)
    lms = [lm_handle.lm] + ([judge_handle.lm] if judge_handle.lm is not lm_handle.lm else [])
    bar = tqdm(todo, desc="generate", unit="ad", disable=not progress)
    bar.set_postfix(done=len(done), left=len(todo))
    for ad_id in bar:
        marks = [len(lm.history) for lm in lms]
        t0 = time.time()
        record = _one_ad(prep, program, lm_handle, ad_id, captions, features, names)
        record["seconds"] = round(time.time() - t0, 2)
        usage = [lm_usage(lm, since=m) for lm, m in zip(lms, marks, strict=True)]
        record["tokens"] = {
            k: sum(u.get(k, 0) for u in usage) for k in ("prompt_tokens", "completion_tokens")
        }
        record["lm"] = lm_handle.description.get("model")
        run.append_calls(ad_id, [c for lm, m in zip(lms, marks, strict=True) for c in lm_calls(lm, since=m)])
        run.write_record(ad_id, record, settings=config)
        if save_forced:
            run.save_settings(config)
            save_forced = False
        rebuild(run, names, info)
        bar.set_postfix(status=record["status"], s=record["seconds"])
    return rebuild(run, names, info)


def _one_ad(
    prep: Prepared,
    program: LLMHyper,
    lm_handle: LMHandle,
    ad_id: str,
    captions: dict[str, str],
    features: list[dict[str, str]],
    names: list[str],
) -> dict[str, Any]:
    data = prep.data
    record: dict[str, Any] = {
        "ad_id": ad_id,
        "title": data.ad_by_id[ad_id].title,
        "neighbours": [
            {
                "id": n.ad_id,
                "title": data.ad_by_id[n.ad_id].title,
                "similarity": round(float(n.similarity), 4),
            }
            for n in prep.neighbours[ad_id]
        ],
    }
    try:
        with dspy.context(lm=lm_handle.lm):
            pred = program(
                ad=ad_view(prep, ad_id, captions),
                examples=demonstrations(prep, ad_id, captions),
                features=features,
            )
        record.update(finish_ad(prep, ad_id, pred, names))
        record.update(
            {
                "spread": pred.spread,
                "n_samples_ok": pred.n_samples_ok,
                "failed_features": pred.failed_features,
                "reasoning": pred.reasoning,
                "judge": pred.judge,
                "flags": pred.flags,
                "calls": pred.calls,
                "parse_failures": pred.parse_failures,
                "batches": pred.batches,
            }
        )
    except LLMHyperError:
        raise
    except Exception as exc:  # one ad's trouble (server error, bug in a reply) must not stop the run
        record.update({"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    return record


def _info(
    run: RunDir, config: dict[str, Any], data: CTRData, ad_ids: list[str], resuming: bool
) -> dict[str, Any]:
    """The manifest's entries that do not depend on the LMs."""
    card = {k: v for k, v in data.card.items() if not k.startswith("feature_")}
    return {
        "config": config,
        "data": {"name": data.name, **card},
        "git": git_commit(),
        "versions": versions(),
        "requested_ads": len(ad_ids),
        **run.session_times(resuming),
    }


# -- the whole command ------------------------------------------------------------------------


def run_generate(
    settings: GenerateSettings,
    *,
    lm_builder: Callable[[LMSettings], LMHandle] = build_lm,
    progress: bool = True,
) -> dict[str, Any]:
    """`llmhyper generate`: check everything that can be checked first (settings, then the program file,
    then the folder's lock and settings, before the data are loaded), generate the missing ads, and raise
    a one-line error when no requested ad got weights. `lm_builder` builds each LM (tests script one)."""
    settings.validate()
    program_path = settings.program_path()
    load_program(program_path, settings.program_config())  # a broken --program fails before any work
    with RunDir(settings.out) as run:
        early = run_settings(settings)
        run.check_settings(early, force=settings.force, ignore=("program", "data_fingerprint"))
        data = load_dataset(settings.data)
        config = run_settings(settings, data)
        run.check_settings(config, force=settings.force, ignore=_ignored(run, config))
        ad_ids = _select_ads(settings, data)
        todo = [a for a in ad_ids if a not in run.finished()]
        if not todo:  # nothing to generate: only make sure the artifact and manifest match the records
            info = {
                "lm": settings.lm.record(),
                "judge_lm": settings.judge_settings.record(),
                "encoder": settings.encoder,
                "k": settings.k,
            }
            info = {**info, **run.manifest(), **_info(run, config, data, ad_ids, resuming=False)}
            totals = rebuild(run, data.feature_names, info)
        else:
            totals = _generate_missing(
                settings, run, data, ad_ids, config, program_path, lm_builder, progress
            )
        finished = run.finished()
        if not any(a in finished for a in ad_ids):
            raise LLMHyperError(_none_succeeded(run, ad_ids))
    return totals


def _select_ads(settings: GenerateSettings, data: CTRData) -> list[str]:
    ad_ids = list(dict.fromkeys(a.strip() for a in settings.ads)) if settings.ads else list(data.cold_ads)
    unknown = [a for a in ad_ids if a not in data.ad_index]
    if unknown:
        raise LLMHyperError(f"unknown ad ids: {unknown[:5]}")
    if not ad_ids:
        raise LLMHyperError(f"the data set {data.name} has no cold ads to write weights for")
    return ad_ids[: settings.limit] if settings.limit else ad_ids


def _generate_missing(
    settings: GenerateSettings,
    run: RunDir,
    data: CTRData,
    ad_ids: list[str],
    config: dict[str, Any],
    program_path: Path | None,
    lm_builder: Callable[[LMSettings], LMHandle],
    progress: bool,
) -> dict[str, Any]:
    encoder = get_encoder(settings.encoder)
    prep = prepare(data, encoder=encoder, k=settings.k, seed=settings.data.seed, progress=progress)
    extra = [a for a in ad_ids if a not in prep.neighbours]
    if extra:  # ads outside the cold set (e.g. retired ads treated as cold) need neighbours and alpha
        prep.vectors.update(zip(extra, embed(data, extra, encoder), strict=True))
        prep.neighbours.update(prep.neighbours_of(extra))
        prep.alphas.update({a: prep.alpha_for(prep.neighbours[a]) for a in extra})
    handle = lm_builder(settings.lm)
    judge = handle
    try:
        if settings.judge_lm is not None and settings.judge_lm != settings.lm:
            judge = lm_builder(settings.judge_lm)
        program = load_program(
            program_path, settings.program_config(), judge_lm=judge.lm if judge is not handle else None
        )
        return generate(
            prep,
            encoder,
            program,
            handle,
            judge,
            ad_ids,
            run,
            config,
            progress=progress,
            force=settings.force,
        )
    finally:
        handle.close()
        if judge is not handle:
            judge.close()


def _none_succeeded(run: RunDir, ad_ids: list[str]) -> str:
    recs = run.records()
    reasons = [
        recs[a].get("reason") or next(iter((recs[a].get("failed_features") or {}).values()), None)
        for a in ad_ids
        if a in recs
    ]
    first = " ".join(str(next((r for r in reasons if r), "no reason recorded")).split())[:200]
    return (
        f"none of the {len(ad_ids)} ads got weights (first failure: {first}); the records in "
        f"{run.records_dir} say why for each ad"
    )
