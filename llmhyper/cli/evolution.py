"""`llmhyper evolution`: review a compile's prompt evolution from its own JSON log (no GEPA pickle needed).

llmhyper evolution programs/NAME                  lineage tree, scores, best-so-far curve, iterations,
                                                  and the best candidate's instruction diff
llmhyper evolution programs/NAME --candidate 3    candidate 3's instruction diff against its parent(s)
llmhyper evolution programs/NAME --html out.html  also one self-contained page (inline CSS/JS/SVG)

For an edit program (`llmhyper edit compile`) it shows NAME.search.md: every prompt variant and gate
read-out the compile scored, the chosen one, and the seed and compiled SHA-256.
"""

from __future__ import annotations

import argparse

from llmhyper.cli.common import non_negative_int
from llmhyper.optimize.evolution import edit_search_log, load_evolution
from llmhyper.report.evolution import render_html, render_search_html, render_text
from llmhyper.store import write_text_atomic


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evolution",
        help="review a compile's prompt evolution (tree, scores, diffs; --html)",
        description="Review what a compile's optimizer did: the candidate tree, their scores and the diffs "
        "of their instructions, from the compile's evolution folder (offline; --html writes one page).",
    )
    p.add_argument("path", help="programs/NAME (or NAME.json, NAME.evolution)")
    p.add_argument(
        "--candidate", type=non_negative_int, help="show the instruction diff of this candidate vs its parent"
    )
    p.add_argument("--all-diffs", action="store_true", help="show the diff of every candidate")
    p.add_argument("--html", help="also write one self-contained HTML page here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    search = edit_search_log(args.path)
    if search is not None:  # an edit compile: its search over prompt variants and gate read-outs
        text = search.read_text()
        print(text, end="")
        if args.html:
            out = write_text_atomic(
                args.html, render_search_html(search.name.removesuffix(".search.md"), text)
            )
            print(f"\nwrote {out}")
        return 0
    evo = load_evolution(args.path)
    print(render_text(evo, candidate=args.candidate, all_diffs=args.all_diffs), end="")
    if args.html:
        out = write_text_atomic(args.html, render_html(evo))
        print(f"\nwrote {out}")
    return 0
