"""Usage and call records from ``lm.history``: token totals and JSON-safe per-call entries for a run's log."""

from __future__ import annotations

from typing import Any

from llmhyper.llm.build import unscoped_rollout
from llmhyper.store import jsonable


def _usage_value(usage: Any, key: str) -> int:
    if usage is None:
        return 0
    value = usage.get(key) if isinstance(usage, dict) else getattr(usage, key, None)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def lm_usage(lm: Any, since: int = 0) -> dict[str, int]:
    """Token totals over ``lm.history[since:]``: calls, prompt/completion/total tokens. Calls answered from
    the DSPy cache carry no usage, so they add to ``calls`` but not to the token counts."""
    entries = list(getattr(lm, "history", []) or [])[since:]
    prompt = sum(_usage_value(e.get("usage"), "prompt_tokens") for e in entries)
    completion = sum(_usage_value(e.get("usage"), "completion_tokens") for e in entries)
    return {
        "calls": len(entries),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def lm_calls(lm: Any, since: int = 0) -> list[dict[str, Any]]:
    """JSON-safe records of ``lm.history[since:]`` for a per-run call log: timestamp, uuid, model, messages
    (or the plain prompt), outputs, usage and the per-call kwargs (the LM's own settings are in
    `LMHandle.description`)."""
    records = []
    for entry in list(getattr(lm, "history", []) or [])[since:]:
        messages = entry.get("messages")
        if messages is None and entry.get("prompt") is not None:
            messages = [{"role": "user", "content": entry.get("prompt")}]
        usage = entry.get("usage")
        if isinstance(usage, dict):
            usage = {k: v for k, v in usage.items() if v is not None}
        kwargs = entry.get("kwargs")
        if isinstance(kwargs, dict) and "rollout_id" in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != "rollout_id"}
            if (rollout := unscoped_rollout(entry["kwargs"]["rollout_id"])) is not None:
                kwargs["rollout_id"] = rollout
        records.append(
            jsonable(
                {
                    "timestamp": entry.get("timestamp"),
                    "uuid": entry.get("uuid"),
                    "model": entry.get("model"),
                    "response_model": entry.get("response_model"),
                    "messages": messages,
                    "outputs": entry.get("outputs"),
                    "usage": usage,
                    "kwargs": kwargs,
                }
            )
        )
    return records
