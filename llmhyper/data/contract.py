"""The data contract: ads, feature specs, user features and impressions, read from JSONL, CSV or Parquet.

Every reader validates as it goes and raises `DataError` naming the file, the row (1-based data row; for
JSONL and CSV that is the line after any header) and the field. A user's own data lives in one folder:

    ads.{jsonl,csv,parquet}          id, title, text, image, caption, launch_date, metadata
    features.{jsonl,csv,parquet}     name, description            (one row per user feature)
    users.{jsonl,csv,parquet}        user, <one column per feature>
    impressions.{jsonl,csv,parquet}  user, ad, clicked, time

`load_folder` joins them into a `CTRData`: dense users x ads click and impression matrices, which is
what the trainers, the program and the metrics consume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmhyper.errors import DataError

SUFFIXES = (".jsonl", ".csv", ".parquet")


class Ad(BaseModel):
    """One ad (for MovieLens: one movie)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    text: str = ""
    image: str | None = None
    caption: str | None = None
    launch_date: date | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class FeatureSpec(BaseModel):
    """A user feature and the natural-language definition the LLM reads."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_'\-]*$")
    description: str = Field(min_length=3)


class Impression(BaseModel):
    """An ad shown to a user, clicked or not."""

    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1)
    ad: str = Field(min_length=1)
    clicked: bool
    time: datetime | None = None

    @field_validator("user", "ad", mode="before")
    @classmethod
    def _as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


# -- reading rows ------------------------------------------------------------------------------

def find_table(folder: Path, stem: str, required: bool = True) -> Path | None:
    hits = [folder / f"{stem}{s}" for s in SUFFIXES if (folder / f"{stem}{s}").exists()]
    if len(hits) > 1:
        raise DataError(f"more than one '{stem}' table ({', '.join(p.name for p in hits)}); keep one",
                        file=str(folder))
    if not hits:
        if required:
            raise DataError(f"missing table '{stem}' (expected one of {', '.join(stem + s for s in SUFFIXES)})",
                            file=str(folder))
        return None
    return hits[0]


def read_frame(path: str | Path) -> pd.DataFrame:
    """Read a JSONL, CSV or Parquet table as a DataFrame; raise DataError on bad syntax or no rows."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=str(p))
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON ({exc.msg})", file=str(p), row=lineno) from None
                if not isinstance(obj, dict):
                    raise DataError("each line must be a JSON object", file=str(p), row=lineno)
                obj["__row__"] = lineno
                rows.append(obj)
            df = pd.DataFrame(rows)
        elif suffix == ".csv":
            df = pd.read_csv(p, keep_default_na=True)
            df["__row__"] = np.arange(2, len(df) + 2)  # line numbers: header is line 1
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
            df["__row__"] = np.arange(1, len(df) + 1)
        else:
            raise DataError(f"unsupported file type '{suffix}' (use .jsonl, .csv or .parquet)", file=str(p))
    except DataError:
        raise
    except Exception as exc:  # parser errors from pandas/pyarrow: say which file
        raise DataError(f"could not be read: {exc}", file=str(p)) from None
    if len(df) == 0:
        raise DataError("the table is empty", file=str(p))
    return df


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
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
                raise DataError("metadata must be a JSON object", file=str(path), row=row, field="metadata") from None
        try:
            out.append(model.model_validate(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            fld = ".".join(str(x) for x in err["loc"]) or None
            raise DataError(err["msg"], file=str(path), row=row, field=fld) from None
    return out


# -- the four tables ---------------------------------------------------------------------------

def read_ads(path: str | Path, image_root: str | Path | None = None, check_images: bool = True) -> list[Ad]:
    df = read_frame(path)
    ads = parse_rows(df, Ad, path)
    seen: dict[str, int] = {}
    rows = df["__row__"].tolist()
    root = Path(image_root) if image_root else Path(path).parent
    for ad, row in zip(ads, rows, strict=True):
        if ad.id in seen:
            raise DataError(f"duplicate ad id '{ad.id}' (first at row {seen[ad.id]})", file=str(path), row=row,
                            field="id")
        seen[ad.id] = row
        if ad.image:
            img = Path(ad.image) if Path(ad.image).is_absolute() else root / ad.image
            if check_images and not img.exists():
                raise DataError(f"image file not found: {img}", file=str(path), row=row, field="image")
            ad.image = str(img)
    return ads


def read_feature_specs(path: str | Path) -> list[FeatureSpec]:
    df = read_frame(path)
    if "description" not in df.columns:
        raise DataError("no 'description' column: every feature needs a natural-language description",
                        file=str(path), row=int(df["__row__"].iloc[0]), field="description")
    specs = parse_rows(df, FeatureSpec, path)
    seen: set[str] = set()
    for spec, row in zip(specs, df["__row__"].tolist(), strict=True):
        if spec.name in seen:
            raise DataError(f"duplicate feature '{spec.name}'", file=str(path), row=row, field="name")
        seen.add(spec.name)
    return specs


def read_user_features(path: str | Path, specs: list[FeatureSpec]) -> tuple[list[str], np.ndarray]:
    """Users x features matrix in the order of `specs`; every column must have a spec and vice versa."""
    df = read_frame(path)
    if "user" not in df.columns:
        raise DataError("no 'user' column", file=str(path), row=int(df["__row__"].iloc[0]), field="user")
    names = [s.name for s in specs]
    extra = [c for c in df.columns if c not in ("user", "__row__") and c not in names]
    if extra:
        raise DataError(f"feature column '{extra[0]}' has no description in the feature table",
                        file=str(path), row=int(df["__row__"].iloc[0]), field=extra[0])
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise DataError(f"feature '{missing[0]}' is described but has no column", file=str(path), field=missing[0])
    users = df["user"].astype(str).tolist()
    rows = df["__row__"].to_numpy()
    dup = pd.Series(users).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"duplicate user '{users[i]}'", file=str(path), row=int(rows[i]), field="user")
    X = np.empty((len(df), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        col = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(col)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"value {df[name].iloc[i]!r} is not a finite number", file=str(path),
                            row=int(rows[i]), field=name)
        X[:, j] = col
    return users, X


def read_impressions(path: str | Path, users: list[str], ads: list[str]) -> pd.DataFrame:
    """Impressions as a validated frame (user, ad, clicked). Large logs are read memory-mapped through
    `datasets` (Arrow) and checked column-wise, not row by row."""
    p = Path(path)
    df = _read_impressions_arrow(p) if p.suffix == ".parquet" else read_frame(p)
    for col in ("user", "ad", "clicked"):
        if col not in df.columns:
            raise DataError(f"no '{col}' column", file=str(p), field=col)
    rows = df["__row__"].to_numpy()
    df["user"], df["ad"] = df["user"].astype(str), df["ad"].astype(str)
    for col, known in (("user", set(users)), ("ad", set(ads))):
        unknown = ~df[col].isin(known).to_numpy()
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise DataError(f"unknown {col} '{df[col].iloc[i]}' ({int(unknown.sum())} rows name unknown {col}s)",
                            file=str(p), row=int(rows[i]), field=col)
    clicked = df["clicked"].map(_as_click)
    bad = clicked.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"clicked must be 0/1 or true/false, got {df['clicked'].iloc[i]!r}", file=str(p),
                        row=int(rows[i]), field="clicked")
    df["clicked"] = clicked.astype(bool)
    return df


def _as_click(v: Any) -> bool | None:
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer | float | np.floating) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("0", "1", "true", "false"):
        return v.strip().lower() in ("1", "true")
    return None


