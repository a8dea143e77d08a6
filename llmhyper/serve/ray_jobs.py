"""Batch scoring on Ray (optional extra "ray"): the users file through Ray Data's `map_batches`.

    score_file_ray(snapshot, ScoreSettings(...), RaySettings(address=None))

Ray Data reads the users file in blocks, `map_batches` ranks each batch of at most `chunk` users on the
workers with the same `Ranker` as the local engine (so the same `Snapshot.rank_indices`, judge flags and
hand-over), and the driver streams the ranked batches, in input order, into the same atomic Parquet
writer. The output equals the local engine's row for row (row groups may differ).

`RaySettings.address=None` starts a local Ray on this machine (or reuses one this process started);
"auto" or "ray://HOST:10001" joins a cluster, whose workers need llmhyper installed (for instance a
`runtime_env` with `pip: ["llmhyper[ray]"]`). The users file must then be readable from every node.

Bad values are found on the workers, which do not know file rows; the driver then re-reads the file
locally (error path only) to name the file, row and column, as the local engine does.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from llmhyper._lazy import require, start_ray
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.serve.batch import (
    Ranker,
    ScoreSettings,
    ScoreSummary,
    TopKWriter,
    UserTable,
    check_settings,
    output_metadata,
    user_table,
)
from llmhyper.serve.snapshot import Snapshot

PURPOSE = "llmhyper score --engine ray"


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: a local Ray on this machine; "auto" / "ray://host:port": a cluster
    num_cpus: int | None = None  # local Ray only; None = all cores
    concurrency: int | None = None  # ranking tasks at once; None = Ray's choice


def import_ray() -> Any:
    """`ray` with Ray Data, or MissingDependency naming the extra."""
    ray = require("ray", "ray", PURPOSE)
    require("ray.data", "ray", PURPOSE)
    return ray


def init_ray(settings: RaySettings) -> Any:
    """Start (or join) Ray once per process, with Ray Data."""
    return start_ray(PURPOSE, address=settings.address, num_cpus=settings.num_cpus, data=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OWN_ERROR = re.compile(r"llmhyper\.errors\.(\w+): (.+)")


def _llmhyper_error(exc: BaseException) -> str | None:
    """The message of an llmhyper error raised in a Ray task. Ray hands the driver a wrapper whose text
    holds the worker's traceback (the exception object itself does not always survive the trip)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LLMHyperError):
            return str(e)
        found = _OWN_ERROR.findall(_ANSI.sub("", str(e)))
        if found:
            return found[-1][1].strip()
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


class _RankBatch:
    """The map_batches function: one batch of users (Arrow) -> their top-k rows (Arrow)."""

    def __init__(self, snap: Snapshot, settings: ScoreSettings):
        self.table = user_table(snap, settings, check=False)  # the driver checked it
        self.ranker = Ranker(snap, settings.k)

    def __call__(self, batch):
        users, X = self.table.to_matrix(batch, None)
        return self.ranker.table(users, X)


def _dataset(ray: Any, table: UserTable):
    if table.kind == "parquet":
        return ray.data.read_parquet(str(table.path), columns=table.columns)
    return ray.data.read_csv(str(table.path), convert_options=table.csv_convert_options())


def score_file_ray(
    snap: Snapshot, settings: ScoreSettings, ray_settings: RaySettings | None = None
) -> ScoreSummary:
    """`batch.score_file` through Ray Data's `map_batches` (same output file, same order)."""
    check_settings(snap, settings)
    t0 = time.perf_counter()
    table = user_table(snap, settings)  # column checks up front
    ray = init_ray(ray_settings or RaySettings())
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the output keeps the users' order
    fn = _RankBatch(snap, settings)
    kwargs: dict[str, Any] = {}
    if ray_settings is not None and ray_settings.concurrency is not None:
        kwargs["concurrency"] = ray_settings.concurrency
    n_users = n_batches = 0  # users with at least one ad: each has exactly one rank-1 row
    try:
        ranked = _dataset(ray, table).map_batches(
            fn, batch_format="pyarrow", batch_size=settings.chunk, **kwargs
        )
        with TopKWriter(settings.out, output_metadata(snap, settings, "ray")) as writer:
            for batch in ranked.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write(batch)
                n_users += int(pc.sum(pc.equal(batch.column("rank"), 1)).as_py() or 0)
                n_batches += 1
            writer.commit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps task errors in many types; reported in one line
        raise _reported(exc, table, settings.chunk) from None
    finally:
        ctx.execution_options.preserve_order = old_order
    if table.n_rows is not None:  # Parquet: the exact count, users whose ads were all flagged included
        n_users = table.n_rows
    return ScoreSummary(
        Path(settings.out),
        n_users,
        writer.rows,
        n_batches,
        min(settings.chunk, n_users),
        time.perf_counter() - t0,
        snap.version,
        "ray",
    )


def _reported(exc: Exception, table: UserTable, chunk: int) -> LLMHyperError:
    """The one-line error for a failed Ray job. Workers do not know file rows, and Ray's own CSV reader
    fails on a bad value with no row at all: the file is read again here, locally (error path only),
    so a bad value is reported with its file, row and column exactly as the local engine reports it."""
    try:
        for _ in table.chunks(chunk):
            pass
    except DataError as precise:
        return precise
    if isinstance(exc, LLMHyperError):
        return exc
    own = _llmhyper_error(exc)
    if own is not None:
        return LLMHyperError(own)
    return LLMHyperError(f"the Ray job failed: {type(exc).__name__}: {_first_line(exc)[:300]}")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
