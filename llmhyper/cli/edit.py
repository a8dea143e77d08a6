"""`llmhyper edit compile|run`: the edit program (the LM as a gated editor of the learned ridge prior)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from llmhyper.cli.common import add_data_args, data_settings, positive_int
from llmhyper.ctr.prepare import prepare
from llmhyper.data import load_dataset
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.edit import LAYOUTS, MODES, EditConfig, EditProgram
from llmhyper.hyper.edit_inputs import edit_context, held_out_neighbours
from llmhyper.hyper.edit_run import GateSettings, validation_ads
from llmhyper.hyper.views import captions_for
from llmhyper.llm.build import build_lm
from llmhyper.llm.logprobs import client_for_handle
from llmhyper.llm.settings import LMSettings
from llmhyper.optimize.edit_compile import EditRunSettings, compile_edit, load_edit_program, run_edit
from llmhyper.paths import cache_dir
from llmhyper.retrieval.encoders import get_encoder


def add_parser(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="the edit program: the LM as a gated editor of the learned prior",
        description="Compile (fit the gate on held-out retired ads) or run the edit program.",
    )
    inner = p.add_subparsers(dest="edit_command", required=True)
    c = inner.add_parser(
        "compile",
        help="fit the gate on held-out retired ads; write programs/NAME.json + manifest",
        description="Run each prompt variant once on held-out retired ads, then fit, choose and report a "
        "gate (how far the LM's labels move the prior) on thirds of them; writes OUT.json, "
        "OUT.manifest.json, OUT.search.md and the resumable run folders OUT.gate/.",
    )
    r = inner.add_parser(
        "run",
        help="run a compiled edit program on the cold ads (resumable)",
        description="Run a compiled edit program on the cold ads: one LM call per ad, weights written per "
        "ad into OUT/; rerun the same command to resume.",
    )
    for q in (c, r):
        add_data_args(q)
        q.add_argument("--lm", default="embedded", help="'embedded' or a DSPy model string (openai/...)")
        q.add_argument("--api-base", help="OpenAI-compatible endpoint for --lm (needed for --mode logprobs)")
        q.add_argument("--api-key-env", help="environment variable holding the API key")
        q.add_argument(
            "--threads", type=positive_int, default=2, help="CPU threads of the embedded LLM server"
        )
        q.add_argument("--quiet", action="store_true", help="no per-ad progress lines")
    c.add_argument("--out", default="programs/edit_ml100k", help="program path without .json")
    c.add_argument("--mode", choices=MODES, default="logprobs", help="how labels are read")
    c.add_argument("--layout", choices=LAYOUTS, default="digits", help="prompt layout of the logprobs mode")
    c.add_argument(
        "--shots",
        type=shots_list,
        default=[3, 0],
        help="prompt variants to search: past ads shown, comma-separated; the first is the seed",
    )
    c.add_argument(
        "--validation-ads",
        type=positive_int,
        default=60,
        help="held-out retired ads (thirds: fit the gate, choose it, report it)",
    )
    c.add_argument(
        "--group-by",
        help="metadata field (e.g. topics): held-out retired ads get a prior fit "
        "without their group, for cold ads about things no retired ad is",
    )
    c.set_defaults(func=run_compile)
    r.add_argument("--program", default="programs/edit_ml100k.json", help="a compiled edit program")
    r.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    r.add_argument("--limit", type=positive_int, help="only the first N cold ads")
    r.add_argument("--mode", choices=MODES, help="override the compiled mode")
    r.set_defaults(func=run_run)


def shots_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers of past ads, got {text!r}"
        ) from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct numbers 0 or more, got {text!r}")
    return out


def _setup(args: argparse.Namespace, config: EditConfig, group_by: str | None):
    lm_settings = LMSettings(
        spec=args.lm, api_base=args.api_base, api_key_env=args.api_key_env, n_threads=args.threads
    ).validate()
    data = load_dataset(data_settings(args))
    encoder = get_encoder(args.encoder)
    prep = prepare(data, encoder=encoder, k=args.k, seed=args.seed)
    settings = EditRunSettings(
        data=data_settings(args),
        encoder=args.encoder,
        k=args.k,
        lm=lm_settings.record(),
        config=config,
        group_by=group_by,
    )
    return data, encoder, prep, lm_settings, settings


def run_compile(args: argparse.Namespace) -> int:
    import dspy

    if max(args.shots) > args.k:  # more past ads than are retrieved would run a variant twice under two names
        raise LLMHyperError(f"--shots {max(args.shots)} is more than --k {args.k} retrieved past ads")
    config = EditConfig(mode=args.mode, layout=args.layout)
    data, encoder, prep, lm_settings, settings = _setup(args, config, args.group_by)
    gate = GateSettings(n_ads=args.validation_ads, seed=args.seed)
    ids = validation_ads(prep, gate)
    ctx = edit_context(prep, list(data.cold_ads), encoder, group_by=args.group_by)
    nbs = held_out_neighbours(prep, ctx, ids)
    captions = captions_for(prep, encoder, sorted(set(ids) | {n.ad_id for v in nbs.values() for n in v}))
    with build_lm(lm_settings) as handle, dspy.context(lm=handle.lm):
        client = client_for_handle(handle, cache_dir() / "lm-logprobs") if config.mode == "logprobs" else None
        programs = {f"shots-{n}": EditProgram(replace(config, shots=n), client=client) for n in args.shots}
        man = compile_edit(
            prep,
            ctx,
            programs,
            Path(args.out),
            captions,
            settings,
            gate,
            handle.description,
            progress=not args.quiet,
        )
    v = man["validation"]
    print(
        json.dumps(
            {
                k: {**man, **v}[k]
                for k in (
                    "gamma",
                    "chosen",
                    "validation_auc_prior",
                    "validation_auc_edited",
                    "metric_calls",
                    "lm_calls",
                    "parse_failures",
                    "seconds",
                )
            },
            indent=2,
        )
    )
    if man["lm_adds_nothing"]:
        print(
            "llmhyper: gamma is 0: on held-out retired ads the LM's edits do not improve the prior, so the "
            "program's weights equal the prior's",
            file=sys.stderr,
        )
    return 0


def run_run(args: argparse.Namespace) -> int:
    import dspy

    program_path = Path(args.program)
    if not program_path.is_file():
        raise LLMHyperError(f"edit program not found: {program_path} (make one with `llmhyper edit compile`)")
    _, man = load_edit_program(program_path, client=None, mode="text")  # checks the files before any work
    config = EditConfig(**{**man["settings"]["config"], **({"mode": args.mode} if args.mode else {})})
    group_by = man["settings"].get("group_by")
    data, encoder, prep, lm_settings, settings = _setup(args, config, group_by)
    ad_ids = list(data.cold_ads)[: args.limit] if args.limit else list(data.cold_ads)
    ctx = edit_context(prep, ad_ids, encoder, group_by=group_by)
    captions = captions_for(
        prep, encoder, sorted(set(ad_ids) | {n.ad_id for a in ad_ids for n in prep.neighbours[a]})
    )
    with build_lm(lm_settings) as handle, dspy.context(lm=handle.lm):
        client = client_for_handle(handle, cache_dir() / "lm-logprobs") if config.mode == "logprobs" else None
        program, man = load_edit_program(program_path, client, config.mode)
        totals = run_edit(
            prep,
            ctx,
            program,
            man,
            ad_ids,
            Path(args.out),
            captions,
            settings,
            program_path,
            handle.description,
            progress=not args.quiet,
        )
    print(json.dumps(totals, indent=2))
    print(
        f"weights: {Path(args.out) / 'weights'}  (gamma {man['gamma']:.3f}; score them: llmhyper evaluate "
        f"--weights {Path(args.out) / 'weights'})"
    )
    return 0
