"""`llmhyper score` throughput and peak memory, against the bare numpy floor.

    nice -n 10 .venv/bin/python benchmarks/bench_score.py [--users 1000000] [--ads 1000] [--chunk 50000] [--ray]

Cases
- MovieLens-100k: its 943 users (z-scored, 40 features) against the real LLM-written artifact
  results/ml100k-embedded-zero-shot/weights (97 cold movies), the table repeated `--ml-repeat` times so
  the run is long enough to time (ids stay unique: "USER#REP").
- synthetic: `--users` users x `--ads` ads x 40 features (float32 Parquet, random weights, no flags).

Each measurement runs in a fresh child process (this script with --child), so its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is its own; "over baseline" subtracts the RSS after imports
and loading the weights. `score` is the whole command path (`batch.score_file`): read the Parquet users in
chunks, check them, rank with `Snapshot.rank_indices` (flags, ties), write the top-k Parquet atomically.
`numpy floor` ranks the same users already in memory with the bare `X @ theta + b`, argpartition and a sort
of the k (no I/O, no checks, no flags), in the same cache-sized row blocks. 1 BLAS thread unless --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ROOT, update_section

ML_WEIGHTS = ROOT / "results" / "ml100k-embedded-zero-shot" / "weights"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# the child: one measurement
# ---------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import pyarrow.parquet as pq

    from llmhyper.serve import batch
    from llmhyper.serve.scorer import Scorer

    snap = Scorer.from_dirs(args.weights).snapshot
    settings = batch.ScoreSettings(users=Path(args.users_file), out=Path(args.out), k=args.k, chunk=args.chunk,
                                   raw_features=False)  # the users files hold z-scored features
    extra = {}
    if args.child == "floor":
        names = list(snap.feature_names)
        t = pq.read_table(args.users_file, columns=names)
        X = np.column_stack([t.column(n).to_numpy() for n in names]).astype(np.float32)
        del t
    if args.child == "ray":
        from llmhyper.serve import ray_jobs

        t0 = time.perf_counter()
        rs = ray_jobs.RaySettings(num_cpus=args.threads)
        ray_jobs.init_ray(rs)
        extra["ray_init_s"] = round(time.perf_counter() - t0, 1)
    base = rss_mib()
    t0 = time.perf_counter()
    if args.child == "score":
        users = batch.score_file(snap, settings).users
    elif args.child == "ray":
        users = ray_jobs.score_file_ray(snap, settings, rs).users
    else:
        theta, b, k, m = snap.theta, snap.intercept, args.k, snap.n_ads
        rows = max(1, batch._BLOCK_ELEMS // m)
        for i in range(0, len(X), rows):
            z = X[i:i + rows] @ theta
            z += b
            top = np.argpartition(z, m - k, axis=1)[:, m - k:]
            zt = np.take_along_axis(z, top, axis=1)
            order = np.argsort(-zt, axis=1)
            np.take_along_axis(top, order, axis=1)
        users = len(X)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"users": users, "seconds": seconds, "peak_mib": peak, "base_mib": base, **extra}))


def measure(mode: str, weights: Path, users: Path, out: Path, args: argparse.Namespace, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--weights", str(weights), "--users-file", str(users),
           "--out", str(out), "--k", str(args.k), "--chunk", str(chunk), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child failed ({mode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def movielens_users(path: Path, repeat: int) -> tuple[int, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmhyper.data import DataSettings, load_dataset

    data = load_dataset(DataSettings("movielens-100k"))
    names = data.feature_names
    with pq.ParquetWriter(path, pa.schema([("user", pa.string())] + [(n, pa.float32()) for n in names])) as w:
        for r in range(repeat):
            cols = [pa.array([f"{u}#{r}" for u in data.user_ids])]
            cols += [pa.array(data.X[:, j].astype("float32")) for j in range(len(names))]
            w.write_table(pa.Table.from_arrays(cols, names=["user", *names]))
    return len(data.user_ids) * repeat, names


def synthetic(folder: Path, n_users: int, n_ads: int, d: int) -> tuple[Path, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmhyper.weights import WeightTable

    rng = np.random.default_rng(0)
    names = [f"f{j}" for j in range(d)]
    WeightTable("synthetic", [f"ad{i}" for i in range(n_ads)], names, rng.normal(0, 0.3, (n_ads, d)),
                rng.normal(-2, 0.5, n_ads)).save(folder / "weights")
    users = folder / "users.parquet"
    schema = pa.schema([("user", pa.string())] + [(n, pa.float32()) for n in names])
    with pq.ParquetWriter(users, schema) as w:
        for start in range(0, n_users, 100_000):
            n = min(100_000, n_users - start)
            X = rng.standard_normal((n, d), dtype=np.float32)
            cols = [pa.array([f"u{i}" for i in range(start, start + n)])] + [pa.array(X[:, j]) for j in range(d)]
            w.write_table(pa.Table.from_arrays(cols, schema=schema))
    return folder / "weights", users


# ---------------------------------------------------------------------------------------------
def run_cases(label: str, weights: Path, users: Path, n_users: int, n_ads: int, args, tmp: Path) -> list[dict]:
    rows = []
    floor = measure("floor", weights, users, tmp / "floor.parquet", args, args.chunk)
    modes = [("score", c) for c in args.chunks] + ([("ray", args.chunk)] if args.ray else [])
    results = [("numpy floor", args.chunk, floor)]
    for mode, chunk in modes:
        results.append((f"llmhyper score{' --ray' if mode == 'ray' else ''}", chunk,
                        measure(mode, weights, users, tmp / f"{mode}{chunk}.parquet", args, chunk)))
    for what, chunk, r in results:
        ups = r["users"] / r["seconds"]
        row = {"case": f"{label}: {what}, chunk {chunk:,}", "users": f"{r['users']:,}", "ads": n_ads,
               "k": args.k, "users/s": round(ups), "seconds": round(r["seconds"], 2),
               "peak RSS MiB": round(r["peak_mib"]), "over baseline MiB": round(r["peak_mib"] - r["base_mib"]),
               "vs floor": f"{ups / (floor['users'] / floor['seconds']):.2f}x"}
        if "ray_init_s" in r:
            row["vs floor"] += f" (ray.init {r['ray_init_s']} s not counted; driver RSS only)"
        if what == "numpy floor":
            row["over baseline MiB"] = f"{row['over baseline MiB']} (+ X in memory)"
        rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
    return rows


NOTES = """
Users per second end to end (`batch.score_file`: read the Parquet users in chunks, check them, rank with
`Snapshot.rank_indices` as `serve` does, write the top-k Parquet atomically) against the bare numpy floor
(`X @ theta + b`, argpartition, sort of the k, on users already in memory, in the same row blocks; no I/O,
no checks, no flags), measured in the same run ('vs floor'). Each row is a fresh process; peak RSS from
`getrusage` (`ru_maxrss`); 'over baseline' subtracts the RSS after imports and loading the weights (the
floor's peak also holds the whole users matrix it ranks). Memory follows the chunk, not the file: 1M users
take about what 100k take (before Parquet pre-buffering was turned off, pyarrow kept the row groups it had
read and the 1M-user chunk-50,000 run peaked at 441 MiB over baseline). `--ray` is a local Ray with 1 CPU
(`ray.init` not counted): on 94k users the start of the Ray workers dominates; on 1M users the worker's
ranking overlaps the driver's Parquet writing, so it uses more than one core and beats the local engine
(its RSS is the driver's only). 1 BLAS thread; a 2-core VM shared with other jobs (load average per run).
"""
COLUMNS = ["users", "ads", "k", "users/s", "seconds", "peak RSS MiB", "over baseline MiB", "vs floor"]


def render(rows: list[dict]) -> None:
    update_section("score", "Batch scoring (`llmhyper score`)", " ".join(NOTES.split()), COLUMNS, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--ads", type=int, default=1000)
    ap.add_argument("--features", type=int, default=40)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--chunks", type=int, nargs="*", help="chunk sizes of the score runs (default: --chunk)")
    ap.add_argument("--ml-repeat", type=int, default=100)
    ap.add_argument("--skip-ml", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--ray", action="store_true", help="also time --engine ray (local Ray, --threads CPUs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    ap.add_argument("--render", action="store_true", help="only re-render the section from its results file")
    # child mode
    ap.add_argument("--child", choices=["score", "floor", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--users-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.render:
        render([])
        return 0
    args.chunks = args.chunks or [args.chunk]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_score_") as td:
        tmp = Path(td)
        if not args.skip_ml:
            n, _ = movielens_users(tmp / "ml_users.parquet", args.ml_repeat)
            label = f"MovieLens-100k users x{args.ml_repeat}, real artifact"
            rows += run_cases(label, ML_WEIGHTS, tmp / "ml_users.parquet", n, 97, args, tmp)
        if not args.skip_synthetic:
            t0 = time.perf_counter()
            weights, users = synthetic(tmp, args.users, args.ads, args.features)
            print(f"synthetic input written in {time.perf_counter() - t0:.1f} s "
                  f"({users.stat().st_size / 2**20:.0f} MiB)", flush=True)
            label = f"synthetic {args.users:,} users x {args.ads:,} ads x {args.features} f"
            rows += run_cases(label, weights, users, args.users, args.ads, args, tmp)
    if not args.no_write:
        render(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
