"""The former home of the LLM code, kept so that `from llmhyper.llm.models import ...` still works.

New code imports from where things live: `llm.settings` (LMSettings and every default), `llm.embedded`
(the model slices and the llama.cpp server), `llm.build` (build_lm, LMHandle) and `llm.calls` (lm_usage,
lm_calls).
"""

from __future__ import annotations

from llmhyper.llm.build import EndpointLM, LMHandle, build_lm, sibling_lm
from llmhyper.llm.calls import lm_calls, lm_usage
from llmhyper.llm.embedded import (
    EMBEDDED_MODEL,
    EMBEDDED_MODEL_NAME,
    EMBEDDED_MODEL_SHA256,
    EMBEDDED_MODEL_SIZE,
    EMBEDDED_SLICE_PACKAGES,
    EmbeddedModelSpec,
    EmbeddedServer,
    ensure_embedded_model,
)
from llmhyper.llm.settings import DEFAULT_MAX_TOKENS, EMBEDDED_FREQUENCY_PENALTY, LMSettings, LMSpecError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "EMBEDDED_FREQUENCY_PENALTY",
    "EMBEDDED_MODEL",
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_MODEL_SHA256",
    "EMBEDDED_MODEL_SIZE",
    "EMBEDDED_SLICE_PACKAGES",
    "EmbeddedModelSpec",
    "EmbeddedServer",
    "EndpointLM",
    "LMHandle",
    "LMSettings",
    "LMSpecError",
    "build_lm",
    "ensure_embedded_model",
    "lm_calls",
    "lm_usage",
    "sibling_lm",
]
