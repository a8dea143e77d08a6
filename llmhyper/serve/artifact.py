"""Reading a weight artifact while a writer may be replacing it, and noticing that it changed.

`read_artifact(dir)` returns the table and a SHA-256 over the bytes of its two files. `WeightTable.save`
renames the new `weights.npz` into place, then the new `weights.json` (which names the npz's SHA-256), so
a read between the two renames sees a mismatch: it is retried until both files agree. Any damage (a
missing or cut-short file, a JSON list, bad shapes, non-finite or absurd weights) is a one-line DataError;
nothing else escapes.

`signature(dirs)` is what a watcher compares between two polls: (inode, size, mtime) of the four files.
`merged_scaling` is the feature scaling a snapshot of one or two artifacts serves raw features with.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.data.scaling import SCALING_KEY, scaling_arrays
from llmhyper.errors import DataError
from llmhyper.weights import JSON_NAME, MAX_ABS_WEIGHT, NPZ_NAME, WeightTable

ARRAYS = ("theta", "intercept", "ad_ids", "feature_names")


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


def parse_artifact(npz_bytes: bytes, js_bytes: bytes, where: str) -> WeightTable:
    """The table held by the bytes of `weights.npz` and `weights.json`; DataError naming `where`."""
    try:
        info = json.loads(js_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{JSON_NAME} is not valid JSON ({_one_line(exc, 80)})", file=where) from None
    if not isinstance(info, dict):
        raise DataError(f"{JSON_NAME} must be a JSON object, not {type(info).__name__}", file=where)
    want = info.get("npz_sha256")
    if want is not None and want != hashlib.sha256(npz_bytes).hexdigest():
        raise DataError(
            f"{NPZ_NAME} does not match {JSON_NAME} (being rewritten, or the files were mixed)", file=where
        )
    try:
        with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ARRAYS}
    except Exception as exc:  # noqa: BLE001 - zipfile / numpy raise many kinds for a damaged file
        raise DataError(f"damaged {NPZ_NAME} ({_one_line(exc, 80)})", file=where) from None
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"{NPZ_NAME} lacks the arrays {missing}", file=where)
    for name in ("ad_ids", "feature_names"):
        if arrays[name].ndim != 1:
            raise DataError(f"'{name}' must be a 1-d array, has shape {arrays[name].shape}", file=where)
    ad_ids = [str(a) for a in arrays["ad_ids"]]
    names = [str(f) for f in arrays["feature_names"]]
    if info.get("n_ads", len(ad_ids)) != len(ad_ids) or info.get("feature_names", names) != names:
        raise DataError(
            f"{JSON_NAME} and {NPZ_NAME} disagree on the ads or features (being rewritten?)", file=where
        )
    flags, meta = info.get("flags") or {}, info.get("meta") or {}
    if not isinstance(flags, dict) or not all(isinstance(v, list) for v in flags.values()):
        raise DataError("'flags' must map ad ids to lists of feature names", file=where, field="flags")
    if not isinstance(meta, dict):
        raise DataError("'meta' must be an object", file=where, field="meta")
    method = info.get("method", Path(where).name)
    try:
        table = WeightTable(
            str(method),
            ad_ids,
            names,
            arrays["theta"],
            arrays["intercept"],
            {str(a): [str(f) for f in fs] for a, fs in flags.items()},
            meta,
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"bad weight arrays ({_one_line(exc, 100)})", file=where) from None
    bad = [
        a
        for a, t, b in zip(table.ad_ids, table.theta, table.intercept, strict=True)
        if not (np.isfinite(t).all() and np.isfinite(b))
        or np.abs(t).max(initial=0.0) > MAX_ABS_WEIGHT
        or abs(b) > MAX_ABS_WEIGHT
    ]
    if bad:
        raise DataError(
            f"non-finite or absurd weights (|w| > {MAX_ABS_WEIGHT:g}) for ads {bad[:5]}", file=where
        )
    return table


def read_artifact(directory: str | Path, attempts: int = 5) -> tuple[WeightTable, str]:
    """The table and a sha256 over its two files' bytes, retried while the files disagree (see above)."""
    d = Path(directory)
    npz, js = d / NPZ_NAME, d / JSON_NAME
    last: DataError | None = None
    for attempt in range(attempts):
        for p in (npz, js):
            if not p.is_file():
                raise DataError(f"no weight artifact here (expected {NPZ_NAME} and {JSON_NAME})", file=str(p))
        try:
            npz_bytes, js_bytes = npz.read_bytes(), js.read_bytes()
        except OSError as exc:
            last = DataError(f"cannot be read ({_one_line(exc, 80)})", file=str(d))
        else:
            try:
                table = parse_artifact(npz_bytes, js_bytes, str(d))
            except DataError as exc:  # a torn read looks like damage: read again
                last = exc
            else:
                return table, hashlib.sha256(npz_bytes + b"\0" + js_bytes).hexdigest()
        if attempt + 1 < attempts:
            time.sleep(0.05 * (attempt + 1))
    reason = last.reason if last is not None else "unknown trouble"
    raise DataError(
        f"cannot read the weight artifact: {reason}",
        file=last.file if last else str(d),
        field=last.field if last else None,
    )


def signature(*directories: str | Path | None) -> tuple[Any, ...]:
    """(inode, size, mtime_ns) of each artifact file, None for a missing one: changes when a file is
    replaced (an atomic rename gives a new inode) or rewritten."""
    out: list[Any] = []
    for d in directories:
        if d is None:
            continue
        for name in (NPZ_NAME, JSON_NAME):
            try:
                st = os.stat(Path(d) / name)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
    return tuple(out)


def merged_scaling(
    generated: WeightTable, trained: WeightTable | None, names: list[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The artifacts' feature scaling (mean, std) in `names` order; both artifacts must agree if both have
    one (the hand-over serves the two on the same features)."""
    found = []
    for t in (generated, trained):
        if t is not None and t.meta.get(SCALING_KEY) is not None:
            found.append(
                (
                    t.method,
                    scaling_arrays(
                        t.meta[SCALING_KEY], names, f"meta.{SCALING_KEY} of the '{t.method}' artifact"
                    ),
                )
            )
    if len(found) == 2 and not all(
        np.allclose(a, b, rtol=1e-9, atol=0.0) for a, b in zip(found[0][1], found[1][1], strict=True)
    ):
        raise DataError(
            f"the '{found[0][0]}' and '{found[1][0]}' artifacts have different feature scalings "
            "(made from other data?)"
        )
    return found[0][1] if found else None
