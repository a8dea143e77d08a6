"""Batch scoring: the top k ads of every user in a table, streamed in chunks, as `serve` ranks them.

    score_file(snapshot, ScoreSettings(users="USERS.parquet", out="TOP.parquet", k=10, chunk=50_000))

Users are read in chunks of at most `chunk` rows (Parquet: `ParquetFile.iter_batches` with buffered
1 MiB reads and no pre-buffering; CSV: pyarrow's streaming reader, 4 MB blocks), so memory is bounded by
the chunk, not by the file. Inside a chunk the ranking runs in
row blocks of about `_BLOCK_ELEMS` user-ad scores (the argpartition of `rank_indices` makes a full int64
index matrix). Each user is ranked by `Snapshot.rank_indices`, the function behind `serve`'s /rank:
the same judge-flag filter, the same hand-over to trained weights, the same tie rule.

The users table has a user id column (default "user") and one column per feature of the artifact, named
as in the artifact (other columns are ignored). With `raw_features` (the default when the artifact carries
a feature scaling, as `serve` takes them) the values are raw and are z-scored here with the artifact's
train means and standard deviations, in float64, before the float32 ranking; otherwise they must be the
z-scored features the weights were fit on.

The output is a Parquet file with one row per (user, rank): user, rank (1-based), ad, ctr (float32),
source ("generated" or "trained"); users in input order, best ad first. Fewer than k rows for a user
when judge flags drop ads. It is written row group by row group to a temp file next to `out` and renamed
at the end, so a failed or killed run leaves the old file (or none), never half a file.
Bad input (missing column, non-numeric or non-finite value, empty file) is a one-line DataError naming
the file, the row (CSV: the line; Parquet: the 1-based row) and the column. Duplicate user ids are not
checked (that would need every id in memory); each row is ranked on its own.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.serve.snapshot import NO_SCALING, Snapshot

_BLOCK_ELEMS = 1024 * 1024  # user-ad scores ranked at once (4 MB float32 logits + 8 MB argpartition)
_CSV_BLOCK_BYTES = 4 * 1024 * 1024
_PARQUET_BUFFER_BYTES = 1024 * 1024
PARQUET_SUFFIXES, CSV_SUFFIXES = (".parquet", ".pq"), (".csv",)
OUT_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("rank", pa.int32()),
        ("ad", pa.string()),
        ("ctr", pa.float32()),
        ("source", pa.string()),
    ]
)


@dataclass(frozen=True)
class ScoreSettings:
    users: Path
    out: Path
    k: int = 10
    chunk: int = 50_000
    user_column: str = "user"
    raw_features: bool | None = (
        None  # raw values, z-scored with the artifact's scaling; None: raw if it has one
    )

    def __post_init__(self) -> None:
        for name in ("k", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class ScoreSummary:
    out: Path
    users: int
    rows: int
    chunks: int
    largest_chunk: int  # rows of the largest chunk scored at once (<= settings.chunk)
    seconds: float
    model_version: str
    engine: str = "local"

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------------------------------
# reading users in chunks
# ---------------------------------------------------------------------------------------------
@dataclass
class UserChunk:
    users: pa.Array  # string ids
    X: np.ndarray  # (n, n_features) float32, finite
    first: int  # 0-based index of the first user in the file

    def __len__(self) -> int:
        return len(self.users)


class UserTable:
    """A users file checked up front (exists, readable, has the columns, has rows) and read in chunks."""

    def __init__(
        self,
        path: str | Path,
        feature_names: Iterable[str],
        user_column: str = "user",
        *,
        check: bool = True,
        scaling: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """`check=False` skips reading the file (a Ray worker converting batches the driver checked).
        `scaling`: (mean, std) per feature; the values are raw and are z-scored with it."""
        self.path = Path(path)
        self.scaling = scaling
        self.names = [str(f) for f in feature_names]
        self.user_column = user_column
        self.columns = [user_column, *self.names]
        self.n_rows: int | None = None
        suffix = self.path.suffix.lower()
        self.kind = "parquet" if suffix in PARQUET_SUFFIXES else "csv" if suffix in CSV_SUFFIXES else ""
        if not check:
            return
        if not self.path.is_file():
            raise DataError("users file not found", file=str(self.path))
        if self.kind == "parquet":
            self._check_parquet()
        elif self.kind == "csv":
            self._check_csv()
        else:
            raise DataError(
                f"unsupported users file type '{suffix}' (use .parquet or .csv)", file=str(self.path)
            )

    # file row of the i-th user (0-based): CSV line (header is line 1), Parquet 1-based row
    def row(self, i: int) -> int:
        return i + 2 if self.kind == "csv" else i + 1

    def _missing(self, present: list[str]) -> None:
        have = set(present)
        missing = [c for c in self.columns if c not in have]
        if missing:
            what = "user id column" if missing[0] == self.user_column else "feature column"
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"no {what} '{missing[0]}'{more}",
                file=str(self.path),
                row=1 if self.kind == "csv" else None,
                field=missing[0],
            )

    def _check_parquet(self) -> None:
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise DataError(f"cannot be read as Parquet ({str(exc)[:120]})", file=str(self.path)) from None
        schema = pf.schema_arrow
        self._missing(list(schema.names))
        for name in self.names:
            t = schema.field(name).type
            if not (
                pa.types.is_integer(t)
                or pa.types.is_floating(t)
                or pa.types.is_boolean(t)
                or pa.types.is_decimal(t)
                or pa.types.is_null(t)
            ):
                raise DataError(f"feature column has type {t}, not a number", file=str(self.path), field=name)
        if pf.metadata.num_rows == 0:
            raise DataError("the users file has no rows", file=str(self.path))
        self.n_rows = pf.metadata.num_rows

    def _check_csv(self) -> None:
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
                has_row = bool(f.readline().strip())
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot be read as CSV ({exc})", file=str(self.path)) from None
        if not header:
            raise DataError("the users file is empty", file=str(self.path))
        self._missing([h.strip() for h in header])
        if not has_row:
            raise DataError("the users file has no rows", file=str(self.path))

    # -- batches ------------------------------------------------------------------------------
    def _batches(self, chunk: int) -> Iterator[pa.RecordBatch]:
        if self.kind == "parquet":
            # pre_buffer=False: with pyarrow's default, iter_batches keeps every row group it has read
            # (memory grew with the file: +200 MB over 1M users); streamed 1 MiB reads stay flat
            pf = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=_PARQUET_BUFFER_BYTES)
            yield from pf.iter_batches(batch_size=chunk, columns=self.columns)
            return
        try:
            reader = pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                convert_options=self.csv_convert_options(),
            )
            yield from reader
        except pa.ArrowInvalid as exc:  # a value that is no number: find its line and column
            raise self._locate_csv_error() or DataError(
                f"cannot be read ({exc})", file=str(self.path)
            ) from None

    def csv_convert_options(self) -> pacsv.ConvertOptions:
        types = {self.user_column: pa.string(), **{n: pa.float64() for n in self.names}}
        return pacsv.ConvertOptions(include_columns=self.columns, column_types=types)

    def _locate_csv_error(self) -> DataError | None:
        """Re-read the file as text (error path only) to name the line and column of a bad value."""
        opts = pacsv.ConvertOptions(
            include_columns=self.columns, column_types={c: pa.string() for c in self.columns}
        )
        first = 0
        for batch in pacsv.open_csv(
            self.path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES), convert_options=opts
        ):
            for name in self.names:
                values = batch.column(name).to_pylist()
                for i, v in enumerate(values):
                    if v is None or v == "":
                        continue
                    try:
                        float(v)
                    except ValueError:
                        return DataError(
                            f"value {v!r} is not a number",
                            file=str(self.path),
                            row=self.row(first + i),
                            field=name,
                        )
            first += batch.num_rows
        return None

    def chunks(self, chunk: int) -> Iterator[UserChunk]:
        """The users, `chunk` rows at a time (the last chunk may be shorter), checked and as float32."""
        first = 0
        for table in rebatch(self._batches(chunk), chunk):
            users, X = self.to_matrix(table, first)
            yield UserChunk(users, X, first)
            first += len(users)
        if first == 0:
            raise DataError("the users file has no rows", file=str(self.path))

    def to_matrix(self, table: pa.Table | pa.RecordBatch, first: int | None) -> tuple[pa.Array, np.ndarray]:
        """(user ids, float32 features) of one batch. `first`: file index of its first row (None: unknown,
        the error then names the user instead of the row)."""

        def where(i: int) -> dict[str, Any]:
            if first is None:
                return {"file": f"{self.path} (user '{users[i].as_py()}')"}
            return {"file": str(self.path), "row": self.row(first + i)}

        users = _as_array(table.column(self.user_column))
        if not pa.types.is_string(users.type):
            users = users.cast(pa.string())
        empty = pc.or_kleene(pc.is_null(users), pc.equal(pc.utf8_length(users), 0))
        if pc.any(empty).as_py():
            i = int(np.flatnonzero(empty.to_numpy(zero_copy_only=False))[0])
            row = None if first is None else self.row(first + i)
            raise DataError("empty user id", file=str(self.path), row=row, field=self.user_column)
        X = np.empty((len(users), len(self.names)), dtype=np.float32)
        for j, name in enumerate(self.names):
            col = _as_array(table.column(name))
            try:
                values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls become NaN
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"not a number ({exc})", file=str(self.path), field=name) from None
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, reported just below
                X[:, j] = (
                    values if self.scaling is None else (values - self.scaling[0][j]) / self.scaling[1][j]
                )
            bad = ~np.isfinite(X[:, j])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                v = float(values[i])
                after = " after z-scoring" if self.scaling is not None and np.isfinite(v) else ""
                what = (
                    "missing value" if np.isnan(v) else f"value {v!r} is not a finite float32 number{after}"
                )
                raise DataError(what, **where(i), field=name)
        return users, X


def _as_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def rebatch(batches: Iterable[pa.RecordBatch], chunk: int) -> Iterator[pa.Table]:
    """Tables of exactly `chunk` rows (the last one shorter) from batches of any size."""
    buf: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        while b.num_rows:
            take = min(chunk - n, b.num_rows)
            buf.append(b.slice(0, take))
            n += take
            b = b.slice(take)
            if n == chunk:
                yield pa.Table.from_batches(buf)
                buf, n = [], 0
    if n:
        yield pa.Table.from_batches(buf)


# ---------------------------------------------------------------------------------------------
# ranking a chunk
# ---------------------------------------------------------------------------------------------
class Ranker:
    """Top-k tables from one snapshot (its ad ids and sources as Arrow arrays, built once)."""

    def __init__(self, snap: Snapshot, k: int):
        self.snap, self.k = snap, int(k)
        self.ads = pa.array(snap.ad_ids, pa.string())
        self.sources = pa.array(snap.sources, pa.string())
        self.rows_per_block = max(1, _BLOCK_ELEMS // max(snap.n_ads, 1))

    def table(self, users: pa.Array, X: np.ndarray) -> pa.Table:
        idx_parts, ctr_parts = [], []
        for i in range(0, len(X), self.rows_per_block):
            ranked = self.snap.rank_indices(X[i : i + self.rows_per_block], self.k)
            if ranked:
                tops, ctrs = zip(*ranked)  # per user (indices, CTRs); C-level loops, not Python ones
                idx_parts += tops
                ctr_parts += ctrs
        counts_a = np.fromiter(map(len, idx_parts), dtype=np.int64, count=len(idx_parts))
        total = int(counts_a.sum())
        if total == 0:
            return OUT_SCHEMA.empty_table()
        idx = pa.array(np.concatenate(idx_parts).astype(np.int64, copy=False))
        starts = np.repeat(np.cumsum(counts_a) - counts_a, counts_a)
        rank = (np.arange(total, dtype=np.int64) - starts + 1).astype(np.int32)
        owner = pa.array(np.repeat(np.arange(len(counts_a), dtype=np.int64), counts_a))
        return pa.Table.from_arrays(
            [
                users.take(owner),
                pa.array(rank),
                self.ads.take(idx),
                pa.array(np.concatenate(ctr_parts).astype(np.float32, copy=False)),
                self.sources.take(idx),
            ],
            schema=OUT_SCHEMA,
        )


# ---------------------------------------------------------------------------------------------
# writing the output atomically
# ---------------------------------------------------------------------------------------------
class TopKWriter:
    """Row groups into a temp file next to `out`; `commit()` renames it over `out`. Used as a context
    manager, an exception (or a kill) leaves `out` as it was and removes the temp file."""

    def __init__(self, out: str | Path, metadata: dict[str, Any] | None = None):
        self.out = Path(out)
        if self.out.is_dir():
            raise LLMHyperError(f"cannot write {self.out}: it is a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        schema = OUT_SCHEMA.with_metadata({"llmhyper": json.dumps(metadata or {})})
        # dictionary pages only where values repeat a lot (ads, sources): hashing every user id and CTR
        # would double the write time for no smaller file
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.tmp, schema, use_dictionary=["ad", "source"]
        )
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(OUT_SCHEMA) if table.schema != OUT_SCHEMA else table)
            self.rows += table.num_rows

    def commit(self) -> Path:
        self._writer.close()
        self._writer = None
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o644)  # mkstemp makes it 0600
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the original error matters, not this one
                self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._writer is not None:
            self.abort()


def output_metadata(snap: Snapshot, settings: ScoreSettings, engine: str) -> dict[str, Any]:
    raw = raw_features(snap, settings)
    return {
        "model_version": snap.version,
        "paths": dict(snap.paths),
        "k": settings.k,
        "n_ads": snap.n_ads,
        "flag_threshold": snap.flag_threshold,
        "features": "raw, z-scored with the artifact's scaling" if raw else "z-scored",
        "users_file": str(settings.users),
        "engine": engine,
    }


def raw_features(snap: Snapshot, settings: ScoreSettings) -> bool:
    """Whether the users' values are raw: as asked, or (not asked) when the artifact has a scaling."""
    if settings.raw_features is None:
        return snap.scaling is not None
    if settings.raw_features and snap.scaling is None:
        raise LLMHyperError(f"--raw-features: {NO_SCALING} (--zscored)")
    return settings.raw_features


