"""`llmhyper trust explain | robustness | ablate | estimate`.

Settings not given on the command line are taken from `--base-run RUN` (the generate run the study is about:
data set, seed, k, encoder, LM, program and its settings), else from `llmhyper generate`'s defaults, so a
study runs the same program as the run it checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmhyper.errors import LLMHyperError

DEFAULTS = {
    "dataset": "movielens-100k",
    "seed": 0,
    "k": 3,
    "encoder": "minilm-effnet-conse",
    "lm": "embedded",
    "judge_lm": None,
    "api_base": None,
    "program": None,
    "batch_size": 10,
    "samples": 1,
    "no_judge": False,
    "hide_titles": False,
    "temperature": 0.0,
    "max_tokens": 320,
}
FROM_RUN = {
    "seed": "seed",
    "k": "k",
    "encoder": "encoder",
    "lm": "lm",
    "judge_lm": "judge_lm",
    "api_base": "api_base",
    "program": "program",
    "batch_size": "batch_size",
    "samples": "samples",
    "hide_titles": "hide_titles",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
}


# -- arguments --------------------------------------------------------------------------------------


def _data_args(p, add_data_args) -> None:
    add_data_args(p)
    p.set_defaults(dataset=None, seed=None, k=None, encoder=None)  # None: from --base-run, else the default


def _lm_args(p) -> None:
    p.add_argument("--lm", help="'embedded' or any DSPy model (default: the base run's, else embedded)")
    p.add_argument("--api-base", help="OpenAI-compatible endpoint for --lm")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the embedded LLM server")
    p.add_argument("--temperature", type=float, help="temperature of the first sample (default 0)")
    p.add_argument("--max-tokens", type=int, help="per call (default 320)")


def _program_args(p) -> None:
    p.add_argument("--program", help="compiled program JSON (default: the base run's, else zero_shot.json)")
    p.add_argument("--judge-lm", help="LM of the program's judge (default: --lm)")
    p.add_argument("--samples", type=int, help="samples per feature batch (default 1)")
    p.add_argument("--batch-size", type=int, help="features per LLM call (default 10)")
    p.add_argument("--no-judge", action="store_true", default=None, help="skip the program's LLM judge")
    p.add_argument("--hide-titles", action="store_true", default=None, help="show genres/date/poster only")


def _ads_args(p) -> None:
    p.add_argument("--limit", type=int, help="only the first N cold ads (in data order)")
    p.add_argument("--ads", help="comma-separated ad ids")
    p.add_argument("--force", action="store_true", help="continue a folder made with other settings")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")


def resolve(args: argparse.Namespace, run: str | Path | None) -> dict[str, Any]:
    """Fill unset settings from the base run's config.json, then from DEFAULTS (in place); returns the
    base run's config."""
    cfg: dict[str, Any] = {}
    if run:
        path = Path(run) / "config.json"
        if not path.exists():
            raise LLMHyperError(f"{run} is not a generate run (no config.json)")
        cfg = json.loads(path.read_text())
        if getattr(args, "dataset", None) is None and not getattr(args, "data", None) and cfg.get("dataset"):
            ds = str(cfg["dataset"])
            if ds == "movielens-100k" or ds.startswith("synthetic"):
                args.dataset = ds
            else:
                args.data = ds
        for attr, key in FROM_RUN.items():
            if hasattr(args, attr) and getattr(args, attr) is None and key in cfg:
                setattr(args, attr, cfg[key])
        if hasattr(args, "no_judge") and args.no_judge is None and "judge" in cfg:
            args.no_judge = not cfg["judge"]
    for attr, v in DEFAULTS.items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, v)
    return cfg


def _program_path(args) -> Path | None:
    from llmhyper.hyper.generate import DEFAULT_PROGRAM

    p = Path(args.program) if args.program else (DEFAULT_PROGRAM if DEFAULT_PROGRAM.exists() else None)
    if p is not None and not p.exists():
        raise LLMHyperError(f"program file not found: {p}")
    return p


def _program_config(args):
    from llmhyper.hyper.program import ProgramConfig

    return ProgramConfig(
        batch_size=args.batch_size,
        n_samples=args.samples,
        use_judge=not args.no_judge,
        hide_titles=bool(args.hide_titles),
    )


def _ad_ids(args, data) -> list[str]:
    ad_ids = args.ads.split(",") if args.ads else list(data.cold_ads)
    unknown = [a for a in ad_ids if a not in set(data.cold_ads)]
    if unknown:
        raise LLMHyperError(f"not cold ads of this data set: {unknown[:5]}")
    return ad_ids[: args.limit] if args.limit else ad_ids


class _LMs:
    """Builds each distinct LM spec once (two embedded specs would start two servers) and closes them all."""

    def __init__(self, args):
        self.args, self.handles = args, {}

    def get(self, spec: str | None):
        from llmhyper.llm.models import build_lm

        spec = spec or self.args.lm
        if spec not in self.handles:
            a = self.args
            self.handles[spec] = build_lm(
                spec,
                api_base=a.api_base if spec == a.lm else None,
                temperature=a.temperature,
                max_tokens=a.max_tokens,
                n_threads=a.threads,
            )
        return self.handles[spec]

    def close(self) -> None:
        for h in self.handles.values():
            h.close()


