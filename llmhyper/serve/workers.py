"""Several `serve` worker processes on one port, each picking up new weights on its own.

    llmhyper serve --weights RUN/weights --workers 4 [--watch-seconds 2]

uvicorn's supervisor binds the port once and starts N worker processes (spawned: each imports llmhyper
afresh) that accept connections from the shared socket; a worker that dies is restarted. Each worker
builds its app with `worker_app()` from the `ServeSettings` the supervisor put into the environment
(`LLMHYPER_SERVE_SETTINGS`, JSON), loads the artifact itself, and runs an `ArtifactWatcher`. The snapshot
version is a hash of the artifact files' bytes, so every worker serving the same files reports the same
`model_version`.

How replicas pick up new weights: write the new artifact into the served folder (`WeightTable.save`, or any
llmhyper command that writes artifacts: each of the two files is replaced by an atomic rename). Every
worker's watcher stats `weights.npz` and `weights.json` every `watch_seconds`; when either changed, it
reloads (the read is retried until the two files agree, so a half-replaced pair is never served) and swaps
its snapshot in one reference assignment. So all workers serve the new version within about
`watch_seconds` plus one read. A damaged new artifact is not served: each worker keeps the old snapshot,
says why once on stderr and in /health "watch", and tries again when the files change again. POST /reload
reaches one worker only, so it is no way to update several.

Online feedback (`--feedback-log`) needs one process: the durable log has one writer, and the posteriors
live in that process's memory; so `--workers > 1`, and watching, are refused with it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmhyper._lazy import require
from llmhyper.errors import LLMHyperError
from llmhyper.serve.app import create_app, one_line
from llmhyper.serve.artifact import signature
from llmhyper.serve.scorer import Scorer
from llmhyper.serve.snapshot import GENERATED

ENV = "LLMHYPER_SERVE_SETTINGS"
DEFAULT_WATCH_SECONDS = 2.0  # with several workers


@dataclass(frozen=True)
class ServeSettings:
    """What every worker process loads (passed to spawned workers as JSON in the environment)."""

    weights: Path
    trained: Path | None = None
    flag_threshold: float = 1.0
    catalog: str = GENERATED
    watch_seconds: float = 0.0  # 0: no watching (POST /reload only)

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        d = json.loads(text)
        return cls(
            Path(d["weights"]),
            Path(d["trained"]) if d.get("trained") else None,
            float(d["flag_threshold"]),
            str(d["catalog"]),
            float(d["watch_seconds"]),
        )

    def scorer(self) -> Scorer:
        return Scorer.from_dirs(self.weights, self.trained, self.flag_threshold, catalog=self.catalog)


def check_workers(workers: int, watch_seconds: float, feedback: bool) -> None:
    """LLMHyperError for a combination that cannot work."""
    if workers < 1:
        raise LLMHyperError(f"--workers must be at least 1, got {workers}")
    if feedback and workers > 1:
        raise LLMHyperError(
            "--workers > 1 cannot be used with --feedback-log: the durable event log has one "
            "writer and the posteriors live in one process; serve feedback with one worker"
        )
    if feedback and watch_seconds > 0:
        raise LLMHyperError(
            "--watch-seconds cannot be used with --feedback-log: the posteriors are centred on "
            "the loaded artifacts, so new weights need a restart with a new log"
        )


class ArtifactWatcher:
    """Reloads `scorer` whenever its artifact files change (polled every `interval` seconds)."""

    def __init__(self, scorer: Scorer, interval: float, log: Callable[[str], None] | None = None):
        if not interval > 0:
            raise ValueError(f"the watch interval must be positive, got {interval}")
        self.scorer, self.interval = scorer, float(interval)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._seen = signature(*scorer.dirs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checks = self.reloads = 0
        self.last_error: str | None = None
        self.last_change: str | None = None

    def check(self) -> bool:
        """One poll: reload if the files changed since the last poll; True when a new version is served."""
        self.checks += 1
        sig = signature(*self.scorer.dirs)
        if sig == self._seen:
            return False
        self._seen = sig  # taken before the read: a file replaced during it is seen at the next poll
        old = self.scorer.snapshot.version
        try:
            snap = self.scorer.reload()
        except Exception as exc:  # noqa: BLE001 - a bad artifact must not stop the watcher or the service
            what = str(exc) if isinstance(exc, LLMHyperError) else f"{type(exc).__name__}: {exc}"
            self.last_error = one_line(what)
            self._log(
                f"llmhyper serve[{os.getpid()}]: new weights not served ({self.last_error}); "
                f"still serving version {old}"
            )
            return False
        self.last_error = None
        if snap.version == old:
            return False
        self.reloads += 1
        self.last_change = snap.loaded_at
        self._log(f"llmhyper serve[{os.getpid()}]: now serving version {snap.version} (was {old})")
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def start(self) -> ArtifactWatcher:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="llmhyper-watch")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> dict[str, Any]:
        return {
            "seconds": self.interval,
            "checks": self.checks,
            "reloads": self.reloads,
            "last_change": self.last_change,
            "last_error": self.last_error,
        }


def worker_app():
    """The app of one worker process (uvicorn factory): settings from the environment, its own scorer and
    watcher."""
    text = os.environ.get(ENV)
    if not text:
        raise LLMHyperError(f"{ENV} is not set: start workers with `llmhyper serve --workers N`")
    settings = ServeSettings.from_json(text)
    scorer = settings.scorer()
    watcher = ArtifactWatcher(scorer, settings.watch_seconds).start() if settings.watch_seconds > 0 else None
    return create_app(scorer, watcher=watcher)


def run_workers(settings: ServeSettings, workers: int, host: str, port: int, log_level: str = "info") -> None:
    """Serve with `workers` processes on host:port until interrupted (uvicorn's supervisor)."""
    uvicorn = require("uvicorn", "serve", "llmhyper serve")
    os.environ[ENV] = settings.to_json()  # spawned workers inherit the environment
    uvicorn.run(
        f"{__name__}:worker_app",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
