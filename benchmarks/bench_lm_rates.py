"""The embedded LLM's raw rates on this machine: prompt tokens/s and generated tokens/s, plain, under a
GBNF grammar, and with token log-probabilities (what the edit program's logprobs mode asks for).

    .venv/bin/python benchmarks/bench_lm_rates.py [--threads 2] [--prompt-words 120] [--max-tokens 120]

Run it on a quiet machine: every figure of an LLM call's time in BENCHMARKS.md follows from these two rates
(time = uncached prompt tokens / prompt rate + generated tokens / generation rate). Each case starts with a
different first word, so no case reuses another's cached prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import update_section


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=120)
    args = ap.parse_args()

    from llmhyper.llm.embedded import EmbeddedServer
    from llmhyper.llm.logprobs import grammar_for

    names = [f"feature_{i}" for i in range(40)]
    text = " ".join(f"word{i} is a thing about movies and users." for i in range(args.prompt_words))
    cases = [
        ("plain", {}),
        ("grammar", {"grammar": grammar_for(names)}),
        ("grammar + logprobs", {"grammar": grammar_for(names), "logprobs": True, "top_logprobs": 10}),
    ]
    rows = []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with EmbeddedServer(n_threads=args.threads) as srv:
        for label, extra in cases:
            body = {
                "messages": [{"role": "user", "content": f"{label}: {text}\nList the features."}],
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                **extra,
            }
            req = urllib.request.Request(
                srv.base_url + "/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {srv.api_key}"},
            )
            t0 = time.perf_counter()
            reply = json.loads(opener.open(req, timeout=900).read())
            wall = time.perf_counter() - t0
            t = reply["timings"]
            rows.append(
                {
                    "case": f"{label}, {args.threads} thread(s)",
                    "prompt tokens": t["prompt_n"],
                    "prompt tok/s": round(t["prompt_per_second"], 1),
                    "generated tokens": t["predicted_n"],
                    "generated tok/s": round(t["predicted_per_second"], 1),
                    "wall s": round(wall, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    update_section(
        "lm_rates",
        "Embedded LLM rates (Qwen2.5-Coder-1.5B Q4_K_M, llama.cpp via xllamacpp)",
        "Prompt and generation rates of one request each, nothing cached. A grammar and log-probabilities "
        "cost next to nothing; the rates themselves are the limit, so the edit program's digits layout cuts "
        "tokens (see the edit program's per-ad breakdown).",
        ["prompt tokens", "prompt tok/s", "generated tokens", "generated tok/s", "wall s"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
