"""One ad's LM work, and many ads in flight at once.

The ad is the unit of work, in three steps:
- `ad_job` (the driver): what the program sees of the ad (its view, its demonstrations, the features);
- `ask` (any thread, or a Ray actor): the program on that job, with the ad's own copies of the LMs
  (`dspy.LM.copy()` shares the connection pool but not the call history), so the calls, tokens and
  retries of each ad are counted and logged apart even when many ads share one LM at the same time;
- `finish` (the driver): the answer becomes the ad's record (prior fill, L2 norm, intercept shift).
`run_local` runs `ask` for many ads on N threads (each in a copy of the caller's context, so the
caller's `dspy.context` settings hold in every thread, as in DSPy's own Parallel) and hands the answers
to the calling thread as they complete; only that thread writes the run folder.

Transient LM errors (HTTP 429, 5xx, timeouts, dropped connections) are retried inside each call by DSPy
itself (`LMSettings.num_retries`, `--retries`: exponential backoff 1, 2, 4, ... 60 s, or the server's
Retry-After), which keeps no trace of them. A call that still fails makes `ask` wait and run the ad again
(`AdRetry`); the ad's calls that had succeeded are answered from DSPy's response cache then, so only the
failed call reaches the server again. Each such rerun is recorded in the ad's record ("retries").
"""

from __future__ import annotations

import contextvars
import copy
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import dspy
from dspy.utils.exceptions import is_retryable_lm_error

from llmhyper.ctr.prepare import Prepared
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.views import ad_view, demonstrations, finish_ad
from llmhyper.llm.build import LMHandle
from llmhyper.llm.calls import lm_calls, lm_usage

# what a record keeps of the program's answer (besides the weights, which `finish_ad` turns into its own)
ANSWER_FIELDS = (
    "spread",
    "n_samples_ok",
    "failed_features",
    "reasoning",
    "judge",
    "flags",
    "calls",
    "parse_failures",
    "batches",
)


@dataclass(frozen=True)
class Lane:
    """The LMs one worker calls: the task LM and the judge's (the same handle when the judge shares it)."""

    lm: LMHandle
    judge: LMHandle


@dataclass(frozen=True)
class AdRetry:
    """Reruns of an ad whose LM call failed with a transient error even after DSPy's own retries."""

    times: int = 2
    wait: float = 2.0  # seconds before the first rerun, doubled each time, unless the server says
    cap: float = 60.0

    def delay(self, exc: BaseException, attempt: int) -> float:
        hint = getattr(exc, "retry_after", None)  # DSPy's LM errors carry the server's Retry-After
        if (
            isinstance(hint, (int, float))
            and not isinstance(hint, bool)
            and math.isfinite(hint)
            and hint >= 0
        ):
            return float(min(hint, self.cap))
        return float(min(self.wait * 2**attempt, self.cap))


@dataclass(frozen=True)
class AdJob:
    """What the program sees of one ad (plain data: it travels to threads and Ray actors)."""

    ad_id: str
    view: dict[str, Any]
    examples: list[dict[str, Any]]
    features: list[dict[str, str]]


@dataclass
class Asked:
    """The program's answer for one ad (None when it failed: `reason` says why) and what it cost."""

    answer: dict[str, Any] | None
    reason: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    retries: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    fatal: str | None = None  # an llmhyper error in a Ray actor, raised again by the driver


def ad_job(prep: Prepared, ad_id: str, captions: dict[str, str], features: list[dict[str, str]]) -> AdJob:
    return AdJob(ad_id, ad_view(prep, ad_id, captions), demonstrations(prep, ad_id, captions), features)