# -- commands ---------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    from llmhyper.ctr import baselines as bl
    from llmhyper.cli.common import data_settings
    from llmhyper.data import load_dataset
    from llmhyper.retrieval.index import Neighbour
    from llmhyper.trust.explain import _run_records, explain_markdown, explain_study
    from llmhyper.ctr.warm import train_warm

    resolve(args, args.run)
    data = load_dataset(data_settings(args))
    records = _run_records(Path(args.run))
    ad_ids = [a for a in (args.ads.split(",") if args.ads else records) if a in records]
    if args.limit:
        ad_ids = ad_ids[: args.limit]
    if not ad_ids:
        raise LLMHyperError(f"{args.run} holds no finished ads")
    tables = {"lr_warm": train_warm(data, ad_ids, method="lr_warm", min_pos=1, min_neg=1, progress=False)}
    retired = train_warm(data, data.warm_ads, method="retired", progress=False)
    nbs = {
        a: [
            Neighbour(n["id"], float(n["similarity"]))
            for n in records[a].get("neighbours", [])
            if n["id"] in set(retired.ad_ids)
        ]
        for a in ad_ids
    }
    have = [a for a in ad_ids if nbs[a]]
    if have:
        tables["knn"] = bl.knn_prior(retired, {a: nbs[a] for a in have}, have)
    tables["lr_cold"] = bl.lr_cold(retired, ad_ids)
    lms = _LMs(args)
    try:
        handle = None if args.no_consistency else lms.get(args.judge_lm)
        summary = explain_study(
            data,
            args.run,
            args.out,
            tables=tables,
            lm_handle=handle,
            k=args.top,
            rank=args.rank,
            tau=args.tau,
            ad_ids=ad_ids,
            n_boot=args.bootstrap,
            seed=args.seed,
            force=args.force,
            config={"lm": args.judge_lm or args.lm, "api_base": args.api_base},
            consistency_limit=args.consistency_limit,
        )
    finally:
        lms.close()
    print(explain_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'explain.json'}, {Path(args.out) / 'explain.md'}")
    return 0


def _prepare(args, data):
    from llmhyper.retrieval.encoders import get_encoder
    from llmhyper.ctr.prepare import prepare

    encoder = get_encoder(args.encoder)
    return encoder, prepare(
        data, encoder=encoder, k=max(args.k, getattr(args, "_k_needed", 0)), seed=args.seed
    )


def _study_setup(args):
    """What robustness and ablate share: settings from the base run, the data, the ads, the program and
    the run config recorded next to the study."""
    from llmhyper.cli.common import data_settings
    from llmhyper.data import load_dataset
    from llmhyper.hyper.generate import run_config

    resolve(args, args.base_run)
    data = load_dataset(data_settings(args))
    ad_ids = _ad_ids(args, data)
    program_path = _program_path(args)
    return data, ad_ids, program_path, run_config(args, program_path)


