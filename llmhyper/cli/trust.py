"""`llmhyper trust explain | robustness | ablate | estimate`: the trust studies of a generate run.

Settings not given on the command line are taken from `--run RUN` (the generate run the study is about:
data set, seed, k, encoder, LM, program and its settings), else from `llmhyper generate`'s defaults, so a
study runs the same program as the run it checks. Every study is resumable: rerun the same command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmhyper.cli.common import (
    HelpFormatter,
    StrictParser,
    add_data_args,
    id_list,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from llmhyper.data import load_dataset
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.generate import run_settings
from llmhyper.hyper.program import load_program
from llmhyper.trust.ablation import VARIANTS, ablation_markdown, parse_variants, run_ablation
from llmhyper.trust.costs import SECONDS_PER_AD, estimate
from llmhyper.trust.explain import TAU, K, baseline_tables, explain_markdown, explain_study, finished_ads
from llmhyper.trust.robustness import TYPES, robustness_markdown, robustness_study
from llmhyper.trust.settings import LMPool, StudySettings, choose_ads, other_lm, prepare_study, resolve


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trust", help="explainability, counterfactual robustness and ablations of a run", description=__doc__
    )
    tsub = p.add_subparsers(dest="trust_command", metavar="STUDY", required=True, parser_class=StrictParser)
    p.set_defaults(func=run)

    e = tsub.add_parser(
        "explain",
        formatter_class=HelpFormatter,
        help="HitRate@5 / Coverage@5 vs ground-truth features; Consistency Rate",
        description="HitRate@k and Coverage@k of a run's weights and of trained models "
        "against each ad's ground-truth features; the Consistency Rate of its "
        "reasoning (an LLM judge).",
    )
    _data_args(e)
    e.add_argument("--run", required=True, help="a generate run directory")
    e.add_argument("--out", required=True, help="study folder (rerun to resume the consistency judge)")
    e.add_argument("--top", type=positive_int, default=K, help="k of HitRate@k / Coverage@k")
    e.add_argument(
        "--rank",
        choices=["signed", "abs"],
        default="signed",
        help="top features by weight (signed) or by |weight| (abs)",
    )
    e.add_argument("--tau", type=non_negative_float, default=TAU, help="|w| below this counts as neutral")
    e.add_argument("--no-consistency", action="store_true", help="skip the LLM judge (no LLM call at all)")
    e.add_argument(
        "--consistency-limit",
        type=positive_int,
        help="judge only the first N ads (HitRate/Coverage still cover every ad; rerun with a "
        "larger N to extend)",
    )
    e.add_argument("--judge-lm", help="LM of the stance judge (default: the run's judge LM, else --lm)")
    _lm_args(e)
    _ads_args(e)

    r = tsub.add_parser(
        "robustness",
        formatter_class=HelpFormatter,
        help="counterfactual rewrites and direction accuracy (resumable)",
        description="Rewrite each ad to appeal more, less or neutrally to one target "
        "feature's users, generate its weights again, and score whether the "
        "target weight moved the right way.",
    )
    _data_args(r)
    _base_run(r)
    r.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    r.add_argument("--rewrite-lm", help="LM that rewrites the ads (default: --lm)")
    r.add_argument("--types", help=f"comma-separated subset of {','.join(TYPES)} (default: all)")
    r.add_argument(
        "--targets-per-ad", type=positive_int, default=1, help="ground-truth features rewritten for, per ad"
    )
    r.add_argument(
        "--scope",
        choices=["batch", "all"],
        default="batch",
        help="regenerate only the target's feature batch, or every feature",
    )
    _lm_args(r)
    _program_args(r)
    _ads_args(r)

    a = tsub.add_parser(
        "ablate",
        formatter_class=HelpFormatter,
        help="0/3/5 shots, no caption, hidden titles: generate each, one table",
        description="Generate every variant as a run in OUT/<variant>/ and score them "
        "together against the calibrated kNN prior.",
    )
    _data_args(a)
    _base_run(a)
    a.add_argument("--out", required=True, help="study folder; each variant is a run in OUT/<variant>/")
    a.add_argument(
        "--variants",
        help=f"comma-separated: {','.join(VARIANTS)} (default: all) or custom "
        "name:shots=N:caption=0:titles=0",
    )
    a.add_argument(
        "--reuse",
        action="append",
        metavar="VARIANT=RUN",
        help="use an existing run as a variant, e.g. full=RUN (repeatable)",
    )
    _lm_args(a)
    _program_args(a)
    _ads_args(a)

    s = tsub.add_parser(
        "estimate",
        formatter_class=HelpFormatter,
        help="LLM calls and hours of each study (no LLM call)",
        description="What each study costs in LLM calls and hours, before running it.",
    )
    s.add_argument("--n-ads", type=positive_int, default=97, help="ads the studies cover")
    s.add_argument("--features", type=positive_int, default=40, help="features per ad")
    s.add_argument("--batch-size", type=positive_int, default=10, help="features per LLM call")
    s.add_argument("--samples", type=positive_int, default=1, help="samples per feature batch")
    s.add_argument("--no-judge", action="store_true", help="the program runs without its LLM judge")
    s.add_argument(
        "--seconds-per-ad",
        type=non_negative_float,
        default=SECONDS_PER_AD,
        help="measured seconds of one ad of `llmhyper generate` (sets the time of a call)",
    )
    s.add_argument("--scope", choices=["batch", "all"], default="batch", help="robustness --scope")
    s.add_argument("--targets-per-ad", type=positive_int, default=1, help="robustness --targets-per-ad")
    s.add_argument("--variants", type=positive_int, default=len(VARIANTS), help="ablation variants")
    s.add_argument(
        "--reused",
        type=non_negative_int,
        default=0,
        help="ablation variants taken from existing runs (--reuse)",
    )


# -- arguments --------------------------------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.set_defaults(dataset=None, seed=None, k=None, encoder=None)  # None: from --run, else the default


def _base_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", "--base-run", dest="run", help="the generate run whose settings (data, LM, program) to reuse"
    )


def _lm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", help="'embedded' or any DSPy model (default: the run's, else embedded)")
    p.add_argument("--api-base", help="OpenAI-compatible endpoint for --lm")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads of the embedded LLM server")
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        help="temperature of the first sample (default: the run's, else 0)",
    )
    p.add_argument("--max-tokens", type=positive_int, help="per call (default: the run's, else 320)")


def _program_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--program", help="compiled program JSON (default: the run's, else zero_shot.json)")
    p.add_argument("--judge-lm", help="LM of the program's judge (default: the run's, else --lm)")
    p.add_argument(
        "--samples", type=positive_int, help="samples per feature batch (default: the run's, else 1)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, help="features per LLM call (default: the run's, else 10)"
    )
    p.add_argument("--no-judge", action="store_true", default=None, help="skip the program's LLM judge")
    p.add_argument("--hide-titles", action="store_true", default=None, help="show genres/date/poster only")


def _ads_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=positive_int, help="only the first N cold ads (in data order)")
    p.add_argument("--ads", type=id_list, help="comma-separated ad ids")
    p.add_argument("--force", action="store_true", help="continue a folder made with other settings")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples")


def study_settings(args: argparse.Namespace) -> StudySettings:
    """The settings the command line gave (None where it gave none)."""
    opt = lambda name: getattr(args, name, None)  # noqa: E731  (not every sub-command has every option)
    return StudySettings(
        dataset=args.dataset,
        folder=args.data,
        posters=args.posters,
        seed=args.seed,
        k=args.k,
        encoder=args.encoder,
        lm=args.lm,
        judge_lm=opt("judge_lm"),
        api_base=args.api_base,
        program=opt("program"),
        batch_size=opt("batch_size"),
        samples=opt("samples"),
        judge=False if opt("no_judge") else None,
        hide_titles=True if opt("hide_titles") else None,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        threads=args.threads,
    )


# -- commands ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.trust_command](args)


def run_explain(args: argparse.Namespace) -> int:
    settings = resolve(study_settings(args), args.run, args.out)
    data = load_dataset(settings.data)
    ad_ids = finished_ads(args.run, args.ads, args.limit)
    tables = baseline_tables(data, args.run, ad_ids)
    judge = settings.judge_settings
    with LMPool() as lms:
        summary = explain_study(
            data,
            args.run,
            args.out,
            tables=tables,
            lm_handle=None if args.no_consistency else lms.get(judge),
            k=args.top,
            rank=args.rank,
            tau=args.tau,
            ad_ids=ad_ids,
            n_boot=args.bootstrap,
            seed=settings.data.seed,
            force=args.force,
            config={"lm": judge.spec, "api_base": settings.lm.api_base},
            consistency_limit=args.consistency_limit,
        )
    print(explain_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'explain.json'}, {Path(args.out) / 'explain.md'}")
    return 0


def run_robustness(args: argparse.Namespace) -> int:
    types = tuple(t.strip() for t in args.types.split(",")) if args.types else TYPES
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise LLMHyperError(f"unknown counterfactual types {bad} (use {', '.join(TYPES)})")
    settings = resolve(study_settings(args), args.run, args.out)
    data = load_dataset(settings.data)
    ad_ids = choose_ads(data, args.ads, args.limit)
    rewrite = other_lm(settings.lm, args.rewrite_lm)
    config = {**run_settings(settings, data), "rewrite_lm": rewrite.spec}
    encoder, prep = prepare_study(settings, data)
    with LMPool() as lms:
        handle, judge = lms.get(settings.lm), lms.get(settings.judge_settings)
        program = load_program(
            settings.program_path(),
            settings.program_config(),
            judge_lm=judge.lm if judge is not handle else None,
        )
        summary = robustness_study(
            prep,
            encoder,
            program,
            handle,
            lms.get(rewrite),
            ad_ids,
            args.out,
            config,
            targets_per_ad=args.targets_per_ad,
            types=types,
            scope=args.scope,
            force=args.force,
            n_boot=args.bootstrap,
        )
    print(robustness_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'robustness.json'}, {Path(args.out) / 'robustness.md'}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        raise LLMHyperError(str(exc)) from None
    reuse = {}
    for item in args.reuse or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise LLMHyperError(f"--reuse {item!r}: use VARIANT=RUN, e.g. full=results/my-run")
        reuse[name] = folder
    settings = resolve(study_settings(args), args.run, args.out)
    data = load_dataset(settings.data)
    ad_ids = choose_ads(data, args.ads, args.limit)
    config = run_settings(settings, data)
    encoder, prep = prepare_study(settings, data, k=max(v.shots for v in variants))
    with LMPool() as lms:
        try:
            summary = run_ablation(
                prep,
                encoder,
                lms.get(settings.lm),
                lms.get(settings.judge_settings),
                ad_ids,
                args.out,
                config,
                variants=variants,
                base_k=settings.k,
                program_config=settings.program_config(),
                program_path=settings.program_path(),
                reuse=reuse,
                n_boot=args.bootstrap,
                seed=settings.data.seed,
                force=args.force,
            )
        except ValueError as exc:
            raise LLMHyperError(str(exc)) from None
    print(ablation_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'ablation.json'}, {Path(args.out) / 'ablation.md'}")
    return 0


def run_estimate(args: argparse.Namespace) -> int:
    if args.reused > args.variants:
        raise LLMHyperError(f"--reused {args.reused} is more than --variants {args.variants}")
    costs = estimate(
        args.n_ads,
        n_features=args.features,
        batch_size=args.batch_size,
        samples=args.samples,
        judge=not args.no_judge,
        seconds_per_ad=args.seconds_per_ad,
        scope=args.scope,
        targets_per_ad=args.targets_per_ad,
        ablation_variants=args.variants,
        ablation_reused=args.reused,
    )
    print(json.dumps(costs, indent=2))
    return 0


COMMANDS = {
    "explain": run_explain,
    "robustness": run_robustness,
    "ablate": run_ablate,
    "estimate": run_estimate,
}
