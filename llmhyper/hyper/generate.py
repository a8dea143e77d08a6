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
each ad, or after each batch of ads that finished together), so a kill at any moment is repaired by the
next run, which redoes no finished ad.

Many ads in flight (`workers`, `--workers N`): threads run the per-ad LM work (`workers.ask`) and this
thread alone writes the folder, so a run with N workers writes exactly what a run with one writes. With
`--ray` the same per-ad work runs in Ray actors (`ray_generate`) and the driver writes the same folder.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmhyper.ctr.prepare import Prepared, embed, prepare
from llmhyper.data import CTRData, load_dataset
from llmhyper.data.scaling import stamp_scaling
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper.program import DEFAULT_PROGRAM, LLMHyper, load_program
from llmhyper.hyper.ray_generate import RayAds, RayWork, import_ray
from llmhyper.hyper.settings import GenerateSettings, data_fingerprint, judge_settings_for, run_settings
from llmhyper.hyper.views import captions_for
from llmhyper.hyper.workers import AdJob, AdRetry, Asked, Lane, ad_job, ask, finish, run_local
from llmhyper.llm.build import LMHandle, build_lm
from llmhyper.llm.progress import LMProgress
from llmhyper.llm.settings import LMSettings
from llmhyper.retrieval.encoders import get_encoder
from llmhyper.runs import DONE, RunDir
from llmhyper.store import git_commit, now, remove_stale_temps, versions
from llmhyper.weights import WeightTable

METHOD = "llm_hyper"
REBUILD_EVERY_S = 30.0  # the longest the artifact lags its records while answers pile up
__all__ = [
    "DEFAULT_PROGRAM",
    "METHOD",
    "GenerateSettings",
    "collect",
    "data_fingerprint",
    "generate",
    "judge_settings_for",
    "rebuild",
    "run_ads",
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
    return _collect(run, run.records(), feature_names)


def _collect(
    run: RunDir, recs: dict[str, dict[str, Any]], feature_names: list[str]
) -> tuple[WeightTable, dict[str, Any]]:
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
        "ad_retries": sum(len(r.get("retries") or ()) for r in rs),
        "prompt_tokens": sum(r.get("tokens", {}).get("prompt_tokens", 0) for r in rs),
        "completion_tokens": sum(r.get("tokens", {}).get("completion_tokens", 0) for r in rs),
        "seconds": round(sum(r.get("seconds", 0.0) for r in rs), 1),
    }
    return table, totals


def rebuild(
    run: RunDir,
    feature_names: list[str],
    info: dict[str, Any],
    records: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Save the artifact and the manifest from the records (each file atomically); returns the totals.
    `info` updates the manifest's other entries (missing ones keep their last value). `records`: the
    run's records as the caller holds them (default: read from disk)."""
    table, totals = _collect(run, run.records() if records is None else records, feature_names)
    if run.weights_dir.is_dir():
        remove_stale_temps(run.weights_dir)  # left by a kill during an earlier save
    stamp_scaling(table, info.get("feature_scaling")).save(run.weights_dir)  # raw features can be served
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
    *,
    workers: int = 1,
    lanes: list[Lane] | None = None,
    retry: AdRetry | None = None,
) -> dict[str, Any]:
    """Weights for `ad_ids` into the run folder `out`, skipping finished ads; returns the run's totals.
    The program must already hold its judge LM (`judge_handle` is what its calls are counted and logged
    from). Given a path, the folder is locked for the call; a given `RunDir` must be held by the caller.
    `workers` ads are in flight at once (threads); worker i calls the LMs of `lanes[i % len(lanes)]`
    (default: the two handles given), each ad through its own copies of them (see `workers.ask`)."""
    if not isinstance(out, RunDir):
        with RunDir(out) as run:
            return generate(
                prep,
                encoder,
                program,
                lm_handle,
                judge_handle,
                ad_ids,
                run,
                config,
                progress,
                force,
                workers=workers,
                lanes=lanes,
                retry=retry,
            )
    lanes = lanes or [Lane(lm_handle, judge_handle)]
    retry = retry or AdRetry()

    def answers(jobs: list[AdJob]) -> Iterator[tuple[AdJob, Asked, bool]]:
        return run_local(jobs, lambda job, i: ask(program, lanes[i % len(lanes)], job, retry), workers)

    return run_ads(
        prep,
        encoder,
        ad_ids,
        out,
        config,
        answers,
        lm_handle.description,
        judge_handle.description,
        progress=progress,
        force=force,
    )


