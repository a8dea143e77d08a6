"""`llmhyper score`: the top k ads of every user in a table, ranked as `serve` ranks them, to Parquet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmhyper.cli.common import add_ranking_args, positive_int
from llmhyper.serve.batch import ScoreSettings, raw_features, score_file
from llmhyper.serve.ray_jobs import RaySettings, score_file_ray
from llmhyper.serve.scorer import Scorer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="batch-rank ads for every user of a table (top k per user, to Parquet)",
        description="Rank the ads for every user of a users table exactly as `serve` does (judge flags, "
        "hand-over to trained weights) and write the top k per user to Parquet: columns user, "
        "rank, ad, ctr, source. Users are streamed in chunks (bounded memory); the output is "
        "written to a temp file and renamed at the end. The users table has a user id column "
        "and one column per artifact feature: raw values (z-scored here with the artifact's "
        "train means and standard deviations), or z-scored ones with --zscored.",
    )
    p.add_argument("--weights", required=True, help="generated weight artifact folder (e.g. RUN/weights)")
    p.add_argument("--trained", help="artifact of trained per-ad models; these ads are ranked with it")
    p.add_argument("--users", required=True, help="users table (.parquet or .csv)")
    p.add_argument("--user-column", default="user", help="the user id column of the users table")
    p.add_argument("--k", type=positive_int, default=10, help="ads per user")
    p.add_argument("--out", required=True, help="output Parquet file (replaced atomically)")
    p.add_argument("--chunk", type=positive_int, default=50_000, help="users read and ranked at once")
    add_ranking_args(p)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument(
        "--raw-features",
        dest="raw_features",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the values are raw; z-scored with the artifact's feature scaling (the default "
        "when the artifact has one)",
    )
    scale.add_argument(
        "--zscored",
        dest="raw_features",
        action="store_false",
        default=argparse.SUPPRESS,
        help="the values are already z-scored (the default when the artifact has no scaling)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: Ray Data map_batches (pip extra 'ray')",
    )
    p.add_argument("--ray", dest="engine", action="store_const", const="ray", help="the same as --engine ray")
    p.add_argument(
        "--ray-address", help="join this Ray cluster ('auto', 'ray://HOST:10001'); default: a local Ray"
    )
    p.add_argument("--ray-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = ScoreSettings(
        users=Path(args.users),
        out=Path(args.out),
        k=args.k,
        chunk=args.chunk,
        user_column=args.user_column,
        raw_features=getattr(args, "raw_features", None),
    )
    scorer = Scorer.from_dirs(args.weights, args.trained, args.flag_threshold, catalog=args.catalog)
    snap = scorer.snapshot
    raw = raw_features(snap, settings)  # --raw-features on an artifact without scaling fails here
    if not args.quiet:
        what = "raw features, z-scored with the artifact's scaling" if raw else "z-scored features"
        print(
            f"llmhyper score: {snap.n_ads} ads, {snap.n_features} features, version {snap.version}, "
            f"engine {args.engine}, {what}",
            file=sys.stderr,
        )
    if settings.raw_features is None and not raw and not args.quiet:
        print(
            "llmhyper score: note: the artifact carries no feature scaling, so the users' values are taken "
            "as z-scored (say --zscored to silence this)",
            file=sys.stderr,
        )
    if args.engine == "ray":
        summary = score_file_ray(
            snap, settings, RaySettings(address=args.ray_address, num_cpus=args.ray_cpus)
        )
    else:

        def progress(n: int) -> None:
            print(f"  {n:,} users", file=sys.stderr, flush=True)

        summary = score_file(snap, settings, None if args.quiet else progress)
    print(
        f"llmhyper score: {summary.users:,} users -> {summary.rows:,} rows in {summary.out} "
        f"({summary.seconds:.1f} s, {summary.users_per_second:,.0f} users/s)",
        file=sys.stderr,
    )
    return 0
