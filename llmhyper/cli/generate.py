"""`llmhyper generate`: write LLM-HYPER weights for cold ads into a resumable run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmhyper.cli.common import (
    add_data_args,
    data_settings,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from llmhyper.hyper.generate import run_generate
from llmhyper.hyper.program import DEFAULT_PROGRAM
from llmhyper.hyper.settings import GenerateSettings, judge_settings_for
from llmhyper.llm.settings import DEFAULT_MAX_TOKENS, DEFAULT_THREADS, EMBEDDED_FREQUENCY_PENALTY, LMSettings


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="write LLM-HYPER weights for cold ads (resumable)",
        description="Write LLM-HYPER weights for cold ads into a run folder. Rerun the same "
        "command to resume; finished ads are never redone.",
    )
    add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--program", help=f"compiled program JSON (default: {DEFAULT_PROGRAM.name})")
    p.add_argument("--lm", default="embedded", help="'embedded' or any DSPy model, e.g. openai/gpt-4o")
    p.add_argument("--judge-lm", help="LM for the judge (default: the same as --lm)")
    p.add_argument("--api-base", help="OpenAI-compatible endpoint for --lm (vLLM, Ollama, ...)")
    p.add_argument("--limit", type=positive_int, help="only the first N cold ads (in data order)")
    p.add_argument("--ads", help="comma-separated ad ids to generate")
    p.add_argument("--samples", type=positive_int, default=1, help="samples per feature batch, averaged")
    p.add_argument("--batch-size", type=positive_int, default=10, help="features per LLM call")
    p.add_argument("--no-judge", action="store_true", help="skip the LLM judge")
    p.add_argument("--hide-titles", action="store_true", help="show genres/date/poster only, not titles")
    p.add_argument(
        "--vision",
        action="store_true",
        help="the LM sees images (a vision LM such as openai/gpt-4o): each ad's image goes into the "
        "prompt; text-only LMs keep the image caption",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=DEFAULT_THREADS,
        help="CPU threads of the embedded LLM server (use 1 when other jobs share the CPU)",
    )
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="temperature of the first sample"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        help="per call; longer answers count as failures",
    )
    p.add_argument(
        "--frequency-penalty",
        type=finite_float,
        help=f"OpenAI frequency_penalty (default {EMBEDDED_FREQUENCY_PENALTY} for the embedded model, "
        "whose reasoning otherwise often loops until max_tokens; the model's own default for "
        "other LMs)",
    )
    p.add_argument("--force", action="store_true", help="continue a run folder made with other settings")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="ads in flight at once (default 1). Any OpenAI-compatible server (vLLM, Ollama, a hosted API) "
        "is called by N threads; the embedded model gets N servers that share --threads (one thread "
        "at least each). With --ray: ads in flight over the Ray actors",
    )
    p.add_argument(
        "--retries",
        type=non_negative_int,
        help="DSPy's retries of one LM call on HTTP 429, 5xx, timeouts and dropped connections, with "
        "exponential backoff or the server's Retry-After (default: DSPy's 3; 1 for the embedded model)",
    )
    p.add_argument(
        "--ad-retries",
        type=non_negative_int,
        default=2,
        help="reruns of an ad whose LM call still failed that way (its answered calls come from the "
        "cache; each rerun is recorded in the ad's record)",
    )
    p.add_argument(
        "--retry-wait",
        type=non_negative_float,
        default=2.0,
        help="seconds before the first rerun of an ad, doubled each time (capped at 60), unless the "
        "server sends Retry-After",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="run the ads as Ray actors (pip extra 'ray'); this process still writes the run folder",
    )
    p.add_argument(
        "--ray-address",
        help="with --ray: join this cluster ('auto', 'ray://HOST:10001'); default: a local Ray",
    )
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> GenerateSettings:
    lm = LMSettings(
        spec=args.lm,
        api_base=args.api_base,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        frequency_penalty=args.frequency_penalty,
        n_threads=args.threads,
        num_retries=args.retries,
    )
    ads = None if args.ads is None else tuple(a.strip() for a in args.ads.split(",") if a.strip())
    return GenerateSettings(
        out=Path(args.out),
        data=data_settings(args),
        k=args.k,
        encoder=args.encoder,
        lm=lm,
        judge_lm=judge_settings_for(lm, args.judge_lm),
        program=Path(args.program) if args.program is not None else None,
        batch_size=args.batch_size,
        samples=args.samples,
        judge=not args.no_judge,
        hide_titles=args.hide_titles,
        vision=args.vision,
        limit=args.limit,
        ads=ads,
        force=args.force,
        workers=args.workers,
        ad_retries=args.ad_retries,
        retry_wait=args.retry_wait,
        ray=args.ray,
        ray_address=args.ray_address,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    totals = run_generate(settings)
    weights = settings.out / "weights"
    print(json.dumps(totals, indent=2))
    print(f"weights: {weights}  (score them: llmhyper evaluate --weights {weights})")
    return 0
