"""HTTP ranking latency and throughput of `llmhyper serve` on loopback, under a bounded load.

    nice -n 19 .venv/bin/python benchmarks/bench_http.py [--weights DIR] [--requests 2000] [--clients 4]

Starts the service (`python -m llmhyper.cli.main serve`, its own process, 1 BLAS thread) on a free loopback
port over a synthetic 120 ads x 40 features artifact (or --weights), then `--clients` threads, each with
its own keep-alive httpx client, send POST /rank {"features": [...], "k": 10, "zscored": true} until `--requests` are
done or `--seconds` have passed. Reports p50/p99 latency (client side, request sent -> body parsed),
throughput and errors (non-200 or transport errors). The load generator shares the CPU with the server.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ROOT, pct, single_thread, update_section, wait_healthy

single_thread(1)

import httpx
import numpy as np

from llmhyper.weights import WeightTable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmhyper.cli.main", "serve", "--weights", weights,
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_healthy(proc, port, 60)


def load(url: str, n_features: int, requests: int, clients: int, seconds: float, k: int, batch: int):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(256, n_features)).round(4).tolist()
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds

    def worker():
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            c.post(f"{url}/rank", json={"features": xs[0], "k": k, "zscored": True})  # warm it
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = ({"features": xs[i % 256], "k": k, "zscored": True} if batch == 1 else
                        {"users": [xs[(i + j) % 256] for j in range(batch)], "k": k, "zscored": True})
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/rank", json=body)
                    r.json()
                    ok = r.status_code == 200
                    err = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    err = repr(exc)
                dt = time.perf_counter() - t0
                with lock:
                    if err:
                        errors.append(err)
                    else:
                        lat.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return np.array(lat) * 1e3, errors, wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="weight artifact folder (default: synthetic 120 ads x 40 features)")
    ap.add_argument("--requests", type=int, default=2000, help="requests in all (the load stops there)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (threads)")
    ap.add_argument("--seconds", type=float, default=10.0, help="time cap of the load")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="users per request (1 = the single-user form)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if not weights:
            rng = np.random.default_rng(0)
            WeightTable("synthetic", [f"ad{i}" for i in range(120)], [f"f{j}" for j in range(40)],
                        rng.normal(0, 0.3, (120, 40)), rng.normal(-2, 0.5, 120)).save(tmp)
            weights = tmp
        port = free_port()
        proc = start_server(weights, port)
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(trust_env=False) as c:
                h = c.get(f"{url}/health").json()
            ms, errors, wall = load(url, len(h["features"]), args.requests, args.clients, args.seconds, args.k,
                                    args.batch)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    done = len(ms) + len(errors)
    row = {"case": f"{'synthetic' if not args.weights else os.path.basename(args.weights.rstrip('/'))} "
                   f"{h['n_ads']} ads, {args.clients} clients, {args.batch} user/request, k={args.k}",
           "requests": done, "errors": len(errors), "wall s": wall,
           "p50 ms": pct(ms, 50) if len(ms) else float("nan"), "p99 ms": pct(ms, 99) if len(ms) else float("nan"),
           "requests/s": done / wall, "users/s": done * args.batch / wall}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    if errors:
        print("first errors:", errors[:3])
    if not args.no_write:
        update_section(
            "http", "HTTP ranking (POST /rank on loopback)",
            "`llmhyper serve` in its own process (uvicorn, 1 worker, 1 BLAS thread); a thread-based httpx load "
            "generator in the benchmark process with keep-alive connections, bounded by a request count and a "
            "time cap. Latency is client-side (send -> parsed JSON). Server and load generator share the "
            "2 cores with the LLM job, so this is a floor, not a capacity figure.",
            ["requests", "errors", "wall s", "p50 ms", "p99 ms", "requests/s", "users/s"], [row])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
