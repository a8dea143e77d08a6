"""`llmhyper data`: fetch or build a data set and print its card and feature definitions."""

from __future__ import annotations

import argparse
import json

from llmhyper.cli.common import add_data_args, data_settings
from llmhyper.data import load_dataset


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="fetch/prepare a data set and print its card",
        description="Fetch or build a data set and print its card and every feature's definition.",
    )
    add_data_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = load_dataset(data_settings(args))
    card = {k: v for k, v in data.card.items() if not k.startswith("feature_")}
    print(json.dumps(card, indent=2))
    for f in data.features:
        print(f"  {f.name}: {f.description}")
    return 0
