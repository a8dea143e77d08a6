"""Online feedback for `llmhyper serve`: impression events refine each ad's weights from its prior.

Every served ad starts from a Gaussian prior centred on its served weights (`ctr.posterior`). POST
/feedback events (ad, the user's features or a known user id, clicked 0/1) go through three steps
(features are raw values, z-scored with the artifact's scaling, or already z-scored with "zscored": true):

1. **log**: each accepted event gets the next sequence number and is appended to a JSONL log, one JSON
   per line with a CRC-32 of its canonical form, flushed and fsynced BEFORE the 2xx answer. An event with
   an `event_id` already in the log is acknowledged as a duplicate and not logged again, so a client that
   retries with the same ids gets every event applied exactly once.
2. **refit**: a background worker takes every pending event every `refit_every` events or
   `refit_seconds`, refits each touched ad with its current posterior as the prior (warm start, only the
   new events), appends a `refit` marker naming the last sequence number it covers, then swaps the served
   snapshot (one reference assignment).
3. **replay**: on start, the log is read back (checksums and sequence checked) and the marked batches
   are refitted exactly as they were, so the service serves the same weights it served before a crash;
   events after the last marker (logged but not yet applied) are the worker's first batch.

The log's header names the prior (the artifacts' version) and the precision; a restart with other
artifacts or another precision is refused, since the logged posterior belongs to that prior.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.ctr.posterior import PosteriorSettings, PosteriorTable, fit, prior_precision_matrix
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.serve.feedback_log import Event, load_users, read_log, sealed
from llmhyper.serve.snapshot import NO_SCALING, FeatureError, Snapshot
from llmhyper.store import append_jsonl

MAX_EVENT_ID = 128


class EventError(LLMHyperError, ValueError):
    """A feedback event the service cannot take (the HTTP layer answers 422 with this message)."""


class LogUnavailable(LLMHyperError):
    """The log could not be written; no further event is accepted until a restart (answered with 503)."""


@dataclass(frozen=True)
class FeedbackSettings:
    log: Path
    precision: float = 5.0  # prior precision on every weight (see `llmhyper warmup` for a measured one)
    intercept_precision: float | None = None  # the intercept's (None: the same)
    refit_every: int = 100  # pending events that trigger a refit
    refit_seconds: float = 2.0  # ... or this long after the first pending event
    thompson: bool = False  # rank by a posterior draw instead of the posterior mean
    solver: str = "lbfgs"  # of each refit: "lbfgs" or "newton" (the same mode; newton is faster)
    users: Path | None = None  # table of known users: `user` + one column per served feature


# -- the service ---------------------------------------------------------------------------------------


class FeedbackService:
    """Owns the log, the posteriors and the worker; publishes snapshots through `publish(snapshot)`."""

    def __init__(
        self, base: Snapshot, settings: FeedbackSettings, publish, users: dict[str, np.ndarray] | None = None
    ):
        self.settings, self.base, self._publish = settings, base, publish
        self._solver = PosteriorSettings(solver=settings.solver)
        self.users = users or {}
        prior_p = prior_precision_matrix(
            base.n_features,
            PosteriorSettings(precision=settings.precision, intercept_precision=settings.intercept_precision),
        )
        theta = np.asarray(base.theta, dtype=np.float64).T
        prior_table = PosteriorTable(
            "prior",
            list(base.ad_ids),
            list(base.feature_names),
            np.hstack([theta, np.asarray(base.intercept, np.float64)[:, None]]),
            np.zeros((base.n_ads, base.n_features + 1, base.n_features + 1)),
            np.zeros(base.n_ads),
            np.zeros(base.n_ads),
        )
        prior_table.precision[:] = prior_p
        self.prior = prior_table
        self.table = prior_table.copy()
        # Thompson draws read (snapshot, scale) as one published pair; scale[a] @ z ~ N(0, precision_a^-1)
        scale = np.broadcast_to(np.diag(1.0 / np.sqrt(np.diag(prior_p))), self.table.precision.shape).copy()
        self._scale = scale
        self._state = (base, scale)
        self._first_pending = time.monotonic()
        self._lock = threading.Lock()  # the log file, the sequence and the pending list
        self._refit_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids: set[str] = set()
        self._pending: list[Event] = []
        self._next_seq = 1
        self.applied_through = 0
        self.refits = self.duplicates = 0
        self.refit_seconds_total = 0.0
        self.broken: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start-up ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, base: Snapshot, settings: FeedbackSettings, publish) -> FeedbackService:
        """Read (or create) the log, replay its refits, and publish the resulting snapshot."""
        users = load_users(settings.users, base.feature_names) if settings.users else None
        svc = cls(base, settings, publish, users)
        path = Path(settings.log)
        if path.exists() and not path.is_file():
            raise DataError("the feedback log must be a file", file=str(path))
        header, events, markers = read_log(path)
        if header is None:
            append_jsonl(
                path,
                [
                    sealed(
                        {
                            "k": "open",
                            "prior_version": base.version,
                            "features": list(base.feature_names),
                            "precision": settings.precision,
                            "intercept_precision": settings.intercept_precision,
                            "solver": settings.solver,
                            "t": time.time(),
                        }
                    )
                ],
            )
        else:
            svc._check_header(header, path)
        known = set(base.ad_ids)
        stray = next((e for e in events if e.ad not in known or len(e.x) != base.n_features), None)
        if stray is not None:
            raise DataError(
                f"event {stray.seq} is for ad {stray.ad!r} or has {len(stray.x)} features, which "
                "the served artifact does not have",
                file=str(path),
            )
        svc._ids = {e.event_id for e in events if e.event_id is not None}
        svc._next_seq = (events[-1].seq + 1) if events else 1
        done = 0
        for through in markers:
            if through > done:
                svc._commit(svc._fit_batch(events[done:through]), through)
                done = through
        svc._pending = list(events[done:])
        svc._first_pending = time.monotonic() - settings.refit_seconds  # a logged tail is due at once
        svc._swap()
        return svc

    def _check_header(self, header: dict[str, Any], path: Path) -> None:
        if header.get("prior_version") != self.base.version:
            raise LLMHyperError(
                f"{path}: this feedback log belongs to the artifacts of version "
                f"{header.get('prior_version')}, but version {self.base.version} is being served; "
                "serve those artifacts or start a new log"
            )
        mine = (self.settings.precision, self.settings.intercept_precision)
        if (header.get("precision"), header.get("intercept_precision")) != mine:
            raise LLMHyperError(
                f"{path}: this feedback log was written with prior precision "
                f"{header.get('precision')} (intercept {header.get('intercept_precision')}), "
                f"not {mine[0]} (intercept {mine[1]})"
            )
        if header.get("solver", "lbfgs") != self.settings.solver:  # same mode, not the same last bits
            raise LLMHyperError(
                f"{path}: this feedback log was refitted with --refit-solver {header.get('solver')}"
            )

    def start(self) -> FeedbackService:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="llmhyper-feedback")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- events in ---------------------------------------------------------------------------------
    def parse(self, body: Any) -> list[dict[str, Any]]:
        """Validated events (ad, x, y, id) from a request body: one event object or {"events": [...]}."""
        snap = self.base
        zscored = False  # features are raw values unless the body or the event says "zscored": true
        if isinstance(body, dict) and "events" in body:
            if not set(body) <= {"events", "zscored"}:
                raise EventError(
                    f"unknown fields {sorted(set(body) - {'events', 'zscored'})[:10]} beside 'events'"
                )
            zscored = body.get("zscored", False)
            if not isinstance(zscored, bool):
                raise EventError("'zscored' must be true or false")
            items = body["events"]
            if not isinstance(items, list) or not items:
                raise EventError("'events' must be a non-empty list of event objects")
        else:
            items = [body]
        out = []
        for i, ev in enumerate(items):
            where = f"events[{i}]: " if len(items) > 1 or "events" in (body or {}) else ""
            try:
                out.append(self._one(ev, snap, zscored))
            except (EventError, FeatureError) as exc:
                raise EventError(f"{where}{exc}") from None
        return out

    def _one(self, ev: Any, snap: Snapshot, zscored: bool = False) -> dict[str, Any]:
        if not isinstance(ev, dict):
            raise EventError("an event must be an object with 'ad', 'clicked', and 'features' or 'user'")
        unknown = sorted(set(ev) - {"ad", "clicked", "features", "user", "event_id", "zscored"})
        if unknown:
            raise EventError(
                f"unknown fields {unknown[:10]}; an event has ad, clicked, features or user, event_id, zscored"
            )
        zscored = ev.get("zscored", zscored)
        if not isinstance(zscored, bool):
            raise EventError("'zscored' must be true or false")
        ad = ev.get("ad")
        if isinstance(ad, int) and not isinstance(ad, bool):
            ad = str(ad)
        if not isinstance(ad, str) or ad not in snap._pos:
            raise EventError(
                f"unknown ad {ad!r}" if isinstance(ad, str) else "'ad' must be an ad id (a string)"
            )
        y = ev.get("clicked")
        if y not in (0, 1) or isinstance(y, float):  # True/False are 1/0
            raise EventError(f"'clicked' must be 0, 1, true or false, got {y!r}")
        eid = ev.get("event_id")
        if eid is not None and (not isinstance(eid, str) or not 1 <= len(eid) <= MAX_EVENT_ID):
            raise EventError(f"'event_id' must be a string of 1 to {MAX_EVENT_ID} characters")
        if ("features" in ev) == ("user" in ev):
            raise EventError(
                "give exactly one of 'features' (the user's features) or 'user' (a known user id)"
            )
        if "user" in ev:
            row = self.users.get(str(ev["user"]))
            if row is None:
                raise EventError(
                    f"unknown user {ev['user']!r}"
                    + (
                        ""
                        if self.users
                        else " (the service knows no users: start it with --users FILE, or send features)"
                    )
                )
        else:
            if not zscored and snap.scaling is None:
                raise EventError(f'{NO_SCALING}; with z-scored values add "zscored": true')
            row = snap.vectorize(ev["features"], raw=not zscored)
        return {"ad": ad, "x": [float(v) for v in row], "y": int(y), "id": eid}

    def ingest(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Log `events` durably (fsync) and queue them; returns what was accepted. Thread-safe."""
        with self._wake:
            if self.broken:
                raise LogUnavailable(
                    f"the feedback log cannot be written ({self.broken}); restart the service"
                )
            records, fresh, seen = [], [], set()
            for e in events:
                if e["id"] is not None and (e["id"] in self._ids or e["id"] in seen):
                    continue
                if e["id"] is not None:
                    seen.add(e["id"])
                seq = self._next_seq + len(records)
                records.append(
                    sealed(
                        {
                            "k": "event",
                            "seq": seq,
                            "id": e["id"],
                            "ad": e["ad"],
                            "x": e["x"],
                            "y": e["y"],
                            "t": round(time.time(), 3),
                        }
                    )
                )
                fresh.append(Event(seq, e["id"], e["ad"], tuple(e["x"]), e["y"]))
            try:
                append_jsonl(self.settings.log, records)
            except OSError as exc:
                self.broken = f"{type(exc).__name__}: {exc}"  # what reached the disk is sorted out on replay
                raise LogUnavailable(f"the feedback log cannot be written ({self.broken})") from None
            self._next_seq += len(records)
            self._ids.update(seen)
            if fresh and not self._pending:
                self._first_pending = time.monotonic()
            self._pending.extend(fresh)
            self.duplicates += len(events) - len(fresh)
            self._wake.notify_all()
            return {
                "accepted": len(fresh),
                "duplicates": len(events) - len(fresh),
                "seq": [fresh[0].seq, fresh[-1].seq] if fresh else None,
            }

    # -- refits --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                while not self._stop.is_set() and len(self._pending) < self.settings.refit_every:
                    if self._pending:
                        left = self.settings.refit_seconds - (time.monotonic() - self._first_pending)
                        if left <= 0:
                            break
                        self._wake.wait(timeout=left)
                    else:
                        self._wake.wait(timeout=1.0)
            if self._stop.is_set():
                return
            try:
                self.refit()
            except Exception as exc:  # noqa: BLE001 - keep serving the last good snapshot; say why on /health
                self.broken = self.broken or f"refit failed: {type(exc).__name__}: {exc}"
                return

    def refit(self) -> int:
        """Apply every pending event now; returns how many. The worker calls this; tests may too."""
        with self._refit_lock:
            with self._lock:
                batch = list(self._pending)
            if not batch:
                return 0
            t0 = time.perf_counter()
            posts = self._fit_batch(batch)
            with self._lock:  # the marker first: once it is on disk, a replay refits this very batch
                try:
                    append_jsonl(
                        self.settings.log,
                        [
                            sealed(
                                {
                                    "k": "refit",
                                    "through": batch[-1].seq,
                                    "events": len(batch),
                                    "t": round(time.time(), 3),
                                }
                            )
                        ],
                    )
                except OSError as exc:
                    self.broken = f"{type(exc).__name__}: {exc}"
                    raise
                del self._pending[: len(batch)]
                if self._pending:
                    self._first_pending = time.monotonic()
                self._commit(posts, batch[-1].seq)
            self.refits += 1
            self.refit_seconds_total += time.perf_counter() - t0
            self._swap()
            return len(batch)

    def _fit_batch(self, batch: list[Event]) -> dict[str, Any]:
        """ad -> its new posterior: its events of `batch` fitted with its current posterior as the prior."""
        by_ad: dict[str, list[Event]] = {}
        for e in batch:
            by_ad.setdefault(e.ad, []).append(e)
        out = {}
        for ad, evs in by_ad.items():
            X = np.array([e.x for e in evs], dtype=np.float64)
            y = np.array([e.y for e in evs], dtype=np.float64)
            out[ad] = fit(self.table.get(ad), X, y, self._solver)
        return out

    def _commit(self, posts: dict[str, Any], through: int) -> None:
        if self._scale is self._state[1]:  # copy on write: a Thompson draw in flight keeps its arrays
            self._scale = self._scale.copy()
        for ad, post in posts.items():
            self.table.set(ad, post)
            L = np.linalg.cholesky(post.precision)
            self._scale[self.table._pos[ad]] = np.linalg.inv(L).T
        self.applied_through = through

    def _swap(self) -> None:
        mean = self.table.mean
        snap = self.base.with_weights(
            mean[:, :-1], mean[:, -1], f"{self.base.version}+{self.applied_through}"
        )
        self._state = (snap, self._scale)
        self._publish(snap)

    @property
    def snapshot(self) -> Snapshot:
        return self._state[0]

    # -- out -------------------------------------------------------------------------------------------
    def sampled(self, rng: np.random.Generator) -> Snapshot:
        """The served snapshot with every ad's weights drawn from its posterior (Thompson sampling)."""
        snap, scale = self._state
        mean = np.hstack([snap.theta.T, snap.intercept[:, None]]).astype(np.float64)
        w = mean + np.einsum("aij,aj->ai", scale, rng.standard_normal(mean.shape))
        return snap.with_weights(w[:, :-1], w[:, -1], snap.version)

    def health(self, per_ad: bool = True) -> dict[str, Any]:
        """Counts, and per touched ad its impressions and how far its mean moved from the prior (Euclidean,
        and in prior standard deviations)."""
        with self._lock:  # commits happen under this lock: one consistent view
            pending, nxt, t = len(self._pending), self._next_seq, self.table
            touched = np.flatnonzero(t.n > 0)
            delta = t.mean[touched] - self.prior.mean[touched]
            moved = np.linalg.norm(delta, axis=1)
            moved_sd = np.sqrt(np.einsum("ai,aij,aj->a", delta, self.prior.precision[touched], delta))
            ads = (
                {
                    t.ad_ids[i]: {
                        "impressions": int(t.n[i]),
                        "clicks": int(t.clicks[i]),
                        "moved_l2": round(float(m), 6),
                        "moved_prior_sd": round(float(sd), 6),
                    }
                    for i, m, sd in zip(touched.tolist(), moved.tolist(), moved_sd.tolist(), strict=True)
                }
                if per_ad
                else {}
            )
        return {
            "log": str(self.settings.log),
            "logged_events": nxt - 1,
            "applied_through": self.applied_through,
            "applied_events": int(t.n.sum()),
            "pending": pending,
            "refits": self.refits,
            "duplicates": self.duplicates,
            "known_users": len(self.users),
            "mean_refit_ms": round(1e3 * self.refit_seconds_total / self.refits, 3) if self.refits else None,
            "precision": self.settings.precision,
            "intercept_precision": self.settings.intercept_precision,
            "refit_every": self.settings.refit_every,
            "refit_seconds": self.settings.refit_seconds,
            "thompson": self.settings.thompson,
            "broken": self.broken,
            "touched_ads": len(touched),
            "ads": ads,
        }
