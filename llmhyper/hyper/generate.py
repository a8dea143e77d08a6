"""`llmhyper generate`: the program writes weights for every cold ad; the normaliser makes them servable.

A run directory holds everything of one run and resumes where it stopped:

    OUT/config.json        the run's settings (a rerun with other settings is refused)
    OUT/ads/<ad>.json      one record per finished ad (raw weights, spread, reasoning, judge, flags,
                           neighbours, normalised weights, delta, alpha, tokens, seconds); written atomically
    OUT/calls.jsonl        every LLM call (messages, outputs, usage), appended per ad
    OUT/weights/           the servable artifact (WeightTable, method "llm_hyper") over the finished ads
    OUT/manifest.json      model + hash, program + hash, data, git commit, times, tokens, counts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import LLMHyperError
from llmhyper.store import file_sha256, git_commit, now, versions, write_json_atomic
from llmhyper.paths import PROGRAMS, cache_dir
from llmhyper.ctr.prepare import Prepared
from llmhyper.weights import WeightTable
from llmhyper.hyper.views import ad_view, captions_for, demonstrations, finish_ad

METHOD = "llm_hyper"
DEFAULT_PROGRAM = PROGRAMS / "zero_shot.json"


def run_config(args: argparse.Namespace, program_path: Path | None) -> dict[str, Any]:
    return {"dataset": args.data or args.dataset, "seed": args.seed, "k": args.k, "encoder": args.encoder,
            "lm": args.lm, "judge_lm": args.judge_lm or args.lm, "api_base": args.api_base,
            "program": str(program_path) if program_path else None,
            "program_sha256": file_sha256(program_path) if program_path else None,
            "batch_size": args.batch_size, "samples": args.samples, "judge": not args.no_judge,
            "hide_titles": args.hide_titles, "temperature": args.temperature, "max_tokens": args.max_tokens,
            "frequency_penalty": frequency_penalty(args)}


def frequency_penalty(args: argparse.Namespace) -> float | None:
    """The penalty a run uses (recorded in its config, so a resume with another one is refused)."""
    from llmhyper.llm.models import EMBEDDED_FREQUENCY_PENALTY

    explicit = getattr(args, "frequency_penalty", None)  # callers may build a Namespace without it
    if explicit is not None:
        return explicit
    return EMBEDDED_FREQUENCY_PENALTY if getattr(args, "lm", "embedded") == "embedded" else None


def check_resume(out: Path, config: dict[str, Any], force: bool) -> None:
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        # the program is identified by its hash; its path may differ between checkouts
        diff = {k: (old.get(k), v) for k, v in config.items() if k != "program" and old.get(k) != v}
        if diff and not force:
            raise LLMHyperError(f"{out} holds a run with other settings {diff}; use a new --out "
                                "(or --force to continue anyway)")
    write_json_atomic(path, config)


def collect(out: Path, feature_names: list[str]) -> tuple[WeightTable, dict[str, Any]]:
    """The weight artifact and the run's totals, from the per-ad records on disk."""
    ids, thetas, bs, flags, recs = [], [], [], {}, []
    for p in sorted((out / "ads").glob("*.json")):
        rec = json.loads(p.read_text())
        recs.append(rec)
        if rec["status"] in ("ok", "partial"):
            ids.append(rec["ad_id"])
            thetas.append([rec["normalized_weights"][f] for f in feature_names])
            bs.append(rec["delta"])
            if rec.get("flags"):
                flags[rec["ad_id"]] = rec["flags"]
    d = len(feature_names)
    table = WeightTable(METHOD, ids, feature_names, np.array(thetas).reshape(len(ids), d), np.array(bs), flags,
                        meta={"source": str(out)})
    calls = sum(r.get("calls", 0) for r in recs)
    totals = {
        "ads_done": len(recs), "ads_ok": sum(r["status"] == "ok" for r in recs),
        "ads_partial": sum(r["status"] == "partial" for r in recs),
        "ads_failed": sum(r["status"] == "failed" for r in recs),
        "weight_calls": calls, "parse_failures": sum(r.get("parse_failures", 0) for r in recs),
        "parse_failure_rate": (sum(r.get("parse_failures", 0) for r in recs) / calls) if calls else None,
        "features_filled_from_prior": sum(len(r.get("filled_from_knn_prior", {})) for r in recs),
        "ads_with_judge_flags": sum(bool(r.get("flags")) for r in recs),
        "ads_judge_rejected": sum(bool(r.get("judge") and r["judge"][0].get("inconsistent_features"))
                                  for r in recs),
        "prompt_tokens": sum(r.get("tokens", {}).get("prompt_tokens", 0) for r in recs),
        "completion_tokens": sum(r.get("tokens", {}).get("completion_tokens", 0) for r in recs),
        "seconds": round(sum(r.get("seconds", 0.0) for r in recs), 1),
    }
    return table, totals


