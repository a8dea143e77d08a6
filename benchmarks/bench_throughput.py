"""Batch scoring throughput (user-ad scores per second) against this machine's memory and compute bounds.

    nice -n 19 .venv/bin/python benchmarks/bench_throughput.py [--users 8192] [--ads 120 1000 10000]

Scoring is a float32 GEMM, users x features times features x ads, plus the logistic. Per score:
2*d flops and, once the ads' weights sit in cache and users' features are amortised over the ads,
at least 4 bytes written (the float32 score; 8 with the write-allocate read). Bounds:

* memory: measured copy bandwidth (a large numpy copy, counted as read + write bytes) / 4 bytes per score;
* compute: measured float32 GEMM peak (a 2048^3 sgemm) / (2 d) flops per score.

Rows: raw GEMM into a preallocated output (`np.matmul(X, theta, out=)`), the scorer's `scores()`
(GEMM + intercept + logistic, blocked so the element-wise passes stay in cache), and `rank_indices`
(scores + top 10 per user) for batches. 1 BLAS thread by default (--threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import single_thread, update_section


def best_of(fn, repeat: int, budget_s: float) -> float:
    """Shortest wall time of `fn()` over up to `repeat` runs (stops early after `budget_s`)."""
    fn()
    best, end = float("inf"), time.perf_counter() + budget_s
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > end:
            break
    return best


def copy_bandwidth(np, mib: int, repeat: int) -> float:
    """Bytes per second of a large array copy, counting read + write."""
    src = np.random.default_rng(0).random(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: np.copyto(dst, src), repeat, 5.0)


def sgemm_peak(np, g: int) -> float:
    """Float32 flops per second of a g x g x g matrix product."""
    rng = np.random.default_rng(1)
    a, b = rng.random((g, g), dtype=np.float32), rng.random((g, g), dtype=np.float32)
    c = np.empty((g, g), np.float32)
    return 2 * g**3 / best_of(lambda: np.matmul(a, b, out=c), 3, 10.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8192)
    ap.add_argument("--features", type=int, default=40)
    ap.add_argument("--ads", type=int, nargs="+", default=[120, 1000, 10000])
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: the CPU is shared)")
    ap.add_argument("--copy-mib", type=int, default=256, help="size of the bandwidth copy")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    single_thread(args.threads)
    import numpy as np

    from llmhyper.serve.scorer import Scorer
    from llmhyper.weights import WeightTable

    bw = copy_bandwidth(np, args.copy_mib, args.repeat)
    peak = sgemm_peak(np, 2048)
    d = args.features
    mem_bound, flop_bound = bw / 4, peak / (2 * d)
    print(f"copy bandwidth {bw / 1e9:.2f} GB/s -> memory bound {mem_bound:.3e} scores/s (4 B/score)")
    print(f"sgemm peak {peak / 1e9:.1f} GFLOP/s -> compute bound {flop_bound:.3e} scores/s ({2 * d} flop/score)")
    rows = [{"case": f"machine bounds, {args.threads} thread(s)", "scores/s": min(mem_bound, flop_bound),
             "memory bound": mem_bound, "compute bound": flop_bound,
             "note": f"copy {bw / 1e9:.2f} GB/s; sgemm {peak / 1e9:.1f} GFLOP/s (2048^3)"}]

    rng = np.random.default_rng(3)
    X = rng.normal(size=(args.users, d)).astype(np.float32)
    for m in args.ads:
        table = WeightTable("synthetic", [f"ad{i}" for i in range(m)], [f"f{j}" for j in range(d)],
                            rng.normal(0, 0.3, (m, d)), rng.normal(-2, 0.5, m))
        snap = Scorer.from_tables(table).snapshot
        out = np.empty((args.users, m), np.float32)
        n_scores = args.users * m
        cases = [("GEMM only (matmul out=)", lambda s=snap, o=out: np.matmul(X, s.theta, out=o)),
                 ("scores() = GEMM + logistic", lambda s=snap: s.scores(X))]
        if m <= 1000:
            cases.append(("rank_indices(k=10), batch", lambda s=snap: s.rank_indices(X, 10)))
        for label, fn in cases:
            t = best_of(fn, args.repeat, 5.0)
            rate = n_scores / t
            rows.append({"case": f"{args.users} users x {d} f x {m} ads: {label}", "scores/s": rate,
                         "memory bound": mem_bound, "compute bound": flop_bound,
                         "note": f"{100 * rate / min(mem_bound, flop_bound):.0f}% of the lower bound; "
                                 f"{t * 1e3:.2f} ms per batch"})
            print(f"{rows[-1]['case']:<64} {rate:.3e} scores/s  ({rows[-1]['note']})")
    if not args.no_write:
        update_section(
            "throughput", "Batch scoring throughput vs machine bounds",
            "User-ad scores per second for a users x features x ads float32 batch. Memory bound = measured copy "
            "bandwidth (read + write bytes of a large `np.copyto`) / 4 bytes per score (each score written once; "
            "theta stays in cache, user features are amortised over the ads). Compute bound = measured 2048^3 "
            "sgemm rate / (2 x features) flops per score. With 40 features the GEMM is compute-bound (the compute "
            "bound is the lower one) and runs near the sgemm rate. `scores()` adds the intercept and the logistic, "
            "five element-wise passes (one tanh), which cost about as much again; `rank_indices` adds a per-user "
            "argpartition and sort of the top k, which dominates for batches.",
            ["scores/s", "memory bound", "compute bound", "note"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
