"""`llmhyper generate --ray`: the per-ad work in Ray actors; the driver writes the run folder.

    with RayAds(RayWork(...), workers=32, address="auto") as pool:
        run_ads(..., pool.answers, pool.lm_description, pool.judge_description)

Each actor builds its own LMs and program from a `RayWork` (settings, the program's state and an LM
builder: plain, picklable data; an LM itself never travels) and runs `workers.ask` on the ads it is
given, exactly as a local worker thread does. The driver keeps `workers` ads in flight over the actors
and hands each answer, as it arrives, to `generate.run_ads`, which writes the record, the call log and the
artifact exactly as in a local run. So a kill of the driver (which ends its Ray job and the actors)
loses only the ads in flight, and the same command resumes, with or without Ray.

Sizing: as many actors as the cluster has CPUs for them (at most `workers`); LM calls wait on the network,
not on the CPU, so each actor takes one CPU and runs ceil(workers / actors) ads at once in threads. The
embedded model is one llama.cpp server per actor that answers one request at a time: then each actor
takes the server's `n_threads` CPUs and one ad at a time.

`address=None` starts a local Ray on this machine (or reuses one this process started); "auto" or
"ray://HOST:10001" joins a cluster, whose nodes need llmhyper installed (e.g. a runtime_env with
pip: ["llmhyper[ray]"]) and must reach the LM endpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmhyper._lazy import require, start_ray
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.hyper.workers import AdJob, AdRetry, Asked, Lane, ask
from llmhyper.llm.build import LMHandle
from llmhyper.llm.settings import LMSettings

PURPOSE = "llmhyper generate --ray"


def import_ray() -> Any:
    """`ray`, or MissingDependency naming the extra."""
    return require("ray", "ray", PURPOSE)


@dataclass(frozen=True)
class RayWork:
    """What an actor needs to run ads: all picklable (the builder by reference, e.g. `build_lm`)."""

    program_state: dict[str, Any]
    program_config: ProgramConfig
    lm: LMSettings
    judge_lm: LMSettings | None  # None: the judge runs on `lm`
    lm_builder: Callable[[LMSettings], LMHandle]
    retry: AdRetry

    @property
    def embedded(self) -> bool:
        return self.lm.embedded or (self.judge_lm is not None and self.judge_lm.embedded)


class AdActor:
    """Runs `ask` for the ads it is given (wrapped by `ray.remote` at run time)."""

    def __init__(self, work: RayWork):
        self.broken: str | None = None
        self.handles: list[LMHandle] = []
        try:
            lm = work.lm_builder(work.lm)
            self.handles.append(lm)
            judge = lm if work.judge_lm is None else work.lm_builder(work.judge_lm)
            self.handles.append(judge)
            self.program = LLMHyper(work.program_config, judge_lm=None if judge is lm else judge.lm)
            self.program.load_state(copy.deepcopy(work.program_state))
        except LLMHyperError as exc:  # handed to the driver as a one-line error, not a Ray traceback
            self.broken = str(exc)
            return
        self.lane, self.retry = Lane(lm, judge), work.retry

    def describe(self) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
        if self.broken is not None:
            return self.broken, {}, {}
        return None, self.lane.lm.description, self.lane.judge.description

    def ask(self, job: AdJob) -> Asked:
        try:
            return ask(self.program, self.lane, job, self.retry)
        except LLMHyperError as exc:
            return Asked(None, fatal=str(exc))


class RayAds:
    """Actors for the ads of one run; `answers(jobs)` is the source of answers `run_ads` takes."""

    def __init__(self, work: RayWork, workers: int, address: str | None = None, num_cpus: int | None = None):
        self.work, self.workers, self.address, self.num_cpus = work, workers, address, num_cpus
        self.actors: list[Any] = []
        self.lm_description: dict[str, Any] = {}
        self.judge_description: dict[str, Any] = {}

    def __enter__(self) -> RayAds:
        ray = self.ray = start_ray(PURPOSE, address=self.address, num_cpus=self.num_cpus)
        lm = self.work.lm
        cpus = max(lm.n_threads, (self.work.judge_lm or lm).n_threads) if self.work.embedded else 1
        available = int(ray.cluster_resources().get("CPU", 1))
        n = max(1, min(self.workers, available // cpus))
        self.threads = 1 if self.work.embedded else math.ceil(self.workers / n)
        remote = ray.remote(AdActor).options(num_cpus=min(cpus, available), max_concurrency=self.threads)
        try:
            self.actors = [remote.remote(self.work) for _ in range(n)]
            described = ray.get([a.describe.remote() for a in self.actors])
        except BaseException:
            self.__exit__()
            raise
        broken = next((b for b, _, _ in described if b), None)
        if broken is not None:
            self.__exit__()
            raise LLMHyperError(broken)
        _, self.lm_description, self.judge_description = described[0]
        return self

    def __exit__(self, *exc: object) -> None:
        for actor in self.actors:  # ends its process, and with it an embedded server
            self.ray.kill(actor)
        self.actors = []

    def answers(self, jobs: list[AdJob]) -> Iterator[tuple[AdJob, Asked, bool]]:
        """(job, answer, more) as they complete (`more`: other answers are ready too); at most `threads`
        ads in flight per actor."""
        ray, queue = self.ray, list(reversed(jobs))
        load = [0] * len(self.actors)
        flight: dict[Any, tuple[AdJob, int]] = {}

        def submit() -> None:
            while queue:
                i = min(range(len(load)), key=load.__getitem__)
                if load[i] >= self.threads:
                    return
                job = queue.pop()
                flight[self.actors[i].ask.remote(job)] = (job, i)
                load[i] += 1

        submit()
        while flight:
            ray.wait(list(flight), num_returns=1)
            ready, _ = ray.wait(list(flight), num_returns=len(flight), timeout=0)  # all that are ready
            for n, ref in enumerate(ready, 1):
                job, i = flight.pop(ref)
                load[i] -= 1
                submit()  # keep the actor busy while this ad is written
                try:
                    asked = ray.get(ref)
                except ray.exceptions.RayError as exc:  # an actor died (out of memory, node lost)
                    raise LLMHyperError(
                        f"a Ray actor failed on ad {job.ad_id!r}: {_first_line(exc)}"
                    ) from None
                if asked.fatal is not None:
                    raise LLMHyperError(asked.fatal)
                yield job, asked, n < len(ready)


def _first_line(exc: BaseException, n: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:n]
