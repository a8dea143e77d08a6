"""What a long LLM job says while it runs: one stderr line per LLM call (`LMProgress`, a DSPy callback), and
DSPy's "LM response was truncated" warning turned into one line that says what happens next.

A small local model answers one call in seconds to minutes, so a progress bar that moves once per ad can sit
at 0% for many minutes; the per-call line shows the job is alive and what each call costs:

    llmhyper: LLM call 12: 41.3 s, 1,532 prompt + 311 completion tokens
    llmhyper: LLM call 13: 52.0 s, 1,540 prompt + 320 completion tokens, cut at max_tokens=320
    llmhyper: LLM call 14: 0.0 s, from the cache

Use: ``dspy.configure(callbacks=[LMProgress()])`` (or ``with dspy.context(callbacks=[LMProgress()]):``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any, TextIO

from dspy.utils.callback import BaseCallback

TRUNCATION_LOGGER = "dspy.clients.lm"  # DSPy 3.4 logs "LM response was truncated; increase max_tokens ..."
TRUNCATION_NOTE = (
    "llmhyper: an LLM answer hit its max_tokens limit and was cut off. This is handled: what can be read "
    "from it is kept, the rest is asked again, and an unreadable answer counts as a parse failure in the "
    "run's record (a few are normal for a small model; raise --max-tokens if most calls are cut). Later cut "
    "answers are not repeated here (LMProgress marks them 'cut at max_tokens')."
)

# the LM call running in this context: DSPy logs the truncation inside the call, the callback reads it after
_current_call: ContextVar[dict[str, Any] | None] = ContextVar("llmhyper_lm_call", default=None)


def _emit(line: str, stream: TextIO | None) -> None:
    out = stream if stream is not None else sys.stderr
    try:
        from tqdm import tqdm  # print above a running progress bar instead of through it

        tqdm.write(line, file=out)
    except ImportError:  # pragma: no cover - tqdm comes with dspy
        print(line, file=out, flush=True)


def _int(usage: Any, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, dict) else getattr(usage, key, None)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _usage_of(lm: Any, outputs: Any) -> dict[str, Any] | None:
    """The usage DSPy recorded for the call that returned `outputs` (the history entry holds the same list
    object, so concurrent calls on one LM are not mixed up); None when history is off or holds no entry."""
    history = list(getattr(lm, "history", None) or [])
    for entry in reversed(history[-64:]):
        if isinstance(entry, dict) and entry.get("outputs") is outputs:
            usage = entry.get("usage")
            return usage if isinstance(usage, dict) else {}
    return None


class LMProgress(BaseCallback):
    """A DSPy callback: one stderr line per LLM call with its number, seconds, prompt and completion tokens
    (from the LM's history), 'from the cache' for a cached answer, 'cut at max_tokens=N' for a truncated one,
    and the error for a failed one. Thread-safe; numbers count from 1 per instance."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "llmhyper: LLM call"):
        self.stream, self.prefix = stream, prefix
        self.calls = self.prompt_tokens = self.completion_tokens = self.truncated = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._open: dict[str, tuple[int, float, Any, dict[str, Any]]] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        state: dict[str, Any] = {"truncated": False}
        with self._lock:
            self.calls += 1
            self._open[call_id] = (self.calls, time.perf_counter(), instance, state)
        _current_call.set(state)

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            opened = self._open.pop(call_id, None)
        if opened is None:
            return
        number, t0, lm, state = opened
        if _current_call.get() is state:
            _current_call.set(None)
        seconds = time.perf_counter() - t0
        line = f"{self.prefix} {number}: {seconds:.1f} s"
        if exception is not None:
            line += f", failed: {type(exception).__name__}: {' '.join(str(exception).split())[:160]}"
        else:
            usage = _usage_of(lm, outputs)
            prompt = _int(usage, "prompt_tokens") if usage else None
            completion = _int(usage, "completion_tokens") if usage else None
            if usage == {}:
                line += ", from the cache"
            elif prompt is not None or completion is not None:
                line += f", {prompt or 0:,} prompt + {completion or 0:,} completion tokens"
            if state["truncated"]:
                kwargs = getattr(lm, "kwargs", None) or {}
                limit = kwargs.get("max_tokens", kwargs.get("max_completion_tokens"))
                line += f", cut at max_tokens={limit}" if limit is not None else ", cut at max_tokens"
            with self._lock:
                self.prompt_tokens += prompt or 0
                self.completion_tokens += completion or 0
                self.truncated += bool(state["truncated"])
        with self._lock:
            self.seconds += seconds
        _emit(line, self.stream)


class TruncationNote(logging.Filter):
    """On DSPy's truncation logger: the first "LM response was truncated" warning becomes `TRUNCATION_NOTE`
    (it reads like a setting the user must fix, but a cut answer is retried or counted as a failure), later
    ones are dropped; every one marks the running call for `LMProgress` and is counted in `count`."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if "truncated" not in str(record.msg):
            return True
        state = _current_call.get()
        if state is not None:
            state["truncated"] = True
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            record.msg, record.args = TRUNCATION_NOTE, ()
        return first


def install_truncation_note() -> TruncationNote:
    """Put one `TruncationNote` on DSPy's truncation logger (idempotent; returns the one installed)."""
    logger = logging.getLogger(TRUNCATION_LOGGER)
    for f in logger.filters:
        if isinstance(f, TruncationNote):
            return f
    note = TruncationNote()
    logger.addFilter(note)
    return note
