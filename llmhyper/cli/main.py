"""`llmhyper` command line: one module per command; this one only assembles them and reports errors."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm reaches for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import llmhyper  # noqa: E402
from llmhyper.cli import data as data_cmd  # noqa: E402
from llmhyper.cli import evaluate as evaluate_cmd  # noqa: E402
from llmhyper.cli import legacy  # noqa: E402
from llmhyper.cli.common import HelpFormatter  # noqa: E402
from llmhyper.errors import LLMHyperError  # noqa: E402

COMMANDS = [data_cmd, evaluate_cmd, *legacy.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmhyper", description="LLM-HYPER: CTR weights for brand-new ads.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmhyper {llmhyper.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for p in sub.choices.values():  # every sub-command shows its defaults
        p.formatter_class = HelpFormatter
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
