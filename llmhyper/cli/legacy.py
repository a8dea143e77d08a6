"""Commands whose parsers still live beside their library code (moving into cli/, one module each)."""

from __future__ import annotations

from types import SimpleNamespace

from llmhyper.cli.common import add_data_args
from llmhyper.hyper import generate
from llmhyper.optimize import compile as compile_mod
from llmhyper.optimize import evolution
from llmhyper.report import page
from llmhyper.serve import app
from llmhyper.trust import cli as trust_cli

COMMANDS = [
    SimpleNamespace(add_parser=lambda sub: generate.add_generate_parser(sub, add_data_args)),
    SimpleNamespace(add_parser=lambda sub: compile_mod.add_compile_parser(sub, add_data_args)),
    SimpleNamespace(add_parser=lambda sub: evolution.add_evolution_parser(sub)),
    SimpleNamespace(add_parser=lambda sub: app.add_serve_parser(sub)),
    SimpleNamespace(add_parser=lambda sub: trust_cli.add_trust_parser(sub, add_data_args)),
    SimpleNamespace(add_parser=lambda sub: page.add_report_parser(sub, add_data_args)),
]
