"""`llmhyper serve`: rank ads for users over HTTP (FastAPI + uvicorn; extra "serve").

    llmhyper serve --weights RUN/weights [--trained DIR] [--host 127.0.0.1] [--port 8000]

Endpoints
    POST /rank     {"features": {name: value, ...} | [values...], "k": 10}
                   -> {"ads": [{"ad_id", "ctr", "source"}, ...], "model_version"}
                   batch: {"users": [features, ...], "k": 10}
                   -> {"results": [{"ads": [...]}, ...], "model_version"}
    GET  /health   {"ok", "n_ads", "features", "version", "loaded_at", "sources", "flagged_ads", ...}
    POST /reload   re-reads the artifact folders and swaps the snapshot atomically; requests in flight
                   finish on the snapshot they started with. A failed reload keeps the old snapshot (500).

Features are the artifact's standardised user features (names and order: /health "features").
Limits: body <= 64 KiB, 1 <= k <= 100, batch <= 256 users. Errors are 4xx with {"detail": "..."}.
The service binds to 127.0.0.1 unless told otherwise; /reload has no authentication, so expose it
only behind something that has.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from llmhyper._lazy import require
from llmhyper.errors import LLMHyperError
from llmhyper.serve.scorer import FeatureError, Scorer, Snapshot

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
    return (f"llmhyper serve: warning: binding to {host}, not loopback: the service (including POST /reload) "
            "has no authentication; anyone who can reach this address can use it")


# ---------------------------------------------------------------------------------------------
# request handling (framework-free, so it is testable and cheap)
# ---------------------------------------------------------------------------------------------
def _parse_k(body: dict[str, Any], default: int = 10) -> int:
    k = body.get("k", default)
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"'k' must be an integer between 1 and {MAX_K}, got {k!r}")
    if not 1 <= k <= MAX_K:
        raise RequestError(422, f"'k' must be between 1 and {MAX_K}, got {k}")
    return k


def _ads(snap: Snapshot, idx, ctr) -> list[dict[str, Any]]:
    ids, src = snap.ad_ids, snap.sources
    return [{"ad_id": ids[j], "ctr": round(c, 7), "source": src[j]}
            for j, c in zip(idx.tolist(), ctr.tolist(), strict=True)]


def handle_rank(snap: Snapshot, raw: bytes) -> dict[str, Any]:
    """The /rank response for one request body, or RequestError."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(422, "the body must be a JSON object with 'features' (or 'users') and "
                                "optional 'k'")
    unknown = sorted(set(body) - {"features", "users", "k"})
    if unknown:
        raise RequestError(422, f"unknown fields {unknown}; expected 'features' or 'users', and 'k'")
    k = _parse_k(body)
    if ("features" in body) == ("users" in body):
        raise RequestError(422, "give exactly one of 'features' (one user) or 'users' (a batch)")
    try:
        if "features" in body:
            x = snap.vectorize(body["features"])
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
                rows.append(snap.vectorize(u))
            except FeatureError as exc:
                raise FeatureError(f"users[{i}]: {exc}") from None
        ranked = snap.rank_indices(np.stack(rows), k)
        return {"results": [{"ads": _ads(snap, idx, ctr)} for idx, ctr in ranked],
                "model_version": snap.version}
    except FeatureError as exc:
        raise RequestError(422, str(exc)) from None


def health(scorer: Scorer) -> dict[str, Any]:
    snap = scorer.snapshot
    counts = snap.counts()
    return {"ok": True, "n_ads": snap.n_ads, "features": list(snap.feature_names), "version": snap.version,
            "loaded_at": snap.loaded_at,
            "sources": {"generated": counts["generated"], "trained": counts["trained"]},
            "flagged_ads": counts["flagged_ads"], "flag_threshold": snap.flag_threshold,
            "paths": dict(snap.paths), "reloads": scorer.reloads,
            "limits": {"max_body_bytes": MAX_BODY_BYTES, "max_k": MAX_K, "max_batch": MAX_BATCH}}


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
def create_app(scorer: Scorer):
    """The FastAPI app serving `scorer`."""
    fastapi = require("fastapi", "serve", "llmhyper serve")
    responses = require("fastapi.responses", "serve", "llmhyper serve")
    concurrency = require("starlette.concurrency", "serve", "llmhyper serve")
    JSONResponse = responses.JSONResponse

    app = fastapi.FastAPI(title="llmhyper", description="LLM-HYPER: rank ads with LLM-written CTR weights",
                          docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scorer = scorer

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
        snap = scorer.snapshot  # this request's snapshot, whatever /reload does meanwhile
        try:
            raw = await read_bounded(request)
            return JSONResponse(handle_rank(snap, raw))
        except RequestError as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    async def get_health(request):
        return JSONResponse(health(scorer))

    async def reload(request):
        old = scorer.snapshot.version
        try:
            snap = await concurrency.run_in_threadpool(scorer.reload)
        except LLMHyperError as exc:
            return JSONResponse({"detail": f"reload failed: {exc}; still serving version {old}"},
                                status_code=500)
        return JSONResponse({"ok": True, "version": snap.version, "previous_version": old,
                             "n_ads": snap.n_ads, "loaded_at": snap.loaded_at,
                             "changed": snap.version != old})

    app.add_route("/rank", rank, methods=["POST"])
    app.add_route("/health", get_health, methods=["GET"])
    app.add_route("/reload", reload, methods=["POST"])
    return app


# ---------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                   timeout: float = 20.0) -> Iterator[str]:
    """Run a real uvicorn server for `app` in a thread; yields its base URL (port 0 = a free port)."""
    uvicorn = require("uvicorn", "serve", "llmhyper serve")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="llmhyper-serve")
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


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve ad rankings over HTTP (POST /rank, GET /health, POST /reload)")
    p.add_argument("--weights", required=True, help="generated weight artifact folder (e.g. RUN/weights)")
    p.add_argument("--trained", help="artifact of trained per-ad models; these ads are served from it")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--flag-threshold", type=float, default=1.0,
                   help="drop a judge-flagged ad for users with |standardised flagged feature| >= this")
    p.add_argument("--catalog", choices=["generated", "union"], default="generated",
                   help="serve the generated ads (default) or also ads only the trained artifact has")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    uvicorn = require("uvicorn", "serve", "llmhyper serve")
    scorer = Scorer.from_dirs(args.weights, args.trained, args.flag_threshold, catalog=args.catalog)
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    snap = scorer.snapshot
    print(f"llmhyper serve: {snap.n_ads} ads, {snap.n_features} features, version {snap.version} "
          f"on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(create_app(scorer), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return 0
