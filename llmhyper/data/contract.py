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

from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmhyper.data.scaling import Scaling, feature_scaling, identity_scaling
from llmhyper.data.tables import (
    blank_cells,
    find_table,
    id_column,
    is_missing,
    one_line,
    parse_rows,
    read_frame,
    read_impressions_arrow,
    show,
)
from llmhyper.errors import DataError

RESERVED_COLUMNS = ("user", "__row__")
IMPRESSION_COLUMNS = ("user", "ad", "clicked", "time")
HUGE = 1e100  # feature columns with values beyond this are rescaled before z-scoring


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
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("id", "title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class FeatureSpec(BaseModel):
    """A user feature and the natural-language definition the LLM reads."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_'\-]*$")
    description: str = Field(min_length=3)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_COLUMNS:
            raise ValueError(f"'{v}' is reserved (the users table's id column), choose another feature name")
        return v


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


# -- the four tables ---------------------------------------------------------------------------


def read_ads(path: str | Path, image_root: str | Path | None = None, check_images: bool = True) -> list[Ad]:
    df = read_frame(path)
    ads = parse_rows(df, Ad, path)
    seen: dict[str, int] = {}
    rows = df["__row__"].tolist()
    root = Path(image_root) if image_root else Path(path).parent
    for ad, row in zip(ads, rows, strict=True):
        if ad.id in seen:
            raise DataError(
                f"duplicate ad id '{ad.id}' (first at row {seen[ad.id]})", file=str(path), row=row, field="id"
            )
        seen[ad.id] = row
        if not isinstance(ad.metadata.get("cold", False), bool):
            raise DataError(
                f"'cold' must be true or false, got {show(ad.metadata['cold'])}",
                file=str(path),
                row=row,
                field="metadata.cold",
            )
        if ad.image:
            img = Path(ad.image) if Path(ad.image).is_absolute() else root / ad.image
            if check_images:
                _check_image(img, path, row)
            ad.image = str(img)
    return ads


def _check_image(img: Path, path: str | Path, row: int) -> None:
    """The file exists and its header is an image format Pillow knows (reads a few bytes, not the pixels)."""
    from PIL import Image, UnidentifiedImageError

    if not img.is_file():
        raise DataError(f"image file not found: {img}", file=str(path), row=row, field="image")
    try:
        with Image.open(img):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(
            f"not a readable image: {img} ({one_line(exc, 80)})", file=str(path), row=row, field="image"
        ) from None


def read_feature_specs(path: str | Path) -> list[FeatureSpec]:
    df = read_frame(path)
    if "description" not in df.columns:
        raise DataError(
            "no 'description' column: every feature needs a natural-language description",
            file=str(path),
            row=int(df["__row__"].iloc[0]),
            field="description",
        )
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
        raise DataError(
            f"feature column '{extra[0]}' has no description in the feature table",
            file=str(path),
            row=int(df["__row__"].iloc[0]),
            field=extra[0],
        )
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise DataError(
            f"feature '{missing[0]}' is described but has no column", file=str(path), field=missing[0]
        )
    users = id_column(df, "user", path).tolist()
    rows = df["__row__"].to_numpy()
    dup = pd.Series(users).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"duplicate user '{users[i]}'", file=str(path), row=int(rows[i]), field="user")
    X = np.empty((len(df), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        raw = df[name]
        col = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)  # spaces around it are fine
        bad = ~np.isfinite(col)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = (
                "missing value"
                if is_missing(raw.iloc[i])
                else f"value {show(raw.iloc[i])} is not a finite number"
            )
            raise DataError(
                f"{what} ({int(bad.sum())} bad cells in this column)",
                file=str(path),
                row=int(rows[i]),
                field=name,
            )
        X[:, j] = col
    return users, X


def read_impressions(path: str | Path, users: list[str], ads: list[str]) -> pd.DataFrame:
    """Impressions as a validated frame (user, ad, clicked), one row per (user, ad). Large logs are read
    memory-mapped through `datasets` (Arrow) and checked column-wise, not row by row.

    Repeated rows of one user and ad with the same label count once; with opposite labels they are an error
    (the log must say whether that user clicked that ad)."""
    p = Path(path)
    df = read_impressions_arrow(p) if p.suffix == ".parquet" else read_frame(p)
    for col in ("user", "ad", "clicked"):
        if col not in df.columns:
            raise DataError(f"no '{col}' column", file=str(p), field=col)
    extra = [c for c in df.columns if c not in IMPRESSION_COLUMNS and c != "__row__"]
    if extra:
        raise DataError(
            f"unknown column '{extra[0]}' (an impression has {', '.join(IMPRESSION_COLUMNS)})",
            file=str(p),
            field=str(extra[0]),
        )
    rows = df["__row__"].to_numpy()
    df["user"], df["ad"] = id_column(df, "user", p), id_column(df, "ad", p)
    for col, known in (("user", set(users)), ("ad", set(ads))):
        unknown = ~df[col].isin(known).to_numpy()
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise DataError(
                f"unknown {col} '{df[col].iloc[i]}' ({int(unknown.sum())} rows name unknown {col}s)",
                file=str(p),
                row=int(rows[i]),
                field=col,
            )
    clicked = df["clicked"].map(_as_click)
    bad = clicked.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"clicked must be 0/1 or true/false, got {show(df['clicked'].iloc[i])}",
            file=str(p),
            row=int(rows[i]),
            field="clicked",
        )
    df["clicked"] = clicked.astype(bool)
    if "time" in df.columns:
        _check_times(df, p)
    return _one_per_pair(df, p)


def _check_times(df: pd.DataFrame, p: Path) -> None:
    raw = df["time"]
    if pd.api.types.is_datetime64_any_dtype(raw) or pd.api.types.is_numeric_dtype(raw):
        return  # a timestamp type, or seconds since the epoch
    given = ~blank_cells(raw)
    if not given.any():
        return
    parsed = pd.to_datetime(raw[given].astype(str).str.strip(), errors="coerce", format="ISO8601", utc=True)
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(given)[np.flatnonzero(bad)[0]])
        raise DataError(
            f"time must be an ISO 8601 date or date-time, got {show(raw.iloc[i])}",
            file=str(p),
            row=int(df["__row__"].iloc[i]),
            field="time",
        )


def _one_per_pair(df: pd.DataFrame, p: Path) -> pd.DataFrame:
    dup = df.duplicated(["user", "ad"], keep=False).to_numpy()
    if not dup.any():
        return df
    d = df[dup]
    labels = d.groupby(["user", "ad"], sort=False)["clicked"].nunique()
    clash = labels[labels > 1]
    if len(clash):
        user, ad = clash.index[0]
        same = d[(d["user"] == user) & (d["ad"] == ad)]
        r_click = int(same.loc[same["clicked"], "__row__"].iloc[0])
        r_none = int(same.loc[~same["clicked"], "__row__"].iloc[0])
        raise DataError(
            f"user '{user}' and ad '{ad}' appear at rows {min(r_click, r_none)} and "
            f"{max(r_click, r_none)} with opposite clicks ({len(clash)} such pairs); keep one "
            "impression per user and ad (e.g. clicked = any click)",
            file=str(p),
            row=max(r_click, r_none),
            field="clicked",
        )
    return df.drop_duplicates(["user", "ad"], keep="first")


def _as_click(v: Any) -> bool | None:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("true", "false"):
            return t == "true"
        try:
            f = float(t)
        except ValueError:
            return None
        return bool(f) if f in (0.0, 1.0) else None
    return None


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
    truth: Any = None  # the true weights (a WeightTable) where a synthetic world knows them
    scaling: Scaling | None = None  # raw -> model features (`data.scaling`); None: no raw features known

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
    """Z-score every column with the mean and std of `rows` (train users only, so test users leak nothing).

    A column with huge values (beyond 1e100, up to the float maximum ~1.8e308) is first divided by its
    largest magnitude, so its sums cannot overflow; ordinary columns are computed exactly as before."""
    X = np.asarray(X, dtype=np.float64)
    big = np.abs(X).max(axis=0, initial=0.0)
    scale = np.where(big > HUGE, big, 1.0)
    Xs = X / scale
    mu_s = Xs[rows].mean(axis=0)
    sd_s = Xs[rows].std(axis=0)
    sd_s = np.where(sd_s > 1e-12, sd_s, 1.0)
    return (Xs - mu_s) / sd_s, mu_s * scale, sd_s * scale


def split_users(n_users: int, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_users)
    n_test = int(round(test_share * n_users))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def check_usable(
    folder: Path,
    ad_ids: list[str],
    warm: list[str],
    cold: list[str],
    Y: np.ndarray,
    M: np.ndarray,
    train: np.ndarray,
) -> None:
    """A folder the pipeline can work with: some cold ads (the targets) and some warm ads with both a click
    and a non-click among the train users (else no warm model, hence no few-shot example, can be fit)."""
    if not cold:
        raise DataError(
            "no cold ads: every ad has impressions; mark the new ads with metadata "
            '{"cold": true} or leave them without impressions',
            file=str(folder),
        )
    if not warm:
        raise DataError(
            "no warm ads: every ad is cold (marked cold or never shown); the program learns from "
            "warm ads with impressions",
            file=str(folder),
        )
    pos_of = {a: i for i, a in enumerate(ad_ids)}
    cols = [pos_of[a] for a in warm]
    shown = M[np.ix_(train, cols)]
    pos = (Y[np.ix_(train, cols)].astype(bool) & shown).sum(axis=0)
    neg = shown.sum(axis=0) - pos
    if not ((pos > 0) & (neg > 0)).any():
        raise DataError(
            f"too few clicks to train any warm model: none of the {len(warm)} warm ads has "
            f"both a click and a non-click among the {len(train)} train users ({int(pos.sum())} clicks, "
            f"{int(neg.sum())} non-clicks in all)",
            file=str(folder),
        )


def load_folder(
    folder: str | Path,
    *,
    test_share: float = 0.2,
    seed: int = 0,
    do_standardize: bool = True,
    check_images: bool = True,
) -> CTRData:
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
    Y[ui, ai] = imp["clicked"].to_numpy().astype(np.uint8)  # one row per (user, ad) after read_impressions
    train, test = split_users(len(users), test_share, seed)
    scaling = identity_scaling([s.name for s in specs])  # the model sees the values as they are
    if do_standardize:
        X, mu, sd = standardize(X, train)
        scaling = feature_scaling([s.name for s in specs], mu, sd)
    # cold = never shown, or marked `metadata.cold` (its impressions then serve only for evaluation)
    shown = M.any(axis=0)
    marked = [a.metadata.get("cold") is True for a in ads]
    cold = [a for a, s, m in zip(ad_ids, shown, marked, strict=True) if m or not s]
    warm = [a for a, s, m in zip(ad_ids, shown, marked, strict=True) if s and not m]
    check_usable(folder, ad_ids, warm, cold, Y, M, train)
    card = {
        "source": str(folder),
        "users": len(users),
        "ads": len(ads),
        "features": len(specs),
        "impressions": int(M.sum()),
        "clicks": int(Y.sum()),
        "warm_ads": len(warm),
        "cold_ads": len(cold),
        "test_users": len(test),
        "seed": seed,
        "standardized": do_standardize,
    }
    return CTRData(folder.name, ads, specs, users, X, Y, M, train, test, warm, cold, card, scaling=scaling)
