"""`llmhyper serve`: rank ads over HTTP (POST /rank, GET /health, POST /reload; POST /feedback with a log)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmhyper._lazy import require
from llmhyper.cli.common import (
    add_ranking_args,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
)
from llmhyper.serve.app import DEFAULT_HOST, DEFAULT_PORT, create_app, host_warning
from llmhyper.serve.feedback import FeedbackService, FeedbackSettings
from llmhyper.serve.workers import (
    DEFAULT_WATCH_SECONDS,
    ArtifactWatcher,
    ServeSettings,
    check_workers,
    run_workers,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve ad rankings over HTTP (POST /rank, /feedback, GET /health, POST /reload)",
        description="Serve ad rankings over HTTP. With --feedback-log, POST /feedback takes "
        "impression events, logs them durably and refines each ad's weights from its "
        "prior (Bayesian logistic regression, refitted in the background).",
    )
    p.add_argument("--weights", required=True, help="generated weight artifact folder (e.g. RUN/weights)")
    p.add_argument("--trained", help="artifact of trained per-ad models; these ads are served from it")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="TCP port")
    add_ranking_args(p)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="worker processes on the one port, each loading the artifact and watching it for new "
        "weights; not with --feedback-log",
    )
    p.add_argument(
        "--watch-seconds",
        type=non_negative_float,
        default=argparse.SUPPRESS,
        help="reload when the artifact files change, checked this often (default: "
        f"{DEFAULT_WATCH_SECONDS:g} with --workers > 1, else off; 0 = off)",
    )
    fb = p.add_argument_group("online feedback (off unless --feedback-log is given)")
    fb.add_argument("--feedback-log", help="the durable event log (JSONL); replayed on start")
    fb.add_argument(
        "--prior-precision",
        type=positive_float,
        default=5.0,
        help="prior precision on each weight (`llmhyper warmup` reports the empirical-Bayes one)",
    )
    fb.add_argument(
        "--prior-intercept-precision",
        type=positive_float,
        help="the intercept's prior precision (default: --prior-precision)",
    )
    fb.add_argument("--refit-every", type=positive_int, default=100, help="refit after this many new events")
    fb.add_argument("--refit-seconds", type=positive_float, default=2.0, help="... or after this long")
    fb.add_argument(
        "--refit-solver",
        choices=["lbfgs", "newton"],
        default="lbfgs",
        help="MAP solver of each refit (the same mode; newton is faster for one ad)",
    )
    fb.add_argument(
        "--users",
        help="table of known users (user + every served feature, standardised), so "
        "events may name a user instead of sending features",
    )
    fb.add_argument(
        "--thompson",
        action="store_true",
        help="rank by a Thompson draw from the posterior (exploration) instead of the posterior mean",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    uvicorn = require("uvicorn", "serve", "llmhyper serve")
    watch = getattr(args, "watch_seconds", None)
    if watch is None:
        watch = DEFAULT_WATCH_SECONDS if args.workers > 1 else 0.0
    check_workers(args.workers, watch, bool(args.feedback_log))
    serve = ServeSettings(
        Path(args.weights),
        Path(args.trained) if args.trained else None,
        args.flag_threshold,
        args.catalog,
        watch,
    )
    scorer = serve.scorer()  # also in the supervisor: a bad artifact fails here, once, in one line
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    feedback = None
    if args.feedback_log:
        settings = FeedbackSettings(
            log=Path(args.feedback_log),
            precision=args.prior_precision,
            intercept_precision=args.prior_intercept_precision,
            solver=args.refit_solver,
            refit_every=args.refit_every,
            refit_seconds=args.refit_seconds,
            thompson=args.thompson,
            users=Path(args.users) if args.users else None,
        )
        feedback = FeedbackService.open(scorer.snapshot, settings, publish=scorer.swap).start()
        h = feedback.health(per_ad=False)
        print(
            f"llmhyper serve: feedback log {args.feedback_log}: {h['logged_events']} events replayed "
            f"(applied through {h['applied_through']}, {h['pending']} pending)",
            file=sys.stderr,
        )
    elif args.thompson or args.users:
        print("llmhyper serve: warning: --thompson and --users need --feedback-log; ignored", file=sys.stderr)
    snap = scorer.snapshot
    features = (
        "raw features (z-scored with the artifact's scaling)"
        if snap.scaling is not None
        else ('z-scored features only (the artifact has no feature scaling: send "zscored": true)')
    )
    print(
        f"llmhyper serve: {snap.n_ads} ads, {snap.n_features} features, version {snap.version}, {features}; "
        f"{args.workers} worker{'s' if args.workers > 1 else ''}"
        f"{f', watching the artifact every {watch:g} s' if watch else ''} on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    if args.workers > 1:
        run_workers(serve, args.workers, args.host, args.port, args.log_level)
        return 0
    watcher = ArtifactWatcher(scorer, watch).start() if watch else None
    try:
        uvicorn.run(
            create_app(scorer, feedback, watcher),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
        )
    finally:
        if feedback is not None:
            feedback.stop()
        if watcher is not None:
            watcher.stop()
    return 0
