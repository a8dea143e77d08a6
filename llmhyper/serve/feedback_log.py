"""The durable feedback log and the table of known users, for `serve.feedback`.

One JSON per line: a header (`open`: the prior's version and precision), `event` records (sequence number,
event id, ad, features, click) and `refit` markers (the last sequence number a refit applied). Each carries
a CRC-32 of its canonical JSON, so damage is found on replay instead of silently changing the weights.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.data.contract import read_frame
from llmhyper.errors import DataError
from llmhyper.store import read_jsonl


@dataclass(frozen=True)
class Event:
    seq: int
    event_id: str | None
    ad: str
    x: tuple[float, ...]
    y: int


# -- the log -------------------------------------------------------------------------------------------


def crc(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "crc"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True, separators=(',', ':')).encode()):08x}"


def sealed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "crc": crc(record)}


def read_log(path: Path) -> tuple[dict[str, Any] | None, list[Event], list[int]]:
    """(header, events in order, the `through` of each refit marker) of a feedback log.

    The last record may be cut short or garbled by a kill (it was never acknowledged): it is dropped.
    Anything damaged before it is a DataError: acknowledged events would be lost."""
    records = read_jsonl(path)
    while records and records[-1].get("crc") != crc(records[-1]):
        records.pop()
    header, events, markers = None, [], []
    for i, r in enumerate(records):
        where = f"record {i + 1} (after sequence number {events[-1].seq if events else 0})"
        if r.get("crc") != crc(r):
            raise DataError(f"{where} fails its checksum: the log is damaged", file=str(path))
        kind = r.get("k")
        if kind == "open":
            if i != 0:
                raise DataError(f"{where}: a second header", file=str(path))
            header = r
        elif kind == "event":
            want = events[-1].seq + 1 if events else 1
            if r.get("seq") != want:
                raise DataError(
                    f"{where}: sequence number {r.get('seq')}, expected {want} (lost records)", file=str(path)
                )
            events.append(
                Event(r["seq"], r.get("id"), str(r["ad"]), tuple(float(v) for v in r["x"]), int(r["y"]))
            )
        elif kind == "refit":
            through = r.get("through")
            if (
                not isinstance(through, int)
                or through > (events[-1].seq if events else 0)
                or through < (markers[-1] if markers else 0)
            ):
                raise DataError(
                    f"{where}: a refit marker through {through} does not fit the log", file=str(path)
                )
            markers.append(through)
        else:
            raise DataError(f"{where}: unknown record kind {kind!r}", file=str(path))
    if records and header is None:
        raise DataError("no header record: not a feedback log", file=str(path))
    return header, events, markers


# -- known users ---------------------------------------------------------------------------------------


def load_users(path: str | Path, feature_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """user id -> standardised feature row (float32), from a table with `user` and every served feature."""
    df = read_frame(path)
    missing = [c for c in ("user", *feature_names) if c not in df.columns]
    if missing:
        raise DataError(f"the users table lacks columns {missing[:5]}", file=str(path))
    X = df[list(feature_names)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            "non-finite or missing feature values", file=str(path), row=int(df["__row__"].iloc[i])
        )
    ids = [str(u) for u in df["user"]]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate user ids", file=str(path), field="user")
    return dict(zip(ids, X.astype(np.float32), strict=True))