def user_table(snap: Snapshot, settings: ScoreSettings, check: bool = True) -> UserTable:
    """The users file as this snapshot and these settings read it (raw values z-scored or not)."""
    return UserTable(
        settings.users,
        snap.feature_names,
        settings.user_column,
        check=check,
        scaling=snap.scaling if raw_features(snap, settings) else None,
    )


def check_settings(snap: Snapshot, settings: ScoreSettings) -> None:
    raw_features(snap, settings)
    if Path(settings.out).resolve() == Path(settings.users).resolve():
        raise LLMHyperError(f"--out {settings.out} is the users file itself; write the top k elsewhere")


# ---------------------------------------------------------------------------------------------
# the local engine
# ---------------------------------------------------------------------------------------------
def score_file(
    snap: Snapshot, settings: ScoreSettings, progress: Callable[[int], None] | None = None
) -> ScoreSummary:
    """Rank every user of `settings.users` and write the top k to `settings.out` (see the module doc)."""
    check_settings(snap, settings)
    t0 = time.perf_counter()
    table = user_table(snap, settings)
    ranker = Ranker(snap, settings.k)
    n_users = n_chunks = largest = 0
    with TopKWriter(settings.out, output_metadata(snap, settings, "local")) as writer:
        for chunk in table.chunks(settings.chunk):
            writer.write(ranker.table(chunk.users, chunk.X))
            n_users += len(chunk)
            n_chunks += 1
            largest = max(largest, len(chunk))
            if progress is not None:
                progress(n_users)
        writer.commit()
    return ScoreSummary(
        Path(settings.out),
        n_users,
        writer.rows,
        n_chunks,
        largest,
        time.perf_counter() - t0,
        snap.version,
        "local",
    )