def ask(program: Any, lane: Lane, job: AdJob, retry: AdRetry) -> Asked:
    """Run the program on one ad with the ad's own LM copies; LM trouble becomes a failed answer (after
    `retry`), never an exception. An llmhyper error (a broken setting) is raised."""
    lm = lane.lm.lm.copy()
    prog, judge = program, None
    if getattr(program, "judge_lm", None) is not None:  # the judge runs on an LM of its own
        judge = lm if lane.judge.lm is lane.lm.lm else lane.judge.lm.copy()
        prog = copy.copy(program)  # shares the predictors; only this ad's judge LM differs
        prog.judge_lm = judge
    t0 = time.time()
    answer, reason, retries = None, None, []
    for attempt in range(retry.times + 1):
        try:
            with dspy.context(lm=lm):
                pred = prog(ad=job.view, examples=job.examples, features=job.features)
            answer = {"weights": dict(pred.weights), **{k: getattr(pred, k) for k in ANSWER_FIELDS}}
            break
        except LLMHyperError:
            raise
        except Exception as exc:  # noqa: BLE001 - one ad's trouble (server error, bug in a reply) must not stop the run
            if attempt < retry.times and is_retryable_lm_error(exc):
                wait = retry.delay(exc, attempt)
                retries.append(
                    {
                        "error": type(exc).__name__,
                        "status": getattr(exc, "status", None),
                        "message": _short(exc),
                        "wait_s": round(wait, 2),
                    }
                )
                time.sleep(wait)
                continue
            reason = f"{type(exc).__name__}: {exc}"
            break
    lms = [lm] + ([judge] if judge is not None and judge is not lm else [])
    usage = [lm_usage(x) for x in lms]
    return Asked(
        answer,
        reason,
        calls=[c for x in lms for c in lm_calls(x)],
        tokens={k: sum(u.get(k, 0) for u in usage) for k in ("prompt_tokens", "completion_tokens")},
        seconds=round(time.time() - t0, 2),
        retries=retries,
        model=lane.lm.description.get("model"),
    )


def finish(prep: Prepared, ad_id: str, asked: Asked, names: list[str]) -> dict[str, Any]:
    """The ad's record from its answer."""
    data = prep.data
    record: dict[str, Any] = {
        "ad_id": ad_id,
        "title": data.ad_by_id[ad_id].title,
        "neighbours": [
            {
                "id": n.ad_id,
                "title": data.ad_by_id[n.ad_id].title,
                "similarity": round(float(n.similarity), 4),
            }
            for n in prep.neighbours[ad_id]
        ],
    }
    if asked.answer is None:
        record.update({"status": "failed", "reason": asked.reason})
    else:
        try:
            record.update(finish_ad(prep, ad_id, SimpleNamespace(weights=asked.answer["weights"]), names))
            record.update({k: v for k, v in asked.answer.items() if k != "weights"})
        except LLMHyperError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a reply no code path expected: this ad fails, the run goes on
            record.update({"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    record.update(
        {"seconds": asked.seconds, "tokens": asked.tokens, "lm": asked.model, "retries": asked.retries}
    )
    return record


def run_local(
    jobs: list[AdJob], work: Callable[[AdJob, int], Asked], workers: int
) -> Iterator[tuple[AdJob, Asked, bool]]:
    """(job, answer, more) for every job as it completes, `work(job, worker_no)` running on `workers`
    threads (one: in the calling thread, in order); `more`: other answers are already waiting. An error in a worker stops the taking of new ads; the ads
    in flight finish and are handed over, then the error is raised. A Ctrl-C of the caller hands over
    the answers already there and stops at once (the daemon threads die with the process)."""
    n = min(workers, len(jobs))
    if n <= 1:
        for job in jobs:
            yield job, work(job, 0), False
        return
    todo: queue.SimpleQueue[AdJob] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    done: queue.SimpleQueue[tuple[AdJob, Asked | None, BaseException | None] | None] = queue.SimpleQueue()
    stop = threading.Event()

    def loop(worker_no: int) -> None:
        try:
            while not stop.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((job, work(job, worker_no), None))
                except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, raised there
                    stop.set()
                    done.put((job, None, exc))
                    return
        finally:
            done.put(None)

    for i in range(n):
        ctx = contextvars.copy_context()  # one per thread: a context is entered by one thread at a time
        threading.Thread(target=ctx.run, args=(loop, i), name=f"llmhyper-ad-{i}", daemon=True).start()
    alive, error = n, None
    try:
        while alive:
            item = done.get()
            if item is None:
                alive -= 1
            elif item[2] is not None:
                error = item[2] if error is None else error
            else:
                yield item[0], item[1], not done.empty()  # type: ignore[misc]
    except KeyboardInterrupt:
        stop.set()
        while True:  # what is already answered is still written
            try:
                item = done.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[2] is None:
                yield item[0], item[1], True  # type: ignore[misc]
        raise
    finally:
        stop.set()
    if error is not None:
        raise error


def _short(exc: BaseException, n: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + "..."