def run_ads(
    prep: Prepared,
    encoder,
    ad_ids: list[str],
    run: RunDir,
    config: dict[str, Any],
    answers: Callable[[list[AdJob]], Iterator[tuple[AdJob, Asked, bool]]],
    lm_description: dict[str, Any],
    judge_description: dict[str, Any],
    *,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """The loop of `generate` over any source of answers (local threads, Ray actors): this thread alone
    writes the run folder, one finished ad at a time: its calls, then its record, then the artifact. The
    artifact waits while more answers are waiting (`more`, for at most REBUILD_EVERY_S), so a writer that
    falls behind many workers rebuilds it once per batch of records instead of once per ad (the records
    are the checkpoint: a kill before the rebuild is repaired at the next start)."""
    run.check_settings(config, force=force, ignore=_ignored(run, config))
    data, names = prep.data, prep.data.feature_names
    done = run.finished()
    todo = list(dict.fromkeys(a for a in ad_ids if a not in done))
    info = {
        **_info(run, config, data, ad_ids, resuming=bool(todo)),
        "lm": lm_description,
        "judge_lm": judge_description,
        "encoder": prep.encoder_name,
        "k": prep.k,
    }
    records = run.records()
    if records or not todo:  # repairs a kill after the last record or during the artifact save
        totals = rebuild(run, names, info, records)
    if not todo:
        return totals
    old = run.settings()
    save_forced = force and old is not None and old != config  # --force: the folder takes the new settings
    features = [f.model_dump() for f in data.features]
    needed = sorted(set(todo) | {n.ad_id for a in todo for n in prep.neighbours[a]})
    captions = captions_for(prep, encoder, needed)
    jobs = [ad_job(prep, a, captions, features) for a in todo]
    bar = tqdm(total=len(todo), desc="generate", unit="ad", disable=not progress)
    bar.set_postfix(done=len(done), left=len(todo))
    stream, rebuilt = answers(jobs), time.monotonic()
    try:
        for job, asked, more in stream:
            record = finish(prep, job.ad_id, asked, names)
            run.append_calls(job.ad_id, asked.calls)
            run.write_record(job.ad_id, record, settings=config)
            records[job.ad_id] = record
            if save_forced:
                run.save_settings(config)
                save_forced = False
            if not more or time.monotonic() - rebuilt > REBUILD_EVERY_S:
                rebuild(run, names, info, records)
                rebuilt = time.monotonic()
            bar.update()
            bar.set_postfix(status=record["status"], s=record["seconds"])
    finally:
        close = getattr(stream, "close", None)
        if close is not None:  # a generator: its workers stop taking ads when the loop ends early
            close()
        bar.close()
    return rebuild(run, names, info, records)


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
        "feature_scaling": data.scaling,  # stamped into the artifact by `rebuild`
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
    if settings.ray:
        import_ray()  # a missing extra fails before any work
    program_path = settings.program_path()
    program = load_program(program_path, settings.program_config())  # a broken --program fails first
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
            totals = _generate_missing(settings, run, data, ad_ids, config, program, lm_builder, progress)
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
    program: LLMHyper,
    lm_builder: Callable[[LMSettings], LMHandle],
    progress: bool,
) -> dict[str, Any]:
    """`program`: the program file loaded without LMs (its state is what Ray actors get)."""
    encoder = get_encoder(settings.encoder)
    prep = prepare(data, encoder=encoder, k=settings.k, seed=settings.data.seed, progress=progress)
    extra = [a for a in ad_ids if a not in prep.neighbours]
    if extra:  # ads outside the cold set (e.g. retired ads treated as cold) need neighbours and alpha
        prep.vectors.update(zip(extra, embed(data, extra, encoder), strict=True))
        prep.neighbours.update(prep.neighbours_of(extra))
        prep.alphas.update({a: prep.alpha_for(prep.neighbours[a]) for a in extra})
    retry = AdRetry(times=settings.ad_retries, wait=settings.retry_wait)
    if settings.ray:
        work = RayWork(
            program_state=program.dump_state(),
            program_config=settings.program_config(),
            lm=settings.lm,
            judge_lm=None if settings.judge_lm in (None, settings.lm) else settings.judge_lm,
            lm_builder=lm_builder,
            retry=retry,
        )
        with RayAds(work, settings.workers, settings.ray_address) as pool:
            return run_ads(
                prep,
                encoder,
                ad_ids,
                run,
                config,
                pool.answers,
                pool.lm_description,
                pool.judge_description,
                progress=progress,
                force=settings.force,
            )
    handles: list[LMHandle] = []
    try:
        lms = _build(lm_builder, settings.lm, settings.workers, handles)
        judges = lms
        if settings.judge_lm is not None and settings.judge_lm != settings.lm:
            judges = _build(lm_builder, settings.judge_lm, settings.workers, handles)
        if progress:  # one line per LLM call (seconds, tokens): a long run never sits silent
            meter = LMProgress()
            for h in handles:
                h.lm.callbacks.append(meter)
        program = load_program(
            settings.program_path(),
            settings.program_config(),
            judge_lm=judges[0].lm if judges is not lms else None,
        )
        lanes = [Lane(lms[i % len(lms)], judges[i % len(judges)]) for i in range(max(len(lms), len(judges)))]
        return generate(
            prep,
            encoder,
            program,
            lms[0],
            judges[0],
            ad_ids,
            run,
            config,
            progress=progress,
            force=settings.force,
            workers=settings.workers,
            lanes=lanes,
            retry=retry,
        )
    finally:
        for h in reversed(handles):
            h.close()


def _build(
    builder: Callable[[LMSettings], LMHandle], lm: LMSettings, workers: int, handles: list[LMHandle]
) -> list[LMHandle]:
    """The handles of one LM for `workers` workers (appended to `handles`, which the caller closes). Any
    server answers all workers through one handle, except the embedded one, which answers one request at
    a time: N workers get N embedded servers (the model file is mapped once, each server holds its own
    context), which share the --threads (at least one thread each)."""
    if not lm.embedded or workers == 1:
        handles.append(builder(lm))
        return handles[-1:]
    each = replace(lm, n_threads=max(1, lm.n_threads // workers))
    print(
        f"llmhyper: {workers} workers: starting {workers} embedded LLM servers with {each.n_threads} "
        "thread(s) each",
        file=sys.stderr,
    )
    for _ in range(workers):
        handles.append(builder(each))
    return handles[-workers:]


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
