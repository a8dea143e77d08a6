"""`llmhyper compile`: evolve the program's instructions with GEPA from a recipe (resumable)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from llmhyper.cli.common import positive_int
from llmhyper.optimize.compile import compile_recipe, plan_compile


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="evolve the program's instructions with GEPA (resumable)",
        description="Run the GEPA recipe optimizers/NAME.toml; writes OUT/NAME.json, "
        "OUT/NAME.manifest.json and OUT/NAME.evolution/. Rerun to resume.",
    )
    p.add_argument("recipe", help="a recipe, e.g. optimizers/ml100k_small.toml")
    p.add_argument("--out", default="programs", help="folder for the program, manifest and evolution log")
    p.add_argument(
        "--max-metric-calls", type=positive_int, help="override the recipe's budget (e.g. to extend a run)"
    )
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads of the embedded LLM server (default: the recipe's)"
    )
    p.add_argument(
        "--force", action="store_true", help="continue an evolution folder made with other settings"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe, data and split and print the plan and cost estimate; no LLM call",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        plan = plan_compile(args.recipe, args.out, max_metric_calls=args.max_metric_calls)
        print(json.dumps(dataclasses.asdict(plan), indent=2))
        return 0
    res = compile_recipe(
        args.recipe, args.out, max_metric_calls=args.max_metric_calls, threads=args.threads, force=args.force
    )
    print(
        f"val score {res.val_before} -> {res.val_after} (best candidate {res.best_candidate}, "
        f"{res.metric_calls} metric calls)",
        file=sys.stderr,
    )
    print(
        f"program:   {res.program_path}   (use: llmhyper generate --program {res.program_path} "
        f"{res.manifest['generate_flags']})"
    )
    print(f"manifest:  {res.manifest_path}")
    print(f"evolution: {res.evolution_dir}   (review: llmhyper evolution {res.program_path.with_suffix('')})")
    return 0
