"""The one table of LM settings: every default an LM of llmhyper gets is decided here.

`generate`, the trust studies and the compile recipes all describe their LMs with an `LMSettings`; `build_lm`
turns one into a ready ``dspy.LM``. What a run records about its LM (and compares on resume) is `record()`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from llmhyper.errors import LLMHyperError

EMBEDDED = "embedded"
DEFAULT_MAX_TOKENS = 320  # per call; longer answers count as failures (the CLI, recipes and trust use it too)
DEFAULT_THREADS = 2  # CPU threads of the embedded llama.cpp server
DEFAULT_N_CTX = 4096
EMBEDDED_TIMEOUT = 600.0  # CPU generation of max_tokens can take minutes under load
EMBEDDED_RETRIES = 1
# Qwen2.5-Coder-1.5B's reasoning often repeats itself until max_tokens, leaving no weights: replaying 4 such
# calls at temperature 0 completed 0/4 without a penalty and 4/4 with frequency_penalty 0.5 (2026-11-25)
EMBEDDED_FREQUENCY_PENALTY = 0.5


class LMSpecError(LLMHyperError, ValueError):
    """LM settings that cannot work (an unknown spec, --api-base for the embedded model, a bad number)."""


@dataclass(frozen=True)
class LMSettings:
    """One LM: "embedded" (the local default) or any DSPy model string ("openai/gpt-4o",
    "hosted_vllm/<model>" with `api_base`, ...). None means "the default decided here"."""

    spec: str = EMBEDDED
    api_base: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the API key (never the key)
    temperature: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    frequency_penalty: float | None = (
        None  # None: EMBEDDED_FREQUENCY_PENALTY for the embedded model, else none
    )
    n_threads: int = DEFAULT_THREADS
    n_ctx: int = DEFAULT_N_CTX
    cache: bool = True  # the DSPy response cache (keyed on the endpoint too, see build_lm)
    timeout: float | None = None  # None: EMBEDDED_TIMEOUT for the embedded model, else DSPy's default
    num_retries: int | None = None  # None: EMBEDDED_RETRIES for the embedded model, else DSPy's default
    seed: int | None = None  # sampling seed sent with every call (then all rollouts of a prompt agree)

    @property
    def embedded(self) -> bool:
        return self.spec == EMBEDDED

    @property
    def penalty(self) -> float | None:
        """The frequency penalty this LM uses: the one place that decides it."""
        if self.frequency_penalty is not None:
            return self.frequency_penalty
        return EMBEDDED_FREQUENCY_PENALTY if self.embedded else None

    @property
    def effective_timeout(self) -> float | None:
        return self.timeout if self.timeout is not None else (EMBEDDED_TIMEOUT if self.embedded else None)

    @property
    def effective_retries(self) -> int | None:
        return (
            self.num_retries
            if self.num_retries is not None
            else (EMBEDDED_RETRIES if self.embedded else None)
        )

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LMSpecError(
                f"the environment variable {self.api_key_env} (the API key of {self.spec}) is not set"
            )
        return key

    def validate(self) -> LMSettings:
        """One-line LMSpecError for settings that cannot work; returns self."""
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise LMSpecError(
                "the LM spec is empty: use 'embedded' or a DSPy model string like 'openai/gpt-4o'"
            )
        if not self.embedded and "/" not in self.spec:
            raise LMSpecError(
                f"LM spec {self.spec!r}: use 'embedded' or a DSPy model string like 'openai/gpt-4o'"
            )
        if self.embedded and self.api_base is not None:
            raise LMSpecError("--api-base is only for remote models; the embedded model runs its own server")
        _number("temperature", self.temperature, low=0.0)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0, optional=True)
        _number("timeout", self.timeout, low=0.0, optional=True, strict=True)
        for name, low in (("max_tokens", 1), ("n_threads", 1), ("n_ctx", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LMSpecError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.num_retries is not None and (not isinstance(self.num_retries, int) or self.num_retries < 0):
            raise LMSpecError(f"num_retries must be a whole number >= 0, got {self.num_retries!r}")
        return self

    def record(self) -> dict[str, Any]:
        """What changes the LM's answers (a run compares it on resume); no key, no thread count."""
        out: dict[str, Any] = {
            "spec": self.spec,
            "api_base": self.api_base,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "frequency_penalty": self.penalty,
        }
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def _number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None = None,
    optional: bool = False,
    strict: bool = False,
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LMSpecError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low) or (high is not None and value > high):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        rng = f"between {low:g} and {high:g}" if high is not None else bound
        raise LMSpecError(f"{name} must be {rng}, got {value!r}")
