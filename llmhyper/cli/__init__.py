"""The command line: the only layer that parses arguments. One module per command."""

from llmhyper.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
