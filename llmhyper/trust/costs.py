"""What the trust studies cost in LLM calls and time, before running them.

The unit is one ad of `llmhyper generate` (ceil(features / batch size) x samples weight calls + 1 judge call;
about 90 s per ad with the embedded 1.5B model on 2 busy CPU cores): a call costs seconds_per_ad / calls
per ad.
Judge rejections add regeneration calls on top (not counted: they depend on the judge's verdicts); with the
DSPy cache on, calls identical to earlier ones (same LM, prompt and settings) are free.
"""

from __future__ import annotations

import math
from typing import Any

SECONDS_PER_AD = 90.0


def generation_calls(n_features: int = 40, batch_size: int = 10, samples: int = 1, judge: bool = True) -> int:
    return math.ceil(n_features / batch_size) * samples + int(judge)


def estimate(
    n_ads: int = 97,
    *,
    n_features: int = 40,
    batch_size: int = 10,
    samples: int = 1,
    judge: bool = True,
    seconds_per_ad: float = SECONDS_PER_AD,
    scope: str = "batch",
    targets_per_ad: int = 1,
    n_types: int = 3,
    ablation_variants: int = 5,
    ablation_reused: int = 0,
) -> dict[str, Any]:
    """LLM calls and hours of each study on `n_ads` ads (see the module's note on what is not counted)."""
    per_ad = generation_calls(n_features, batch_size, samples, judge)
    per_call = seconds_per_ad / per_ad
    batches = math.ceil(n_features / batch_size)

    def row(calls_per_ad: float, note: str) -> dict[str, Any]:
        calls = calls_per_ad * n_ads
        return {
            "llm_calls_per_ad": calls_per_ad,
            "llm_calls": int(round(calls)),
            "hours": round(calls * per_call / 3600, 2),
            "note": note,
        }

    # robustness: per (ad, target) one original + per type one rewrite and one program run
    program_run = (samples + int(judge)) if scope == "batch" else per_ad
    robust = targets_per_ad * (program_run + n_types * (1 + program_run))
    generated = ablation_variants - ablation_reused
    return {
        "assumptions": {
            "ads": n_ads,
            "features": n_features,
            "batch_size": batch_size,
            "samples": samples,
            "judge": judge,
            "generation_calls_per_ad": per_ad,
            "seconds_per_ad": seconds_per_ad,
            "seconds_per_call": round(per_call, 1),
        },
        "generate (main run)": row(per_ad, "the run the other studies read"),
        "explain": row(
            batches, "Consistency Rate: one stance-judge call per batch (HitRate/Coverage: no LLM)"
        ),
        "robustness": row(
            robust,
            f"scope={scope}: per target an original + {n_types} x (rewrite + program "
            f"run of {program_run} calls)",
        ),
        "ablation": row(
            generated * per_ad,
            f"{generated} generated variants x a full program run "
            "(5-shot prompts are longer, 0-shot shorter)",
        ),
    }
