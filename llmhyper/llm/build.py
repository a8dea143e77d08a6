"""Building LMs: `build_lm(LMSettings)` gives a ready ``dspy.LM`` (the embedded server, or any DSPy model)
in an `LMHandle` that says what a run manifest should record and what must be closed.

DSPy's response cache leaves `api_base` out of its key, so two servers that serve a model of the same name
would answer from each other's cache. Every LM built here is an `EndpointLM`, whose calls carry their
endpoint in the cache key (through the rollout id, which DSPy keys on and never sends): a changed or dead
endpoint is never answered from another server's cache. The embedded model's endpoint is its SHA-256 (its
port changes with every start), so its cache still survives restarts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import dspy

from llmhyper.llm.embedded import EMBEDDED_MODEL, EmbeddedServer, ensure_embedded_model, xllamacpp_version
from llmhyper.llm.progress import install_truncation_note
from llmhyper.llm.settings import LMSettings, LMSpecError

# litellm (imported by dspy) otherwise fetches its model cost map from the network on import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_SCOPE_KEYS = {"endpoint", "rollout"}


class EndpointLM(dspy.LM):
    """A ``dspy.LM`` whose response-cache key names its endpoint (`cache_scope`)."""

    def __init__(self, model: str, *, cache_scope: str = "", **kwargs: Any):
        super().__init__(model, **kwargs)
        self.cache_scope = cache_scope

    def _scoped(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        inner = kwargs.get("rollout_id", self.kwargs.get("rollout_id"))
        return {**kwargs, "rollout_id": {"endpoint": self.cache_scope, "rollout": inner}}

    def __call__(self, prompt=None, *, messages=None, **kwargs):
        return super().__call__(prompt, messages=messages, **self._scoped(kwargs))

    async def acall(self, prompt=None, *, messages=None, **kwargs):
        return await super().acall(prompt, messages=messages, **self._scoped(kwargs))

    def _warn_zero_temp_rollout(self, temperature, rollout_id):
        # DSPy warns about a rollout id at temperature 0; only the caller's own rollout id counts
        if isinstance(rollout_id, dict) and set(rollout_id) == _SCOPE_KEYS:
            rollout_id = rollout_id["rollout"]
        super()._warn_zero_temp_rollout(temperature, rollout_id)

    def dump_state(self) -> dict[str, Any]:
        return {**super().dump_state(), "cache_scope": self.cache_scope}


def unscoped_rollout(rollout_id: Any) -> Any:
    """The caller's rollout id inside an `EndpointLM` call's scoped one (for call logs)."""
    if isinstance(rollout_id, dict) and set(rollout_id) == _SCOPE_KEYS:
        return rollout_id["rollout"]
    return rollout_id


@dataclass
class LMHandle:
    """A ready ``dspy.LM`` plus what a run manifest should record about it, and what must be closed."""

    lm: Any
    description: dict[str, Any]
    server: EmbeddedServer | None = None
    settings: LMSettings | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Release what the LM holds (the embedded server); idempotent. The LM cannot be called afterwards."""
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> LMHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FIELDS = {f.name for f in fields(LMSettings)}


def build_lm(
    settings: LMSettings | str = "embedded", *, api_key: str | None = None, **overrides: Any
) -> LMHandle:
    """A ``dspy.LM`` for `settings` (an `LMSettings`, or a spec string plus `LMSettings` fields as keyword
    arguments: ``build_lm("openai/gpt-4o", temperature=0.7)``). Other keyword arguments (``top_p``, ...) go
    to ``dspy.LM``. `api_key` overrides `settings.api_key_env`; for "embedded" it is ignored (the local
    server gets a random per-process bearer token).

    The DSPy response cache stays on by default, so identical calls to the same endpoint are answered from
    it; pass ``rollout_id=k`` (and temperature > 0) per call to draw fresh samples. A fixed ``seed`` makes
    sampled calls reproducible, but then every rollout of the same prompt gets the same answer from llama.cpp.
    """
    install_truncation_note()  # DSPy's "increase max_tokens" warning reads like an error; say what happens
    if isinstance(settings, str):
        settings = LMSettings(spec=settings)
    known = {k: overrides.pop(k) for k in list(overrides) if k in _FIELDS}
    settings = replace(settings, **known).validate()
    extra = dict(overrides)
    if settings.embedded:
        return _build_embedded(settings, extra)
    return _build_remote(settings, api_key if api_key is not None else settings.api_key(), extra)