def cmd_robustness(args: argparse.Namespace) -> int:
    from llmhyper.hyper.program import LLMHyper
    from llmhyper.trust.robustness import TYPES, robustness_markdown, robustness_study

    types = tuple(t.strip() for t in args.types.split(",")) if args.types else TYPES
    data, ad_ids, program_path, config = _study_setup(args)
    config["rewrite_lm"] = args.rewrite_lm or args.lm
    encoder, prep = _prepare(args, data)
    program = LLMHyper(_program_config(args))
    if program_path is not None:
        program.load(str(program_path))
    lms = _LMs(args)
    try:
        handle = lms.get(args.lm)
        if args.judge_lm and args.judge_lm != args.lm:
            program.judge.lm = lms.get(args.judge_lm).lm
        summary = robustness_study(
            prep,
            encoder,
            program,
            handle,
            lms.get(args.rewrite_lm),
            ad_ids,
            args.out,
            config,
            targets_per_ad=args.targets_per_ad,
            types=types,
            scope=args.scope,
            force=args.force,
            n_boot=args.bootstrap,
        )
    finally:
        lms.close()
    print(robustness_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'robustness.json'}, {Path(args.out) / 'robustness.md'}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from llmhyper.trust.ablation import ablation_markdown, parse_variants, run_ablation

    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        raise LLMHyperError(str(exc)) from None
    reuse = dict(item.split("=", 1) for item in (args.reuse or []))
    data, ad_ids, program_path, config = _study_setup(args)
    args._k_needed = max(v.shots for v in variants)
    encoder, prep = _prepare(args, data)
    lms = _LMs(args)
    try:
        handle = lms.get(args.lm)
        judge = lms.get(args.judge_lm) if args.judge_lm and args.judge_lm != args.lm else handle
        if judge is not handle:
            raise LLMHyperError(
                "ablate runs the program's judge on --lm; a separate --judge-lm is not supported"
            )
        summary = run_ablation(
            prep,
            encoder,
            handle,
            judge,
            ad_ids,
            args.out,
            config,
            variants=variants,
            base_k=args.k,
            program_config=_program_config(args),
            program_path=program_path,
            reuse=reuse,
            n_boot=args.bootstrap,
            seed=args.seed,
            force=args.force,
        )
    except ValueError as exc:
        raise LLMHyperError(str(exc)) from None
    finally:
        lms.close()
    print(ablation_markdown(summary))
    print(f"\nwritten: {Path(args.out) / 'ablation.json'}, {Path(args.out) / 'ablation.md'}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from llmhyper.trust.costs import estimate

    print(
        json.dumps(
            estimate(
                args.n_ads,
                n_features=args.features,
                batch_size=args.batch_size or 10,
                samples=args.samples or 1,
                judge=not args.no_judge,
                seconds_per_ad=args.seconds_per_ad,
                scope=args.scope,
                targets_per_ad=args.targets_per_ad,
                ablation_variants=args.variants,
                ablation_reused=args.reused,
            ),
            indent=2,
        )
    )
    return 0


def add_trust_parser(sub, add_data_args) -> None:
    p = sub.add_parser(
        "trust", help="explainability, counterfactual robustness and ablations of a run", description=__doc__
    )
    tsub = p.add_subparsers(dest="trust_command", required=True)

    e = tsub.add_parser("explain", help="HitRate@5 / Coverage@5 vs ground-truth features; Consistency Rate")
    _data_args(e, add_data_args)
    e.add_argument("--run", required=True, help="a generate run directory")
    e.add_argument("--out", required=True, help="study folder (rerun to resume the consistency judge)")
    e.add_argument("--top", type=int, default=5, help="k of HitRate@k / Coverage@k")
    e.add_argument(
        "--rank",
        choices=["signed", "abs"],
        default="signed",
        help="top features by weight (signed, default) or by |weight|",
    )
    e.add_argument("--tau", type=float, default=0.1, help="|w| below this counts as neutral")
    e.add_argument("--no-consistency", action="store_true", help="skip the LLM judge (no LLM call at all)")
    e.add_argument(
        "--consistency-limit",
        type=int,
        help="judge only the first N ads (HitRate/Coverage still cover every ad; rerun with a larger N to extend)",
    )
    e.add_argument("--judge-lm", help="LM of the stance judge (default: --lm)")
    _lm_args(e)
    _ads_args(e)
    e.set_defaults(func=cmd_explain)

    r = tsub.add_parser("robustness", help="counterfactual rewrites and direction accuracy (resumable)")
    _data_args(r, add_data_args)
    r.add_argument("--base-run", help="the generate run whose settings (data, LM, program) to reuse")
    r.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    r.add_argument("--rewrite-lm", help="LM that rewrites the ads (default: --lm)")
    r.add_argument("--types", help="comma-separated subset of enhanced,diminished,neutralised")
    r.add_argument(
        "--targets-per-ad", type=int, default=1, help="ground-truth features rewritten for, per ad"
    )
    r.add_argument(
        "--scope",
        choices=["batch", "all"],
        default="batch",
        help="regenerate only the target's feature batch (default) or every feature",
    )
    _lm_args(r)
    _program_args(r)
    _ads_args(r)
    r.set_defaults(func=cmd_robustness)

    a = tsub.add_parser("ablate", help="0/3/5 shots, no caption, hidden titles: generate each, one table")
    _data_args(a, add_data_args)
    a.add_argument("--base-run", help="the generate run whose settings (data, LM, program) to reuse")
    a.add_argument("--out", required=True, help="study folder; each variant is a run in OUT/<variant>/")
    a.add_argument(
        "--variants",
        help="comma-separated: full,shots0,shots5,no_caption,hide_titles (default: all) "
        "or custom name:shots=N:caption=0:titles=0",
    )
    a.add_argument("--reuse", action="append", help="VARIANT=RUN: use an existing run (e.g. full=RUN)")
    _lm_args(a)
    _program_args(a)
    _ads_args(a)
    a.set_defaults(func=cmd_ablate)

    s = tsub.add_parser("estimate", help="LLM calls and hours of each study (no LLM call)")
    s.add_argument("--n-ads", type=int, default=97)
    s.add_argument("--features", type=int, default=40)
    s.add_argument("--batch-size", type=int, default=10)
    s.add_argument("--samples", type=int, default=1)
    s.add_argument("--no-judge", action="store_true")
    s.add_argument("--seconds-per-ad", type=float, default=90.0)
    s.add_argument("--scope", choices=["batch", "all"], default="batch")
    s.add_argument("--targets-per-ad", type=int, default=1)
    s.add_argument("--variants", type=int, default=5, help="ablation variants")
    s.add_argument(
        "--reused", type=int, default=0, help="ablation variants taken from existing runs (--reuse)"
    )
    s.set_defaults(func=cmd_estimate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: llmhyper trust ...")
