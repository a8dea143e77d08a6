"""`llmhyper` command line: one module per command; this one only assembles them and reports errors."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm reaches for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import llmhyper  # noqa: E402
from llmhyper.cli import compile as compile_cmd  # noqa: E402
from llmhyper.cli import data as data_cmd  # noqa: E402
from llmhyper.cli import edit as edit_cmd  # noqa: E402
from llmhyper.cli import evaluate as evaluate_cmd  # noqa: E402
from llmhyper.cli import evolution as evolution_cmd  # noqa: E402
from llmhyper.cli import generate as generate_cmd  # noqa: E402
from llmhyper.cli import report as report_cmd  # noqa: E402
from llmhyper.cli import score as score_cmd  # noqa: E402
from llmhyper.cli import serve as serve_cmd  # noqa: E402
from llmhyper.cli import trust as trust_cmd  # noqa: E402
from llmhyper.cli import warmup as warmup_cmd  # noqa: E402
from llmhyper.cli.common import HelpFormatter, StrictParser  # noqa: E402
from llmhyper.errors import LLMHyperError  # noqa: E402

COMMANDS = [
    data_cmd,
    evaluate_cmd,
    edit_cmd,
    generate_cmd,
    compile_cmd,
    evolution_cmd,
    score_cmd,
    warmup_cmd,
    serve_cmd,
    trust_cmd,
    report_cmd,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmhyper",
        description="LLM-HYPER: CTR weights for brand-new ads.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmhyper {llmhyper.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=StrictParser)
    for command in COMMANDS:
        command.add_parser(sub)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command and sub-command shows its defaults in --help."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _show_defaults(p)


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