def _lm_kwargs(settings: LMSettings, extra: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "cache": settings.cache,
    }
    for key, value in (
        ("frequency_penalty", settings.penalty),
        ("timeout", settings.effective_timeout),
        ("num_retries", settings.effective_retries),
        ("seed", settings.seed),
    ):
        if value is not None:
            kw[key] = value
    return {**kw, **extra}


def _describe(settings: LMSettings, extra: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "spec": settings.spec,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "cache": settings.cache,
    }
    if settings.penalty is not None:
        out["frequency_penalty"] = settings.penalty
    if settings.seed is not None:
        out["seed"] = settings.seed
    if "top_p" in extra:
        out["top_p"] = extra["top_p"]
    return out


def _shown_path(path: Path) -> str:
    """The model file as a manifest shows it: under the home folder as ~/..., so committed runs hold no
    user's absolute path."""
    try:
        return str(Path("~") / Path(path).resolve().relative_to(Path.home().resolve()))
    except (ValueError, RuntimeError):  # outside the home folder, or no home
        return str(path)


def _build_embedded(settings: LMSettings, extra: dict[str, Any]) -> LMHandle:
    path = ensure_embedded_model()
    server = EmbeddedServer(
        path, n_threads=settings.n_threads, n_ctx=settings.n_ctx, model_alias=EMBEDDED_MODEL.name
    )
    try:
        lm = _embedded_lm(server, settings, extra)
    except BaseException:
        server.close()
        raise
    description = {
        **_describe(settings, extra),
        "model": EMBEDDED_MODEL.name,
        "sha256": EMBEDDED_MODEL.sha256,
        "model_file": _shown_path(path),
        "api_base": server.base_url,
        "runtime": xllamacpp_version(),
        "n_threads": settings.n_threads,
        "n_ctx": settings.n_ctx,
    }
    handle = LMHandle(lm=lm, description=description, server=server, settings=settings)
    handle._closers.append(server.close)
    return handle


def _embedded_lm(server: EmbeddedServer, settings: LMSettings, extra: dict[str, Any]) -> EndpointLM:
    # "hosted_vllm/" (not "openai/"): with it DSPy's native engine sends `max_tokens`, the field every
    # llama.cpp server reads as n_predict. "openai/" sends `max_completion_tokens` instead; the llama.cpp
    # inside xllamacpp 2026.10.11549 honours that too (checked: both stop at 5 tokens), but it is the newer
    # field, which older llama.cpp builds and other local servers may ignore. hosted_vllm is also a generic
    # OpenAI-compatible route: no OpenAI-specific model-name rules.
    return EndpointLM(
        f"hosted_vllm/{EMBEDDED_MODEL.name}",
        api_base=server.base_url,
        api_key=server.api_key,
        cache_scope=f"embedded:{EMBEDDED_MODEL.sha256}",
        **_lm_kwargs(settings, extra),
    )


def _build_remote(settings: LMSettings, api_key: str | None, extra: dict[str, Any]) -> LMHandle:
    client: dict[str, Any] = {}
    if settings.api_base is not None:
        client["api_base"] = settings.api_base
    if api_key is not None:
        client["api_key"] = api_key
    try:
        lm = EndpointLM(
            settings.spec,
            cache_scope=f"remote:{settings.api_base or 'default'}",
            **client,
            **_lm_kwargs(settings, extra),
        )
    except (ValueError, TypeError) as exc:  # DSPy refuses some model strings and settings at construction
        raise LMSpecError(f"LM {settings.spec!r}: {exc}") from None
    description = {
        **_describe(settings, extra),
        "model": settings.spec.split("/", 1)[1],
        "api_base": settings.api_base,
    }
    return LMHandle(lm=lm, description=description, settings=settings)


def sibling_lm(handle: LMHandle, settings: LMSettings, **extra: Any) -> LMHandle:
    """A second LM with other settings (temperature, max_tokens, ...) on the embedded server `handle`
    already runs, so one model sits in memory; a remote `settings` is simply built. Closing the sibling
    leaves the server to `handle`."""
    settings = settings.validate()
    if not (settings.embedded and handle.server is not None):
        return build_lm(settings, **extra)
    lm = _embedded_lm(handle.server, settings, extra)
    description = {
        **handle.description,
        **_describe(settings, extra),
        "shares_server_with": handle.description.get("spec"),
    }
    return LMHandle(lm=lm, description=description, settings=settings)
