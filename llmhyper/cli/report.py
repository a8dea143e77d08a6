"""`llmhyper report`: one self-contained HTML page (and a Markdown twin) of generate runs and the trust
studies about them. The data set and seed are the first run's unless given."""

from __future__ import annotations

import argparse

from llmhyper.cli.common import add_data_args, non_negative_int, positive_int
from llmhyper.data import load_dataset
from llmhyper.report.gather import gather, load_summary
from llmhyper.report.render import STUDIES, write_report
from llmhyper.store import read_json
from llmhyper.trust.settings import StudySettings, resolve


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page (+ Markdown) of runs and trust studies",
        description="One self-contained HTML page (inline CSS and SVG, no script) and a "
        "Markdown twin: metrics with intervals, generated vs trained weights, "
        "calibration, and the trust studies.",
    )
    add_data_args(p)
    p.set_defaults(dataset=None, seed=None)  # None: the first run's
    p.add_argument(
        "--runs", nargs="+", required=True, help="generate run directories (the first is the main one)"
    )
    p.add_argument("--out", default="report.html", help="the HTML file; the Markdown goes next to it (.md)")
    p.add_argument(
        "--eval",
        help="`llmhyper evaluate --json` output for the metric bars (default: computed "
        "here for LR_warm and the runs only)",
    )
    p.add_argument("--explain", help="a `llmhyper trust explain` folder")
    p.add_argument("--robustness", help="a `llmhyper trust robustness` folder")
    p.add_argument("--ablation", help="a `llmhyper trust ablate` folder")
    p.add_argument(
        "--warmup", help="a `llmhyper warmup --json` result: its curves and headline go in the page"
    )
    p.add_argument("--max-ads", type=positive_int, default=60, help="ads shown in the heatmap")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=200,
        help="bootstrap resamples when metrics are computed here",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = StudySettings(dataset=args.dataset, folder=args.data, posters=args.posters, seed=args.seed)
    settings = resolve(given, args.runs[0])
    # every input is read before the data set is loaded: a wrong path fails at once
    studies = {name: load_summary(getattr(args, name), name) for name in STUDIES}
    eval_result = read_json(args.eval, "evaluate result") if args.eval else None
    warmup = read_json(args.warmup, "warm-up result") if args.warmup else None
    data = load_dataset(settings.data)
    rep = gather(
        data,
        args.runs,
        eval_result=eval_result,
        **studies,
        max_ads=args.max_ads,
        n_boot=args.bootstrap,
        seed=settings.data.seed,
    )
    rep["warmup"] = warmup
    html_path, md_path = write_report(rep, args.out)
    print(f"written: {html_path} ({html_path.stat().st_size // 1024} KiB), {md_path}")
    return 0