def generate(prep: Prepared, encoder, program, lm_handle, judge_handle, ad_ids: list[str], out: Path,
             config: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    import dspy
    from tqdm import tqdm

    from llmhyper.llm.models import lm_calls, lm_usage

    data = prep.data
    features = [f.model_dump() for f in data.features]
    names = data.feature_names
    (out / "ads").mkdir(parents=True, exist_ok=True)
    done = {p.stem for p in (out / "ads").glob("*.json")
            if json.loads(p.read_text()).get("status") in ("ok", "partial")}
    todo = [a for a in ad_ids if a not in done]
    needed = sorted(set(todo) | {n.ad_id for a in todo for n in prep.neighbours[a]})
    captions = captions_for(prep, encoder, needed)
    # a resumed run keeps its first start time and lists when each later session began
    previous = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    started = previous.get("started") or now()
    resumed = previous.get("resumed", []) + ([now()] if previous and todo else [])
    lms = [lm_handle.lm] + ([judge_handle.lm] if judge_handle is not lm_handle else [])
    bar = tqdm(todo, desc="generate", unit="ad", disable=not progress, initial=0)
    bar.set_postfix(done=len(done), left=len(todo))
    for ad_id in bar:
        marks = [len(lm.history) for lm in lms]
        t0 = time.time()
        record: dict[str, Any] = {"ad_id": ad_id, "title": data.ad_by_id[ad_id].title,
                                  "neighbours": [{"id": n.ad_id, "title": data.ad_by_id[n.ad_id].title,
                                                  "similarity": round(float(n.similarity), 4)}
                                                 for n in prep.neighbours[ad_id]]}
        try:
            with dspy.context(lm=lm_handle.lm):
                pred = program(ad=ad_view(prep, ad_id, captions), examples=demonstrations(prep, ad_id, captions),
                               features=features)
            record.update(finish_ad(prep, ad_id, pred, names))
            record.update({"spread": pred.spread, "n_samples_ok": pred.n_samples_ok,
                           "failed_features": pred.failed_features, "reasoning": pred.reasoning,
                           "judge": pred.judge, "flags": pred.flags, "calls": pred.calls,
                           "parse_failures": pred.parse_failures, "batches": pred.batches})
        except LLMHyperError:
            raise
        except Exception as exc:  # one ad's trouble (server error, bug in a reply) must not stop the run
            record.update({"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
        record["seconds"] = round(time.time() - t0, 2)
        usage = [lm_usage(lm, since=m) for lm, m in zip(lms, marks, strict=True)]
        record["tokens"] = {k: sum(u.get(k, 0) for u in usage) for k in ("prompt_tokens", "completion_tokens")}
        record["lm"] = lm_handle.description.get("model")
        with open(out / "calls.jsonl", "a") as f:
            for lm, m in zip(lms, marks, strict=True):
                for call in lm_calls(lm, since=m):
                    f.write(json.dumps({"ad_id": ad_id, **call}, default=str) + "\n")
        write_json_atomic(out / "ads" / f"{ad_id}.json", record)
        table, totals = collect(out, names)
        table.save(out / "weights")
        write_json_atomic(out / "manifest.json", {
            "method": METHOD, "config": config, "lm": lm_handle.description,
            "judge_lm": judge_handle.description, "data": {"name": data.name, **_card(data)},
            "encoder": prep.encoder_name, "k": prep.k, "git": git_commit(), "versions": versions(),
            "started": started, "resumed": resumed, "updated": now(), "requested_ads": len(ad_ids), "totals": totals})
        bar.set_postfix(status=record["status"], s=record["seconds"])
    table, totals = collect(out, names)
    return totals


def _card(data) -> dict[str, Any]:
    return {k: v for k, v in data.card.items() if not k.startswith("feature_")}


# -- command line -----------------------------------------------------------------------------

def add_generate_parser(sub, add_data_args) -> None:
    p = sub.add_parser("generate", help="write LLM-HYPER weights for cold ads (resumable)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--program", help=f"compiled program JSON (default: {DEFAULT_PROGRAM.name})")
    p.add_argument("--lm", default="embedded", help="'embedded' (default) or any DSPy model, e.g. openai/gpt-4o")
    p.add_argument("--judge-lm", help="LM for the judge (default: the same as --lm)")
    p.add_argument("--api-base", help="OpenAI-compatible endpoint for --lm (vLLM, Ollama, ...)")
    p.add_argument("--limit", type=int, help="only the first N cold ads (in data order)")
    p.add_argument("--ads", help="comma-separated ad ids to generate")
    p.add_argument("--samples", type=int, default=1, help="samples per feature batch, averaged")
    p.add_argument("--batch-size", type=int, default=10, help="features per LLM call")
    p.add_argument("--no-judge", action="store_true", help="skip the LLM judge")
    p.add_argument("--hide-titles", action="store_true", help="show genres/date/poster only, not titles")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads of the embedded LLM server (use 1 when other jobs share the CPU)")
    p.add_argument("--temperature", type=float, default=0.0, help="temperature of the first sample")
    p.add_argument("--max-tokens", type=int, default=320, help="per call; longer answers count as failures")
    p.add_argument("--frequency-penalty", type=float,
                   help="OpenAI frequency_penalty (default 0.5 for the embedded model, whose reasoning otherwise "
                        "often loops until max_tokens; the model's own default for other LMs)")
    p.add_argument("--force", action="store_true", help="continue a run directory made with other settings")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from llmhyper.cli.common import data_settings
    from llmhyper.data import load_dataset
    from llmhyper.retrieval.encoders import get_encoder
    from llmhyper.llm.models import build_lm
    from llmhyper.ctr.prepare import prepare
    from llmhyper.hyper.program import LLMHyper, ProgramConfig

    out = Path(args.out)
    program_path = Path(args.program) if args.program else (DEFAULT_PROGRAM if DEFAULT_PROGRAM.exists() else None)
    if program_path is not None and not program_path.exists():
        raise LLMHyperError(f"program file not found: {program_path}")
    config = run_config(args, program_path)
    check_resume(out, config, args.force)
    data = load_dataset(data_settings(args))
    ad_ids = args.ads.split(",") if args.ads else list(data.cold_ads)
    unknown = [a for a in ad_ids if a not in data.ad_index]
    if unknown:
        raise LLMHyperError(f"unknown ad ids: {unknown[:5]}")
    if args.limit:
        ad_ids = ad_ids[:args.limit]
    encoder = get_encoder(args.encoder)
    prep = prepare(data, encoder=encoder, k=args.k, seed=args.seed)
    if args.ads:  # ads outside the cold set (e.g. retired ads treated as cold) need neighbours and alpha
        extra = [a for a in ad_ids if a not in prep.neighbours]
        if extra:
            from llmhyper.ctr.prepare import embed

            prep.vectors.update(zip(extra, embed(data, extra, encoder), strict=True))
            prep.neighbours.update(prep.neighbours_of(extra))
            prep.alphas.update({a: prep.alpha_for(prep.neighbours[a]) for a in extra})
    program = LLMHyper(ProgramConfig(batch_size=args.batch_size, n_samples=args.samples,
                                     use_judge=not args.no_judge, hide_titles=args.hide_titles))
    if program_path is not None:
        program.load(str(program_path))
    lm_kw = {"api_base": args.api_base, "temperature": args.temperature, "max_tokens": args.max_tokens,
             "n_threads": args.threads}
    if frequency_penalty(args) is not None:
        lm_kw["frequency_penalty"] = frequency_penalty(args)
    handle = build_lm(args.lm, **lm_kw)
    judge = handle
    try:
        if args.judge_lm and args.judge_lm != args.lm:
            judge = build_lm(args.judge_lm, **lm_kw)
            program.judge.lm = judge.lm
        totals = generate(prep, encoder, program, handle, judge, ad_ids, out, config)
    finally:
        handle.close()
        if judge is not handle:
            judge.close()
    print(json.dumps(totals, indent=2))
    print(f"weights: {out / 'weights'}  (score them: llmhyper evaluate --weights {out / 'weights'})")
    return 0
