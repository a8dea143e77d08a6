"""The README's command list matches the parser: every command it shows exists with the options it
shows, and every command the parser has is listed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from llmhyper.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def commands_block() -> str:
    text = README.read_text()
    m = re.search(r"### Commands\n+```bash\n(.*?)```", text, re.S)
    assert m, "README has no '### Commands' bash block"
    return m.group(1)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_readme_commands_exist_with_their_options():
    top = subparsers(build_parser())
    shown = set()
    for line in commands_block().splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("llmhyper "):
            continue
        words = line.split()
        name = words[1]
        assert name in top, f"README shows `llmhyper {name}`, which the parser does not have"
        shown.add(name)
        parser = top[name]
        inner = subparsers(parser)
        if inner and len(words) > 2:  # `trust explain|robustness` or `edit compile`
            for sub in words[2].split("|"):
                assert sub in inner, f"README shows `llmhyper {name} {sub}`, which the parser does not have"
            parsers = [inner[s] for s in words[2].split("|")]
        else:
            parsers = [parser]
        for opt in re.findall(r"(--[a-z][a-z0-9-]*)", line):
            assert all(opt in options(p) for p in parsers), f"README: `llmhyper {name}` has no option {opt}"
    missing = set(top) - shown
    assert not missing, f"commands missing from the README's command list: {sorted(missing)}"


def all_parsers(parser: argparse.ArgumentParser, name: str = "llmhyper"):
    yield name, parser
    for sub, p in subparsers(parser).items():
        yield from all_parsers(p, f"{name} {sub}")


def test_every_command_help_has_a_purpose_and_each_default_once():
    top = build_parser()
    assert subparsers(top)
    for name, parser in all_parsers(top):
        if parser is not top and not parser.description:
            raise AssertionError(f"`{name} --help` has no one-line purpose")
        for action in parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            shown = parser._get_formatter()._get_help_string(action)
            assert shown.count("(default:") <= 1, f"`{name}` {action.option_strings[0]}: {shown!r}"
            if action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool):
                assert "default" in shown, f"`{name}` {action.option_strings[0]} hides its default"
