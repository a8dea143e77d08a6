"""`llmhyper serve`: rank ads for users over HTTP (FastAPI + uvicorn; extra "serve").

    llmhyper serve --weights RUN/weights [--trained DIR] [--host 127.0.0.1] [--port 8000]
                   [--workers N] [--watch-seconds S]
                   [--feedback-log FILE [--prior-precision 5] [--users FILE] [--thompson]]

Endpoints
    POST /rank     {"features": {name: value, ...} | [values...], "k": 10, "zscored": false}
                   -> {"ads": [{"ad_id", "ctr", "source"}, ...], "model_version"}
                   batch: {"users": [features, ...], "k": 10}
                   -> {"results": [{"ads": [...]}, ...], "model_version"}
    POST /feedback (with --feedback-log) one event {"ad", "clicked": 0|1, "features" | "user", "event_id"?,
                   "zscored"?} or {"events": [...], "zscored"?}; each is fsynced to the log before the answer
                   -> 202 {"accepted", "duplicates", "seq": [first, last], "applied_through"}
    GET  /health   {"ok", "n_ads", "features", "raw_features", "version", "loaded_at", "sources", "pid", ...,
                    "watch": {...} (when watching), "feedback": {per-ad impressions and movement, counts}}
    POST /reload   re-reads the artifact folders and swaps the snapshot atomically; requests in flight
                   finish on the snapshot they started with. A failed reload keeps the old snapshot (500,
                   one-line detail). Refused (409) while feedback is on: the posteriors belong to the loaded
                   artifacts. With several workers it reloads only the worker that answers: there, every
                   worker watches the artifact files instead (see serve/workers.py).

Features are RAW user feature values (names and order: /health "features"), z-scored here with the train
means and standard deviations the artifact carries (meta "feature_scaling"); "zscored": true says they are
already z-scored. An artifact without scaling takes only z-scored features (422 otherwise).
Limits: body <= 64 KiB, 1 <= k <= 100, batch <= 256 users or events. Errors are 4xx with {"detail": "..."}
(an unexpected failure: 500 with a one-line detail).
The service binds to 127.0.0.1 unless told otherwise; /reload and /feedback have no authentication, so
expose them only behind something that has.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from llmhyper._lazy import require
from llmhyper.errors import LLMHyperError
from llmhyper.serve.feedback import EventError, FeedbackService, LogUnavailable
from llmhyper.serve.scorer import NO_SCALING, FeatureError, Scorer, Snapshot

MAX_BODY_BYTES = 64 * 1024
MAX_K = 100
MAX_BATCH = 256
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def host_warning(host: str) -> str | None:
    """A warning when `host` is not a loopback address (None for loopback)."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"llmhyper serve: warning: binding to {host}, not loopback: the service (including POST /reload) "
        "has no authentication; anyone who can reach this address can use it"
    )


