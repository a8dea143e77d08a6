"""A local OpenAI-compatible stub LM server with a fixed latency per call, for benchmarks and tests.

    .venv/bin/python benchmarks/stub_lm_server.py --latency 0.5 --port 8765
    llmhyper generate --lm hosted_vllm/stub --api-base http://127.0.0.1:8765/v1 ...

It listens on 127.0.0.1 only (stdlib ThreadingHTTPServer: every request gets its own thread, so N
requests at once all take `latency` seconds, like a server with unlimited batching; `max_concurrent`
limits that to model a saturated server). POST /v1/chat/completions answers the two LLM-HYPER prompts
in DSPy's chat format: a weight prompt gets one number per feature named in its "[[ ## features ## ]]"
section (a fixed function of the feature and the ad text, so every run gets the same weights), a judge
prompt gets empty lists. Any other prompt is a 400. `fail_every=N` answers every Nth request with a 429
(Retry-After: 0) instead, to exercise retries. GET /stats: requests, answered, rate-limited, peak in
flight. GET /v1/models lists the one model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WEIGHT_MARK = "`weights` (dict[str, float])"
JUDGE_MARK = "inconsistent_features"


def _section(user: str, name: str) -> str:
    m = re.search(rf"\[\[ ## {name} ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", user, re.DOTALL)
    return m.group(1) if m else ""


def feature_names(user: str) -> list[str]:
    """The feature names of a weight prompt (lines "- name: description" of its features section)."""
    return re.findall(r"^- ([A-Za-z_][\w'\-]*):", _section(user, "features"), re.MULTILINE)


def weight_for(feature: str, ad_text: str) -> float:
    """A fixed number in [-1, 1] for (feature, ad): the same answer in every run."""
    h = hashlib.sha256(f"{feature}|{ad_text}".encode()).digest()
    return round(int.from_bytes(h[:4], "big") / 2**32 * 2 - 1, 3)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def answer(messages: list[dict[str, Any]]) -> str | None:
    """The reply to a chat, or None for a prompt this stub does not know."""
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    user = _text(next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), ""))
    if JUDGE_MARK in system:
        return ("[[ ## inconsistent_features ## ]]\n[]\n\n[[ ## improper_features ## ]]\n[]\n\n"
                "[[ ## completed ## ]]")
    if WEIGHT_MARK in system and "[[ ## features ## ]]" in user:
        names = feature_names(user)
        if not names:
            return None
        ad = _section(user, "ad")
        weights = {n: weight_for(n, ad) for n in names}
        return (f"[[ ## reasoning ## ]]\nStub.\n\n[[ ## weights ## ]]\n{json.dumps(weights)}\n\n"
                "[[ ## completed ## ]]")
    return None


class StubLMServer:
    """The stub in a background thread: `with StubLMServer(latency=0.5) as s: s.base_url`."""

    def __init__(self, latency: float = 0.5, port: int = 0, fail_every: int = 0, max_concurrent: int = 0,
                 model: str = "stub"):
        self.latency, self.fail_every, self.model = latency, fail_every, model
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(max_concurrent) if max_concurrent > 0 else None
        self.stats = {"requests": 0, "answered": 0, "rate_limited": 0, "unknown": 0, "in_flight": 0,
                      "peak_in_flight": 0}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> StubLMServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="stub-lm", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> StubLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, key: str, by: int = 1) -> int:
        with self.lock:
            self.stats[key] += by
            if key == "in_flight":
                self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
            return self.stats[key]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})
                elif self.path.rstrip("/").endswith("/stats"):
                    with stub.lock:
                        self._send(200, dict(stub.stats))
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                n = stub._count("requests")
                if stub.fail_every and n % stub.fail_every == 0:
                    stub._count("rate_limited")
                    self._send(429, {"error": {"message": "rate limited (stub)", "type": "rate_limit_error",
                                               "code": "rate_limit_exceeded"}}, {"Retry-After": "0"})
                    return
                if stub.slots is not None:
                    stub.slots.acquire()
                stub._count("in_flight")
                try:
                    time.sleep(stub.latency)
                finally:
                    stub._count("in_flight", -1)
                    if stub.slots is not None:
                        stub.slots.release()
                messages = body.get("messages") or []
                text = answer(messages)
                if text is None:
                    stub._count("unknown")
                    self._send(400, {"error": {"message": "the stub has no answer for this prompt",
                                               "type": "invalid_request_error"}})
                    return
                stub._count("answered")
                prompt = sum(len(_text(m.get("content"))) for m in messages) // 4
                self._send(200, {
                    "id": f"stub-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", stub.model),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": len(text) // 4,
                              "total_tokens": prompt + len(text) // 4},
                })

        return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.5, help="seconds per call")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--fail-every", type=int, default=0, help="answer every Nth request with a 429")
    p.add_argument("--max-concurrent", type=int, default=0, help="calls served at once (0: unlimited)")
    args = p.parse_args(argv)
    server = StubLMServer(args.latency, args.port, args.fail_every, args.max_concurrent)
    print(f"stub LM server on {server.base_url} (latency {args.latency} s); Ctrl-C stops it", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
