"""`llmhyper` command line: data, evaluate, generate, compile, evolution, serve, trust, report."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm reaches for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from llmhyper.errors import LLMHyperError  # noqa: E402


def load_data(args: argparse.Namespace):
    if getattr(args, "data", None):
        from llmhyper.data import load_folder

        return load_folder(args.data, seed=args.seed)
    if args.dataset == "movielens-100k":
        from llmhyper import movielens

        return movielens.build(posters=args.posters or "auto", seed=args.seed)
    if args.dataset.startswith("synthetic"):
        from llmhyper.synthetic import generate_synthetic

        return generate_synthetic(seed=args.seed).data
    raise LLMHyperError(f"unknown dataset '{args.dataset}' (use movielens-100k, synthetic, or --data DIR)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="movielens-100k", help="movielens-100k | synthetic")
    p.add_argument("--data", help="a folder with your own ads/features/users/impressions tables")
    p.add_argument("--posters", help="poster folder for MovieLens (default: ../shared/data/ml100k-posters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3, help="neighbours retrieved per cold ad")
    p.add_argument("--encoder", default="minilm-effnet-conse", help="minilm-effnet-conse | open_clip:ARCH:CKPT")


def cmd_data(args: argparse.Namespace) -> int:
    data = load_data(args)
    card = {k: v for k, v in data.card.items() if not k.startswith("feature_")}
    print(json.dumps(card, indent=2))
    for f in data.features:
        print(f"  {f.name}: {f.description}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from llmhyper.encoders import get_encoder
    from llmhyper.evaluate import baseline_methods, evaluate, load_artifacts, markdown_table
    from llmhyper.prepare import prepare

    t0 = time.time()
    data = load_data(args)
    encoder = get_encoder(args.encoder)
    prep = prepare(data, encoder=encoder, k=args.k, seed=args.seed)
    methods = baseline_methods(prep, encoder, seed=args.seed)
    artifacts = load_artifacts(args.weights or [])
    ad_ids = list(data.cold_ads)
    for name, table in artifacts.items():
        covered = set(table.ad_ids)
        ad_ids = [a for a in ad_ids if a in covered]
        methods[name] = table
    if not ad_ids:
        raise LLMHyperError("the weight artifacts cover none of the cold ads of this data set")
    result = evaluate(prep, methods, ad_ids=ad_ids, n_boot=args.bootstrap, seed=args.seed,
                      challengers=list(artifacts))
    if args.save:  # every linear method's weights (and the retired pool) as npz + JSON artifacts
        from llmhyper.weights import WeightTable

        for name, m in {"retired": prep.retired, **methods}.items():
            if isinstance(m, WeightTable) and name not in artifacts:
                m.save(Path(args.save) / name)
    result["wall_seconds"] = round(time.time() - t0, 1)
    print(markdown_table(result))
    print(f"\n(wall time {result['wall_seconds']} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


SUBCOMMANDS = [  # (module, function registering the sub-command, whether it takes the data arguments)
    ("llmhyper.generate", "add_generate_parser", True),
    ("llmhyper.compile", "add_compile_parser", True),
    ("llmhyper.evolution", "add_evolution_parser", False),
    ("llmhyper.serve", "add_serve_parser", False),
    ("llmhyper.trust.cli", "add_trust_parser", True),
    ("llmhyper.report", "add_report_parser", True),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmhyper", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch/prepare a data set and print its card")
    add_data_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("evaluate", help="score baselines and weight artifacts on the cold ads")
    add_data_args(p)
    p.add_argument("--weights", action="append", help="a weight artifact folder (repeatable)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--save", help="also save every baseline's weights (and the retired pool) under this folder")
    p.set_defaults(func=cmd_evaluate)

    # the other commands live next to their code; each module keeps its heavy imports inside functions
    for module, adder, wants_data_args in SUBCOMMANDS:
        add = getattr(importlib.import_module(module), adder)
        add(sub, add_data_args) if wants_data_args else add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LLMHyperError as exc:
        print(f"llmhyper: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmhyper: interrupted (finished items are saved; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
