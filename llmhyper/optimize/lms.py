"""The compile's two LMs from a recipe (through `llm.models.build_lm`), and the DSPy response cache kept in
the evolution folder while GEPA runs (what makes a resumed compile free)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dspy

from llmhyper.llm.models import LMHandle, LMSettings, build_lm, sibling_lm
from llmhyper.optimize.recipe import LMSection, Recipe


def _settings(lm: LMSection, threads: int | None, n_ctx: int) -> dict:
    return {
        "api_base": lm.api_base,
        "api_key_env": lm.api_key_env,
        "temperature": lm.temperature,
        "max_tokens": lm.max_tokens,
        "n_threads": threads or lm.threads,
        "n_ctx": n_ctx,
        "cache": lm.cache,
        "timeout": lm.timeout,
    }


def build_lms(recipe: Recipe, threads: int | None = None) -> tuple[LMHandle, LMHandle]:
    """(task handle, reflection handle). Two embedded LMs share one server (one model in memory)."""
    t, r = recipe.task_lm, recipe.reflection_lm
    both_embedded = t.spec == r.spec == "embedded"
    task = build_lm(t.spec, **_settings(t, threads, max(t.n_ctx, r.n_ctx) if both_embedded else t.n_ctx))
    try:
        # the reflection LM rewrites whole instructions, which repeat their words: no frequency penalty
        penalty = 0.0 if r.spec == "embedded" else None
        settings = LMSettings(spec=r.spec, frequency_penalty=penalty, **_settings(r, threads, r.n_ctx))
        refl = sibling_lm(task, settings)
    except BaseException:
        task.close()
        raise
    if both_embedded:
        refl.description["shares_server_with"] = "task_lm"
    return task, refl


@contextmanager
def response_cache(folder: Path) -> Iterator[None]:
    """DSPy's response cache on disk in `folder` while the block runs; afterwards the cache configured
    before (its tiers, folder and memory size) is configured again."""
    old = dspy.cache
    before = {
        "enable_disk_cache": old.enable_disk_cache,
        "enable_memory_cache": old.enable_memory_cache,
        "disk_cache_dir": old.disk_cache_dir,
    }
    if isinstance(getattr(old.memory_cache, "maxsize", None), (int, float)):
        before["memory_max_entries"] = old.memory_cache.maxsize
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(folder))
    try:
        yield
    finally:
        ours = dspy.cache
        dspy.configure_cache(**before)
        close = getattr(ours.disk_cache, "close", None)
        if callable(close):  # release the evolution folder's cache files
            close()