# ---------------------------------------------------------------------------------------------
# request handling (framework-free, so it is testable and cheap)
# ---------------------------------------------------------------------------------------------
def _shown(v: Any, limit: int = 40) -> str:
    text = (
        repr(v) if not isinstance(v, int) or abs(v) < 10**limit else f"a number of {len(str(abs(v)))} digits"
    )
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_k(body: dict[str, Any], default: int = 10) -> int:
    k = body.get("k", default)
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"'k' must be an integer between 1 and {MAX_K}, got {_shown(k)}")
    if not 1 <= k <= MAX_K:
        raise RequestError(422, f"'k' must be between 1 and {MAX_K}, got {_shown(k)}")
    return k


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body, or RequestError 400 (bad JSON, or nested too deeply to parse)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError(
            400, "the body is nested too deeply (arrays or objects inside each other hundreds of levels deep)"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({one_line(str(exc), 120)})") from None


def parse_zscored(body: dict[str, Any], default: bool = False) -> bool:
    """The body's "zscored" flag: true when the features are already z-scored, false (default) when raw."""
    z = body.get("zscored", default)
    if not isinstance(z, bool):
        raise RequestError(422, f"'zscored' must be true or false, got {_shown(z)}")
    return z


def check_raw(snap: Snapshot, zscored: bool) -> None:
    if not zscored and snap.scaling is None:
        raise RequestError(422, f'{NO_SCALING}; with z-scored values add "zscored": true to the body')


def _ads(snap: Snapshot, idx, ctr) -> list[dict[str, Any]]:
    ids, src = snap.ad_ids, snap.sources
    return [
        {"ad_id": ids[j], "ctr": round(c, 7), "source": src[j]}
        for j, c in zip(idx.tolist(), ctr.tolist(), strict=True)
    ]


def handle_rank(snap: Snapshot, raw: bytes) -> dict[str, Any]:
    """The /rank response for one request body, or RequestError. Features are raw values, z-scored here
    with the artifact's scaling, unless the body says "zscored": true."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise RequestError(
            422, "the body must be a JSON object with 'features' (or 'users') and optional 'k', 'zscored'"
        )
    extra = set(body) - {"features", "users", "k", "zscored"}
    unknown = sorted(f if len(f) <= 40 else f[:40] + "..." for f in extra)
    if unknown:
        raise RequestError(
            422, f"unknown fields {unknown[:10]}; expected 'features' or 'users', 'k', 'zscored'"
        )
    k = _parse_k(body)
    if ("features" in body) == ("users" in body):
        raise RequestError(422, "give exactly one of 'features' (one user) or 'users' (a batch)")
    raw_values = not parse_zscored(body)
    check_raw(snap, not raw_values)
    try:
        if "features" in body:
            x = snap.vectorize(body["features"], raw=raw_values)
            [(idx, ctr)] = snap.rank_indices(x, k)
            return {"ads": _ads(snap, idx, ctr), "model_version": snap.version}
        users = body["users"]
        if not isinstance(users, list) or not users:
            raise RequestError(422, "'users' must be a non-empty list of feature objects or lists")
        if len(users) > MAX_BATCH:
            raise RequestError(422, f"at most {MAX_BATCH} users per request, got {len(users)}")
        rows = []
        for i, u in enumerate(users):
            try:
                rows.append(snap.vectorize(u, raw=raw_values))
            except FeatureError as exc:
                raise FeatureError(f"users[{i}]: {exc}") from None
        ranked = snap.rank_indices(np.stack(rows), k)
        return {
            "results": [{"ads": _ads(snap, idx, ctr)} for idx, ctr in ranked],
            "model_version": snap.version,
        }
    except FeatureError as exc:
        raise RequestError(422, str(exc)) from None


def handle_feedback(feedback: FeedbackService, raw: bytes) -> list[dict[str, Any]]:
    """The validated events of one /feedback body, or RequestError."""
    body = parse_json(raw)
    if isinstance(body, dict) and isinstance(body.get("events"), list) and len(body["events"]) > MAX_BATCH:
        raise RequestError(422, f"at most {MAX_BATCH} events per request, got {len(body['events'])}")
    try:
        return feedback.parse(body)
    except EventError as exc:
        raise RequestError(422, str(exc)) from None


def health(scorer: Scorer, feedback: FeedbackService | None = None, watcher: Any = None) -> dict[str, Any]:
    snap = scorer.snapshot
    counts = snap.counts()
    extra = {"feedback": feedback.health()} if feedback is not None else {}
    if watcher is not None:
        extra["watch"] = watcher.health()
    return {
        "ok": True,
        "n_ads": snap.n_ads,
        "features": list(snap.feature_names),
        "raw_features": snap.scaling is not None,  # /rank takes raw values (else only "zscored": true)
        "version": snap.version,
        "loaded_at": snap.loaded_at,
        "sources": {"generated": counts["generated"], "trained": counts["trained"]},
        "flagged_ads": counts["flagged_ads"],
        "flag_threshold": snap.flag_threshold,
        "paths": dict(snap.paths),
        "reloads": scorer.reloads,
        "pid": os.getpid(),  # which worker process answered (serve --workers N)
        "limits": {"max_body_bytes": MAX_BODY_BYTES, "max_k": MAX_K, "max_batch": MAX_BATCH},
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
def create_app(scorer: Scorer, feedback: FeedbackService | None = None, watcher: Any = None):
    """The FastAPI app serving `scorer`; with `feedback` (started by the caller), also POST /feedback;
    `watcher` (an `ArtifactWatcher`, started by the caller) is shown in /health."""
    fastapi = require("fastapi", "serve", "llmhyper serve")
    responses = require("fastapi.responses", "serve", "llmhyper serve")
    concurrency = require("starlette.concurrency", "serve", "llmhyper serve")
    JSONResponse = responses.JSONResponse

    app = fastapi.FastAPI(
        title="llmhyper",
        description="LLM-HYPER: rank ads with LLM-written CTR weights",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.scorer, app.state.feedback = scorer, feedback
    thompson = feedback is not None and feedback.settings.thompson
    rng = np.random.default_rng()  # Thompson draws; used on the event loop's thread only

    async def read_bounded(request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > MAX_BODY_BYTES:
                    raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
            except ValueError:
                raise RequestError(400, "bad Content-Length header") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # plain Starlette-style endpoints (request in, response out): no per-request dependency injection
    async def rank(request):
        # this request's snapshot, whatever /reload or a refit does meanwhile (a posterior draw: Thompson)
        snap = feedback.sampled(rng) if thompson else scorer.snapshot
        try:
            raw = await read_bounded(request)
            return JSONResponse(handle_rank(snap, raw))
        except RequestError as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    async def post_feedback(request):
        if feedback is None:
            return JSONResponse(
                {"detail": "feedback is off: start the service with --feedback-log FILE"}, status_code=404
            )
        try:
            events = handle_feedback(feedback, await read_bounded(request))
            done = await concurrency.run_in_threadpool(feedback.ingest, events)  # fsync off the event loop
        except RequestError as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)
        except LogUnavailable as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        return JSONResponse({**done, "applied_through": feedback.applied_through}, status_code=202)

    async def get_health(request):
        return JSONResponse(health(scorer, feedback, watcher))

    async def reload(request):
        if feedback is not None:
            return JSONResponse(
                {
                    "detail": "reload is off while /feedback is on (the posteriors are centred on "
                    "the loaded artifacts); restart the service with a new log"
                },
                status_code=409,
            )
        old = scorer.snapshot.version
        try:
            snap = await concurrency.run_in_threadpool(scorer.reload)
        except Exception as exc:  # noqa: BLE001 - whatever the damage, answer in one line and keep serving
            what = str(exc) if isinstance(exc, LLMHyperError) else f"{type(exc).__name__}: {exc}"
            return JSONResponse(
                {"detail": one_line(f"reload failed: {what}; still serving version {old}", 600)},
                status_code=500,
            )
        return JSONResponse(
            {
                "ok": True,
                "version": snap.version,
                "previous_version": old,
                "n_ads": snap.n_ads,
                "loaded_at": snap.loaded_at,
                "changed": snap.version != old,
                "pid": os.getpid(),
            }
        )

    async def internal_error(request, exc):
        # the last resort: a one-line JSON answer instead of a bare "Internal Server Error"
        return JSONResponse(
            {"detail": one_line(f"internal error ({type(exc).__name__}: {exc})")}, status_code=500
        )

    app.add_exception_handler(Exception, internal_error)
    app.add_route("/rank", rank, methods=["POST"])
    app.add_route("/feedback", post_feedback, methods=["POST"])
    app.add_route("/health", get_health, methods=["GET"])
    app.add_route("/reload", reload, methods=["POST"])
    return app


# ---------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(
    app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning", timeout: float = 20.0
) -> Iterator[str]:
    """Run a real uvicorn server for `app` in a thread; yields its base URL (port 0 = a free port)."""
    uvicorn = require("uvicorn", "serve", "llmhyper serve")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="llmhyper-serve"
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