def _read_impressions_arrow(p: Path) -> pd.DataFrame:
    from llmhyper.paths import cache_dir

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


# -- the joined data set -----------------------------------------------------------------------

@dataclass
class CTRData:
    """Everything a run needs, with users and ads as matrix rows and columns.

    `Y[u, a]` is 1 where user u clicked ad a; `M[u, a]` is True where ad a was shown to user u.
    `warm_ads` have impressions to train on (retired ads); `cold_ads` are the targets (new ads).
    """

    name: str
    ads: list[Ad]
    features: list[FeatureSpec]
    user_ids: list[str]
    X: np.ndarray
    Y: np.ndarray
    M: np.ndarray
    train_users: np.ndarray
    test_users: np.ndarray
    warm_ads: list[str]
    cold_ads: list[str]
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ad_index = {a.id: i for i, a in enumerate(self.ads)}
        self.ad_by_id = {a.id: a for a in self.ads}

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def cols(self, ad_ids: list[str]) -> np.ndarray:
        return np.array([self.ad_index[a] for a in ad_ids], dtype=int)

    def block(self, users: np.ndarray, ad_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, Y, M) for the given user rows and ads, in that order."""
        c = self.cols(ad_ids)
        return self.X[users], self.Y[np.ix_(users, c)], self.M[np.ix_(users, c)]


def standardize(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score every column with the mean and std of `rows` (train users only, so test users leak nothing)."""
    mu = X[rows].mean(axis=0)
    sd = X[rows].std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (X - mu) / sd, mu, sd


def split_users(n_users: int, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_users)
    n_test = int(round(test_share * n_users))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_folder(folder: str | Path, *, test_share: float = 0.2, seed: int = 0,
                do_standardize: bool = True, check_images: bool = True) -> CTRData:
    """A user's own data. Cold ads: no impressions, or `metadata: {"cold": true}`; all others are warm."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("not a folder", file=str(folder))
    ads = read_ads(find_table(folder, "ads"), check_images=check_images)
    specs = read_feature_specs(find_table(folder, "features"))
    upath = find_table(folder, "users")
    users, X = read_user_features(upath, specs)
    ad_ids = [a.id for a in ads]
    imp = read_impressions(find_table(folder, "impressions"), users, ad_ids)
    uidx = {u: i for i, u in enumerate(users)}
    aidx = {a: i for i, a in enumerate(ad_ids)}
    Y = np.zeros((len(users), len(ads)), dtype=np.uint8)
    M = np.zeros((len(users), len(ads)), dtype=bool)
    ui = imp["user"].map(uidx).to_numpy()
    ai = imp["ad"].map(aidx).to_numpy()
    M[ui, ai] = True
    np.maximum.at(Y, (ui, ai), imp["clicked"].to_numpy().astype(np.uint8))
    train, test = split_users(len(users), test_share, seed)
    if do_standardize:
        X, _, _ = standardize(X, train)
    # cold = never shown, or marked `metadata.cold` (its impressions then serve only for evaluation)
    shown = M.any(axis=0)
    marked = [bool(a.metadata.get("cold")) for a in ads]
    cold = [a for a, s, m in zip(ad_ids, shown, marked, strict=True) if m or not s]
    warm = [a for a, s, m in zip(ad_ids, shown, marked, strict=True) if s and not m]
    card = {"source": str(folder), "users": len(users), "ads": len(ads), "features": len(specs),
            "impressions": int(M.sum()), "clicks": int(Y.sum()), "warm_ads": len(warm), "cold_ads": len(cold),
            "test_users": len(test), "seed": seed, "standardized": do_standardize}
    return CTRData(folder.name, ads, specs, users, X, Y, M, train, test, warm, cold, card)
