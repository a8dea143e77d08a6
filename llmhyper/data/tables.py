"""Reading any table of the data contract (JSONL, CSV, Parquet) into a frame with its row numbers, and
turning cells into values and messages. The tables' meanings live in `contract`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError

from llmhyper.errors import DataError
from llmhyper.paths import cache_dir

SUFFIXES = (".jsonl", ".csv", ".parquet")


def find_table(folder: Path, stem: str, required: bool = True) -> Path | None:
    hits = [folder / f"{stem}{s}" for s in SUFFIXES if (folder / f"{stem}{s}").exists()]
    if len(hits) > 1:
        raise DataError(
            f"more than one '{stem}' table ({', '.join(p.name for p in hits)}); keep one", file=str(folder)
        )
    if not hits:
        if required:
            raise DataError(
                f"missing table '{stem}' (expected one of {', '.join(stem + s for s in SUFFIXES)})",
                file=str(folder),
            )
        return None
    return hits[0]


def read_frame(path: str | Path) -> pd.DataFrame:
    """Read a JSONL, CSV or Parquet table as a DataFrame; raise DataError on bad syntax or no rows.

    CSV cells are read as text (ids such as `007` stay `007`; an empty cell is a missing value); numbers are
    parsed where a column needs them, so a bad cell is reported with its row and field."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=str(p))
    if p.is_dir():
        raise DataError("expected a file, found a folder", file=str(p))
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                    raise DataError(f"not valid JSON ({msg})", file=str(p), row=lineno) from None
                if not isinstance(obj, dict):
                    raise DataError("each line must be a JSON object", file=str(p), row=lineno)
                obj["__row__"] = lineno
                rows.append(obj)
            df = pd.DataFrame(rows)
        elif suffix == ".csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
            df["__row__"] = np.arange(2, len(df) + 2)  # line numbers: header is line 1
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
            df["__row__"] = np.arange(1, len(df) + 1)
        else:
            raise DataError(f"unsupported file type '{suffix}' (use .jsonl, .csv or .parquet)", file=str(p))
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError("the table is empty", file=str(p)) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start})", file=str(p)) from None
    except Exception as exc:  # parser errors from pandas/pyarrow: say which file, on one line
        raise DataError(f"could not be read: {one_line(exc)}", file=str(p)) from None
    if len(df) == 0:
        raise DataError("the table is empty", file=str(p))
    return df


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line (parsers like to add newlines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def is_missing(value: Any) -> bool:
    """None, NaN, or a blank string: a cell with nothing in it."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return bool(np.isnan(value))
    return isinstance(value, str) and not value.strip()


def show(value: Any) -> str:
    """A cell for a message: `'inf'`, `'abc'` (never `np.float64(inf)`)."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(str(value))


def id_column(df: pd.DataFrame, col: str, path: str | Path) -> pd.Series:
    """An id column as text; an empty id is an error (it would otherwise become a user called 'nan')."""
    values = df[col]
    text = values.astype(str)
    missing = values.isna().to_numpy() | (text.str.strip() == "").to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"empty {col} id ({int(missing.sum())} rows)",
            file=str(path),
            row=int(df["__row__"].iloc[i]),
            field=col,
        )
    return text.astype(object)


def blank_cells(values: pd.Series) -> np.ndarray:
    """Where a column holds nothing: None, NaN, or only spaces."""
    missing = values.isna().to_numpy()
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        missing = missing | (values.astype(str).str.strip() == "").to_numpy()
    return missing


def _clean(value: Any) -> Any:
    if is_missing(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def parse_rows(df: pd.DataFrame, model: type[BaseModel], path: str | Path) -> list[BaseModel]:
    """Validate each row with a pydantic model; the first bad row raises DataError with its field."""
    out = []
    cols = [c for c in df.columns if c != "__row__"]
    for rec in df.to_dict("records"):
        row = int(rec.pop("__row__"))
        data = {k: _clean(rec[k]) for k in cols if _clean(rec.get(k)) is not None}
        if "metadata" in data and isinstance(data["metadata"], str):
            try:
                data["metadata"] = json.loads(data["metadata"])
            except json.JSONDecodeError:
                raise DataError(
                    "metadata must be a JSON object", file=str(path), row=row, field="metadata"
                ) from None
        try:
            out.append(model.model_validate(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            fld = ".".join(str(x) for x in err["loc"]) or None
            msg = err["msg"]
            if err["type"] == "missing":
                blank = isinstance(rec.get(fld), str)  # present, but only spaces
                msg = "is empty" if blank else "required, but missing"
            raise DataError(msg, file=str(path), row=row, field=fld) from None
    return out


def read_impressions_arrow(p: Path) -> pd.DataFrame:
    try:
        from datasets import Dataset

        ds = Dataset.from_parquet(str(p), cache_dir=str(cache_dir() / "datasets"))
        df = ds.to_pandas()
    except Exception:  # datasets missing or unhappy: plain parquet read
        df = read_frame(p).drop(columns="__row__")
    if len(df) == 0:
        raise DataError("the table is empty", file=str(p))
    df["__row__"] = np.arange(1, len(df) + 1)
    return df
