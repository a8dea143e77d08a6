"""Shared by the benchmark scripts: machine description, percentiles, and BENCHMARKS.md rows.

Each script owns one section of BENCHMARKS.md (between `<!-- bench:NAME -->` markers). Its rows are kept
in `benchmarks/results/NAME.json` keyed by the row's "case"; a run replaces the rows of the cases it
measured and keeps the others, then the section is re-rendered from that file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RESULTS = Path(__file__).resolve().parent / "results"

HEADER = """# Benchmarks

Measured by the scripts in `benchmarks/` (each run updates its own section below; rows are keyed by
"case"). Every row names the machine, the date and the exact command, so it can be rerun.

**Conditions.** Unless a row says otherwise, these figures were taken on a 2-core VM **while a 2-thread
`llmhyper generate` job (the embedded LLM) was running on the same 2 cores** (and, at times, other
engineers' test runs; each row's run notes the load average), with every benchmark under
`nice -n 19` and pinned to 1 BLAS/torch/faiss thread. Latencies are therefore pessimistic (the
benchmark got whatever CPU time the LLM job left) and throughputs are lower bounds of what an idle
machine gives. They are not tuned numbers.
"""


def sh(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def command_line() -> str:
    """The command as it was run (relative script path, with the nice prefix when niced)."""
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    prefix = f"nice -n {os.nice(0)} " if os.nice(0) > 0 else ""
    return prefix + sh([".venv/bin/python", script, *sys.argv[1:]])


def machine() -> dict[str, str]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem = f"{int(m.group(1)) / 2**20:.1f} GiB" if m else "?"
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"nproc": str(nproc), "cpu": model, "ram": mem, "load": load,
            "python": platform.python_version(), "numpy": np.__version__}


def machine_str(m: dict[str, str] | None = None) -> str:
    m = m or machine()
    return f"{m['nproc']} CPU ({m['cpu']}), {m['ram']} RAM, load avg {m['load']} at start"


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def update_section(name: str, title: str, notes: str, columns: list[str], rows: list[dict]) -> Path:
    """Merge `rows` (dicts with "case" and the `columns`) into NAME's rows and re-render its section."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{name}.json"
    old = json.loads(store.read_text()) if store.exists() else {"rows": []}
    stamp = {"date": now(), "machine": machine_str(), "command": command_line()}
    new = [{**r, **stamp} for r in rows]
    cases = {r["case"] for r in new}
    merged = [r for r in old["rows"] if r["case"] not in cases] + new
    store.write_text(json.dumps({"rows": merged}, indent=2) + "\n")

    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = ["case", *columns, "date"]
    lines = [f"<!-- bench:{name} -->", f"## {title}", "", notes.strip(), "",
             "| " + " | ".join(cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in merged]
    lines += ["", "Runs (machine and exact command of each row's run):", ""]
    seen = []
    for r in merged:
        key = (r["date"], r["machine"], r["command"])
        if key not in seen:
            seen.append(key)
    for d, mach, cmd in seen:
        cases_of = [r["case"] for r in merged if (r["date"], r["machine"], r["command"]) == (d, mach, cmd)]
        which = ", ".join(cases_of) if len(cases_of) <= 3 else f"{len(cases_of)} rows"
        lines.append(f"- {d}: `{cmd}` on {mach} -> {which}")
    lines.append(f"<!-- /bench:{name} -->")
    block = "\n".join(lines)

    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
    return BENCHMARKS_MD


def single_thread(n: int = 1) -> None:
    """Pin BLAS/OpenMP pools to n threads. Call before importing numpy-heavy modules where possible."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def wait_healthy(proc, port: int, timeout: float):
    """Wait until a served `llmhyper serve` process answers GET /health; kill it and raise if it exits
    or does not come up in `timeout` seconds. Returns the process."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if c.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not come up within {timeout:.0f} s")
