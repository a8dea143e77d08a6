"""`llmhyper warmup`: how many impressions each prior saves a cold ad before its model is good."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmhyper.cli.common import add_data_args, data_settings, non_negative_int, positive_float, positive_int
from llmhyper.ctr.evaluate import load_artifacts
from llmhyper.ctr.posterior import EBSettings
from llmhyper.ctr.prepare import prepare
from llmhyper.ctr.warmup import WarmupSettings, markdown, run_warmup, svg
from llmhyper.data import load_dataset
from llmhyper.errors import LLMHyperError
from llmhyper.retrieval.encoders import get_encoder
from llmhyper.store import git_commit, now, write_json_atomic, write_text_atomic


def impressions_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 0 or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing numbers >= 0 such as 0,10,25,50, got '{text}'")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="simulate cold ads warming up from each prior as impressions arrive",
        description="For each cold ad, reveal n random train users' labels, fit a Bayesian "
        "logistic regression centred on each prior (precision by empirical Bayes on "
        "retired ads), score the test users; report the metrics against n and the "
        "impressions each prior needs to reach 95% of LR_warm's AUC.",
    )
    add_data_args(p)
    p.add_argument(
        "--priors",
        default="lr_cold,knn_cal",
        help="comma-separated baselines (lr_cold, knn_cal, ridge, ridge_cal, ...) and weight artifact "
        "folders (RUN/weights); 'none' is always included",
    )
    p.add_argument(
        "--impressions",
        type=impressions_list,
        default=(0, 10, 25, 50, 100, 200),
        help="revealed impressions per ad",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="seeds of the revealed users")
    p.add_argument("--bootstrap", type=non_negative_int, default=200, help="user resamples for intervals")
    p.add_argument(
        "--precision", type=positive_float, help="one fixed prior precision (skips empirical Bayes)"
    )
    p.add_argument("--intercept-precision", type=positive_float, help="with --precision: the intercept's")
    p.add_argument("--eb-ads", type=positive_int, default=50, help="retired ads held out for empirical Bayes")
    p.add_argument("--target", type=positive_float, default=0.95, help="share of LR_warm's AUC to reach")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--svg", help="write the AUC-vs-impressions plot here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    items = [s.strip() for s in args.priors.split(",") if s.strip() and s.strip() != "none"]
    paths = [s for s in items if "/" in s or Path(s).is_dir()]
    names = [s for s in items if s not in paths]
    artifacts = load_artifacts(paths)  # damaged artifacts fail before any work
    settings = WarmupSettings(
        impressions=tuple(args.impressions),
        repeats=args.repeats,
        seed=args.seed,
        n_boot=args.bootstrap,
        target=args.target,
        precision=args.precision,
        intercept_precision=args.intercept_precision,
        eb=EBSettings(
            max_ads=args.eb_ads, seed=args.seed, reveal=tuple(n for n in args.impressions if n > 0)
        ),
    )
    if not settings.eb.reveal and args.precision is None:
        raise LLMHyperError(
            "empirical Bayes needs at least one impressions value above 0 (or give --precision)"
        )
    t0 = time.time()
    data = load_dataset(data_settings(args))
    encoder = get_encoder(args.encoder)
    prep = prepare(data, encoder=encoder, k=args.k, seed=args.seed)
    result = run_warmup(prep, names, artifacts, settings, encoder)
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["date"], result["git"] = now(), git_commit()
    result["command"] = "llmhyper warmup " + " ".join(_argv(args, paths, names))
    print(markdown(result))
    print(f"\n(wall time {result['wall_seconds']} s)")
    if args.json:
        write_json_atomic(args.json, result)
    if args.svg:
        write_text_atomic(args.svg, svg(result))
    return 0


def _argv(args: argparse.Namespace, paths: list[str], names: list[str]) -> list[str]:
    data = f"--data {args.data}" if args.data else f"--dataset {args.dataset}"
    out = [
        data,
        f"--priors {','.join(names + paths)}",
        f"--impressions {','.join(map(str, args.impressions))}",
        f"--repeats {args.repeats}",
        f"--seed {args.seed}",
    ]
    if args.precision is not None:
        out.append(f"--precision {args.precision:g}")
    if args.intercept_precision is not None:
        out.append(f"--intercept-precision {args.intercept_precision:g}")
    return out
