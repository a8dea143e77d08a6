"""Safe writes and reads: atomic files (bytes, JSON, npz), an append-only JSONL log that survives a kill,
JSON-safe conversion, hashes, and what produced an artifact (commit, versions, time)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import DataError
from llmhyper.paths import REPO

# -- atomic writes ----------------------------------------------------------------------------------


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write through a temp file in the same folder, fsync, rename: a kill leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue())


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temp files a killed writer left behind in `folder` (not recursive); returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or damaged one is a one-line DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} not found", file=str(path)) from None
    except IsADirectoryError:
        raise DataError(f"{what} expected, found a folder", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"damaged {what}: {str(exc)[:120]}", file=str(path)) from None


# -- the append-only log ----------------------------------------------------------------------------


def append_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append records, one JSON per line, flushed to disk. A line cut short by an earlier kill is closed
    with a newline first, so the new records always start on a line of their own."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write("".join(json.dumps(jsonable(r)) + "\n" for r in records).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every whole JSON object in a JSONL file; lines cut short by a kill (or otherwise unreadable) are
    skipped. A missing file reads as empty."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


# -- JSON-safe values -------------------------------------------------------------------------------


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: numpy scalars and arrays become Python values, non-finite floats None,
    pydantic models and DSPy predictions their dicts, anything else its repr."""
    if depth > 25:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    for attr in ("toDict", "model_dump"):  # dspy.Prediction / Example, pydantic models
        fn = getattr(value, attr, None)
        if callable(fn):
            try:
                return jsonable(fn(), depth + 1)
            except Exception:  # a half-built object: fall through to its repr
                pass
    if hasattr(value, "completion_text"):  # dspy FailedPrediction
        return {"failed_parse": str(value.completion_text)}
    return repr(value)


# -- names, hashes, provenance ----------------------------------------------------------------------

_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}")


def safe_name(key: str) -> str:
    """A file name for an id: the id itself when it is short and plain, else its plain characters plus a
    hash of the whole id, so `../x`, `a/b` or a 300-character id never leave or break the folder."""
    key = str(key)
    if _SAFE.fullmatch(key) and not key.endswith(".tmp"):
        return key
    plain = re.sub(r"[^A-Za-z0-9_-]+", "_", key)[:40].strip("_") or "id"
    return f"{plain}~{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "unknown"}
    if head.returncode != 0:
        return {"commit": "unknown"}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def iso(t: float) -> str:
    """A UNIX time as an ISO-8601 UTC string."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("llmhyper", "dspy", "numpy", "faiss"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            pass
    return out


# -- npz + JSON artifacts -----------------------------------------------------------------------------


def save_pair(
    folder: str | Path, npz_name: str, json_name: str, arrays: dict[str, np.ndarray], info: dict[str, Any]
) -> Path:
    """An artifact as arrays (`npz_name`) + a description (`json_name`), each written atomically, npz first;
    the JSON names the npz's SHA-256, so a reader that catches the folder between the two renames sees a
    mismatch, never mixed files. No pickle."""
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise DataError("an artifact folder is expected here, found a file", file=str(d))
    npz = save_npz_atomic(d / npz_name, **arrays)
    write_json_atomic(d / json_name, {**info, "npz_sha256": file_sha256(npz)})
    return d


def load_pair(
    folder: str | Path, npz_name: str, json_name: str, what: str
) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, description) of an artifact written by `save_pair`; a missing, mismatched or damaged one is a
    one-line DataError naming the file."""
    d = Path(folder)
    npz, js = d / npz_name, d / json_name
    for p in (npz, js):
        if not p.is_file():
            raise DataError(f"no {what} here (expected {npz_name} and {json_name})", file=str(p))
    info = read_json(js, f"{what} description")
    if not isinstance(info, dict):
        raise DataError("expected a JSON object", file=str(js))
    if info.get("npz_sha256") != file_sha256(npz):
        raise DataError(
            f"does not match {json_name} (an interrupted save?); write the {what} again", file=str(npz)
        )
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile / numpy raise many kinds for a damaged file
        raise DataError(
            f"damaged {what} arrays ({type(exc).__name__}: {str(exc)[:80]})", file=str(npz)
        ) from None
    return arrays, info
