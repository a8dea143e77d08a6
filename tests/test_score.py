"""`llmhyper score`: batch top-k equals serve's ranking, chunking changes nothing, memory stays bounded,
bad input is one line naming file, row and column, and the output is replaced atomically."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmhyper.cli.main import main
from llmhyper.data.scaling import feature_scaling, stamp_scaling
from llmhyper.errors import DataError, LLMHyperError, MissingDependency
from llmhyper.serve import batch
from llmhyper.serve.app import handle_rank
from llmhyper.serve.batch import ScoreSettings, UserTable, score_file
from llmhyper.serve.scorer import Scorer, Snapshot
from llmhyper.weights import WeightTable

D, N_ADS = 8, 40
NAMES = [f"f{j}" for j in range(D)]


def make_world(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A generated artifact with judge flags and a trained artifact that takes over some of its ads."""
    rng = np.random.default_rng(seed)
    ids = [f"ad{i}" for i in range(N_ADS)]
    gen = WeightTable("llm_hyper", ids, NAMES, rng.normal(0, 0.6, (N_ADS, D)), rng.normal(-2, 0.5, N_ADS))
    gen.flags = {a: [NAMES[int(j)]] for a, j in zip(ids[::4], rng.integers(0, D, N_ADS // 4), strict=True)}
    handed = ids[1::5] + ["only_trained"]
    trained = WeightTable("lr_warm", handed, list(reversed(NAMES)), rng.normal(0, 0.6, (len(handed), D)),
                          rng.normal(-1.5, 0.5, len(handed)))
    gen.save(tmp_path / "gen")
    trained.save(tmp_path / "trained")
    return tmp_path / "gen", tmp_path / "trained"


def users_frame(n: int, seed: int = 1, extra: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(0, 1, (n, D)), columns=NAMES)
    df.insert(0, "user", [f"u{i}" for i in range(n)])
    if extra:
        df["country"] = "x"  # other columns are ignored
    return df


def write_users(path: Path, df: pd.DataFrame) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.fixture
def world(tmp_path):
    gen, trained = make_world(tmp_path)
    scorer = Scorer.from_dirs(gen, trained, 1.0)
    users = write_users(tmp_path / "users.parquet", users_frame(300))
    return scorer.snapshot, users, tmp_path


def read_out(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def assert_same_top(a: Path | pd.DataFrame, b: Path | pd.DataFrame) -> None:
    """Same users, ranks, ads and sources; CTRs equal up to float32 rounding (BLAS takes another kernel for
    one row than for many, and blocks rows differently, so the last bit of a CTR may differ)."""
    a, b = (read_out(x) if isinstance(x, Path) else x for x in (a, b))
    pd.testing.assert_frame_equal(a.drop(columns="ctr"), b.drop(columns="ctr"))
    np.testing.assert_allclose(a["ctr"], b["ctr"], rtol=0, atol=2.5e-7)


# -- equals serve -----------------------------------------------------------------------------------
def test_score_equals_serve_ranking(world):
    snap, users, tmp = world
    s = score_file(snap, ScoreSettings(users=users, out=tmp / "top.parquet", k=10, chunk=64))
    out = read_out(tmp / "top.parquet")
    assert list(out.columns) == ["user", "rank", "ad", "ctr", "source"]
    assert s.users == 300 and s.rows == len(out) and s.model_version == snap.version
    df = users_frame(300)
    got = {u: g for u, g in out.groupby("user", sort=False)}
    for start in range(0, 300, 100):  # serve's batch request, 100 users at a time
        part = df.iloc[start:start + 100]
        body = json.dumps({"users": [dict(zip(NAMES, row)) for row in part[NAMES].to_numpy().tolist()],
                           "k": 10, "zscored": True}).encode()
        resp = handle_rank(snap, body)
        for user, res in zip(part["user"], resp["results"], strict=True):
            ads = res["ads"]
            if not ads:
                assert user not in got
                continue
            g = got[user]
            assert g["ad"].tolist() == [a["ad_id"] for a in ads]
            assert g["source"].tolist() == [a["source"] for a in ads]
            assert g["rank"].tolist() == list(range(1, len(ads) + 1))
            np.testing.assert_allclose(g["ctr"].to_numpy(), [a["ctr"] for a in ads], atol=1e-6)
    # the world exercises both rules: trained ads are served, flags drop ads for some users
    assert set(out["source"]) == {"generated", "trained"}
    flagged = {a for a in snap.flags}
    strong = (np.abs(df[NAMES].to_numpy()) >= 1.0)
    assert strong.any() and flagged
    for row in out.itertuples():
        for f in snap.flags.get(row.ad, ()):
            assert abs(df.loc[int(row.user[1:]), f]) < 1.0  # a flagged pairing is never shown


def test_users_in_input_order_and_ctr_sorted(world):
    snap, users, tmp = world
    score_file(snap, ScoreSettings(users=users, out=tmp / "top.parquet", k=5, chunk=50))
    out = read_out(tmp / "top.parquet")
    assert list(dict.fromkeys(out["user"])) == [f"u{i}" for i in range(300)]
    for _, g in out.groupby("user"):
        assert (np.diff(g["ctr"].to_numpy()) <= 0).all() and len(g) <= 5
    meta = json.loads(pq.read_schema(tmp / "top.parquet").metadata[b"llmhyper"])
    assert meta["model_version"] == snap.version and meta["k"] == 5 and meta["features"] == "z-scored"


def test_chunking_changes_nothing(world):
    snap, users, tmp = world
    ref = None
    for chunk in (300, 1, 7, 64, 10_000):
        score_file(snap, ScoreSettings(users=users, out=tmp / f"top{chunk}.parquet", k=10, chunk=chunk))
        t = read_out(tmp / f"top{chunk}.parquet")
        ref = t if ref is None else ref
        assert_same_top(t, ref)


def test_csv_equals_parquet(world):
    snap, users, tmp = world
    csv = write_users(tmp / "users.csv", users_frame(300))
    score_file(snap, ScoreSettings(users=users, out=tmp / "a.parquet", chunk=40))
    score_file(snap, ScoreSettings(users=csv, out=tmp / "b.parquet", chunk=40))
    a, b = read_out(tmp / "a.parquet"), read_out(tmp / "b.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="ctr"), b.drop(columns="ctr"))
    np.testing.assert_allclose(a["ctr"], b["ctr"], atol=1e-6)  # CSV text round-trip of the features


def test_ranked_in_blocks_within_a_chunk(world, monkeypatch):
    snap, users, tmp = world
    sizes = []
    real = Snapshot.rank_indices

    def spy(self, X, k=10, feature_names=None):
        sizes.append(len(X))
        return real(self, X, k, feature_names)

    monkeypatch.setattr(Snapshot, "rank_indices", spy)
    monkeypatch.setattr(batch, "_BLOCK_ELEMS", 25 * snap.n_ads)
    score_file(snap, ScoreSettings(users=users, out=tmp / "top.parquet", chunk=100))
    assert max(sizes) == 25 and sum(sizes) == 300
    monkeypatch.undo()
    score_file(snap, ScoreSettings(users=users, out=tmp / "ref.parquet", chunk=100))
    assert_same_top(tmp / "top.parquet", tmp / "ref.parquet")


# -- bounded memory -----------------------------------------------------------------------------------
def test_chunk_size_is_respected(world):
    snap, users, tmp = world
    table = UserTable(users, snap.feature_names)
    sizes = [len(c) for c in table.chunks(64)]
    assert sizes == [64, 64, 64, 64, 44]
    s = score_file(snap, ScoreSettings(users=users, out=tmp / "top.parquet", k=3, chunk=64))
    assert s.chunks == 5 and s.largest_chunk == 64
    meta = pq.ParquetFile(tmp / "top.parquet").metadata
    assert meta.num_row_groups == 5 and all(meta.row_group(i).num_rows <= 64 * 3 for i in range(5))


def test_peak_memory_follows_the_chunk_not_the_file(tmp_path):
    rng = np.random.default_rng(0)
    n_ads, n_users = 400, 20_000
    WeightTable("m", [f"a{i}" for i in range(n_ads)], NAMES, rng.normal(0, 0.5, (n_ads, D)),
                rng.normal(-2, 0.5, n_ads)).save(tmp_path / "w")
    snap = Scorer.from_dirs(tmp_path / "w").snapshot
    users = write_users(tmp_path / "u.parquet", users_frame(n_users, extra=False))

    def peak(chunk: int) -> int:
        tracemalloc.start()  # numpy buffers are traced (Arrow's are not; they stay chunk-sized too)
        try:
            score_file(snap, ScoreSettings(users=users, out=tmp_path / f"o{chunk}.parquet", k=10, chunk=chunk))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, whole = peak(500), peak(n_users)
    # the whole file at once holds 20k x 400 logits (32 MB) + an int64 argpartition matrix (64 MB)
    assert small < 16e6, small
    assert small * 4 < whole, (small, whole)


# -- bad input ----------------------------------------------------------------------------------------
def one_line_error(snap, users, out, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        score_file(snap, ScoreSettings(users=users, out=out, **kw))
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_missing_feature_column(world, suffix):
    snap, _, tmp = world
    users = write_users(tmp / f"bad{suffix}", users_frame(10).drop(columns="f3"))
    err = one_line_error(snap, users, tmp / "top.parquet")
    assert err.field == "f3" and str(users) in str(err) and "feature column 'f3'" in str(err)
    users = write_users(tmp / f"nouser{suffix}", users_frame(10).drop(columns="user"))
    assert one_line_error(snap, users, tmp / "top.parquet").field == "user"


@pytest.mark.parametrize("suffix,value", [(".parquet", np.nan), (".parquet", np.inf), (".csv", np.nan),
                                          (".csv", -np.inf), (".parquet", 1e39)])
def test_non_finite_value_names_row_and_column(world, suffix, value):
    snap, _, tmp = world
    df = users_frame(200)
    df.loc[136, "f5"] = value
    users = write_users(tmp / f"bad{suffix}", df)
    err = one_line_error(snap, users, tmp / "top.parquet", chunk=50)
    assert err.field == "f5" and err.row == (138 if suffix == ".csv" else 137), str(err)
    assert str(users) in str(err)


def test_csv_text_value_names_line_and_column(world):
    snap, _, tmp = world
    df = users_frame(100).astype({"f2": object})
    df.loc[61, "f2"] = "abc"
    users = write_users(tmp / "bad.csv", df)
    err = one_line_error(snap, users, tmp / "top.parquet", chunk=10)
    assert (err.row, err.field) == (63, "f2") and "'abc'" in str(err)


def test_parquet_text_column(world):
    snap, _, tmp = world
    df = users_frame(5)
    df["f1"] = "a"
    err = one_line_error(snap, write_users(tmp / "bad.parquet", df), tmp / "top.parquet")
    assert err.field == "f1" and "not a number" in str(err)


def test_empty_and_missing_files(world):
    snap, _, tmp = world
    (tmp / "empty.csv").write_text("")
    assert "empty" in str(one_line_error(snap, tmp / "empty.csv", tmp / "top.parquet"))
    (tmp / "header.csv").write_text("user," + ",".join(NAMES) + "\n")
    assert "no rows" in str(one_line_error(snap, tmp / "header.csv", tmp / "top.parquet"))
    write_users(tmp / "none.parquet", users_frame(0))
    assert "no rows" in str(one_line_error(snap, tmp / "none.parquet", tmp / "top.parquet"))
    (tmp / "zero.parquet").write_bytes(b"")
    assert "Parquet" in str(one_line_error(snap, tmp / "zero.parquet", tmp / "top.parquet"))
    assert "not found" in str(one_line_error(snap, tmp / "nope.parquet", tmp / "top.parquet"))
    (tmp / "u.json").write_text("{}")
    assert "unsupported" in str(one_line_error(snap, tmp / "u.json", tmp / "top.parquet"))


def test_null_user_id(world):
    snap, _, tmp = world
    t = pa.Table.from_pandas(users_frame(20), preserve_index=False)
    ids = t.column("user").to_pylist()
    ids[12] = None
    t = t.set_column(0, "user", pa.array(ids, pa.string()))
    pq.write_table(t, tmp / "bad.parquet")
    err = one_line_error(snap, tmp / "bad.parquet", tmp / "top.parquet")
    assert (err.row, err.field) == (13, "user")


def test_failure_keeps_the_old_output_and_leaves_no_temp(world):
    snap, users, tmp = world
    out = tmp / "top.parquet"
    out.write_bytes(b"previous")
    df = users_frame(300)
    df.loc[250, "f0"] = np.nan  # fails in the last chunk, after earlier chunks were written
    one_line_error(snap, write_users(tmp / "bad.parquet", df), out, chunk=100)
    assert out.read_bytes() == b"previous"
    assert not list(tmp.glob(".top.parquet.*"))
    score_file(snap, ScoreSettings(users=users, out=out))
    assert pq.read_table(out).num_rows > 0 and not list(tmp.glob(".top.parquet.*"))


def test_settings_are_checked(world):
    snap, users, tmp = world
    for bad in ({"k": 0}, {"chunk": 0}, {"k": True}):
        with pytest.raises(ValueError):
            ScoreSettings(users=users, out=tmp / "o.parquet", **bad)
    with pytest.raises(LLMHyperError, match="raw"):
        score_file(snap, ScoreSettings(users=users, out=tmp / "o.parquet", raw_features=True))
    with pytest.raises(LLMHyperError, match="users file itself"):
        score_file(snap, ScoreSettings(users=users, out=users))


# -- the command ----------------------------------------------------------------------------------------
def test_cli_score(world, tmp_path, capsys):
    snap, users, tmp = world
    out = tmp / "cli.parquet"
    rc = main(["score", "--weights", str(tmp / "gen"), "--trained", str(tmp / "trained"), "--users", str(users),
               "--k", "10", "--out", str(out), "--chunk", "64", "--quiet"])
    assert rc == 0
    score_file(snap, ScoreSettings(users=users, out=tmp / "lib.parquet", chunk=64))
    assert_same_top(out, tmp / "lib.parquet")
    assert "300 users" in capsys.readouterr().err
    df = users_frame(10).drop(columns="f7")
    rc = main(["score", "--weights", str(tmp / "gen"), "--users", str(write_users(tmp / "b.csv", df)),
               "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "b.csv" in err and "'f7'" in err


def test_ray_engine_without_ray_says_how_to_install(world, monkeypatch):
    from llmhyper.serve import ray_jobs

    snap, users, tmp = world
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingDependency, match=r"\.\[ray\]"):
        ray_jobs.score_file_ray(snap, ScoreSettings(users=users, out=tmp / "o.parquet"))
    assert not (tmp / "o.parquet").exists()


def test_empty_user_id_in_csv(world):
    snap, _, tmp = world
    df = users_frame(20)
    df.loc[4, "user"] = ""
    err = one_line_error(snap, write_users(tmp / "bad.csv", df), tmp / "top.parquet")
    assert (err.row, err.field) == (6, "user")


def test_arrow_memory_does_not_grow_with_the_file(tmp_path):
    # pyarrow's iter_batches with its default pre-buffering keeps row groups it has read (here: +15 MB over
    # 200k users, +200 MB over 1M); the reader must stay flat
    rng = np.random.default_rng(0)
    names = [f"g{j}" for j in range(40)]
    schema = pa.schema([("user", pa.string())] + [(n, pa.float32()) for n in names])
    with pq.ParquetWriter(tmp_path / "big.parquet", schema) as w:
        for start in range(0, 200_000, 20_000):
            X = rng.standard_normal((20_000, 40), dtype=np.float32)
            w.write_table(pa.Table.from_arrays([pa.array([f"u{i}" for i in range(start, start + 20_000)])]
                                               + [pa.array(X[:, j]) for j in range(40)], schema=schema))
    table = UserTable(tmp_path / "big.parquet", names)
    seen = [pa.total_allocated_bytes() for _ in table.chunks(2000)]
    first, peak = max(seen[: len(seen) // 5]), max(seen)
    assert peak < first + 2e6 and peak < 25e6, (first, peak)


# -- raw features: z-scored with the artifact's scaling, as serve does (issue 16) ---------------------
MEAN = np.linspace(-5.0, 60.0, D)
STD = np.linspace(0.1, 15.0, D)


def scaled_world(tmp_path: Path) -> tuple[Snapshot, pd.DataFrame, pd.DataFrame]:
    gen, trained = make_world(tmp_path)
    scaling = feature_scaling(NAMES, MEAN, STD)
    for d in (gen, trained):
        stamp_scaling(WeightTable.load(d), scaling).save(d)
    z = users_frame(200, extra=False)
    raw = z.copy()
    raw[NAMES] = MEAN + STD * z[NAMES].to_numpy()
    return Scorer.from_dirs(gen, trained).snapshot, raw, z


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_raw_users_rank_as_their_zscored_features(tmp_path, suffix):
    snap, raw, z = scaled_world(tmp_path)
    raw_file = write_users(tmp_path / f"raw{suffix}", raw)
    z_file = write_users(tmp_path / f"z{suffix}", z)
    score_file(snap, ScoreSettings(users=raw_file, out=tmp_path / "raw_top.parquet", chunk=64))  # default: raw
    score_file(snap, ScoreSettings(users=z_file, out=tmp_path / "z_top.parquet", chunk=64, raw_features=False))
    assert_same_top(tmp_path / "raw_top.parquet", tmp_path / "z_top.parquet")
    meta = json.loads(pq.read_schema(tmp_path / "raw_top.parquet").metadata[b"llmhyper"])
    assert meta["features"].startswith("raw")
    # serve's raw request gives the same ranking
    body = json.dumps({"users": raw[NAMES].to_numpy()[:50].tolist(), "k": 10}).encode()
    out = read_out(tmp_path / "raw_top.parquet")
    for user, res in zip(raw["user"][:50], handle_rank(snap, body)["results"], strict=True):
        assert out[out["user"] == user]["ad"].tolist() == [a["ad_id"] for a in res["ads"]]


def test_cli_score_raw_by_default_and_zscored_on_request(tmp_path, capsys):
    _, raw, z = scaled_world(tmp_path)
    raw_file, z_file = write_users(tmp_path / "raw.csv", raw), write_users(tmp_path / "z.csv", z)
    base = ["score", "--weights", str(tmp_path / "gen"), "--trained", str(tmp_path / "trained"), "--k", "5"]
    assert main([*base, "--users", str(raw_file), "--out", str(tmp_path / "a.parquet")]) == 0
    assert "raw features, z-scored" in capsys.readouterr().err
    assert main([*base, "--users", str(raw_file), "--out", str(tmp_path / "b.parquet"), "--raw-features"]) == 0
    assert main([*base, "--users", str(z_file), "--out", str(tmp_path / "c.parquet"), "--zscored"]) == 0
    capsys.readouterr()
    assert_same_top(tmp_path / "a.parquet", tmp_path / "b.parquet")
    assert_same_top(tmp_path / "a.parquet", tmp_path / "c.parquet")
    # an artifact without scaling: z-scored values (with a note), --raw-features is refused in one line
    gen, _ = make_world(tmp_path / "plain")
    plain = ["score", "--weights", str(gen), "--users", str(z_file), "--out", str(tmp_path / "d.parquet")]
    assert main(plain) == 0
    assert "no feature scaling" in capsys.readouterr().err
    assert main([*plain, "--raw-features"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no feature scaling" in err and "\n" not in err


def test_raw_value_too_large_after_scaling_names_row_and_column(tmp_path):
    snap, raw, _ = scaled_world(tmp_path)
    raw.loc[3, "f0"] = 1e300
    f = write_users(tmp_path / "raw.parquet", raw)
    with pytest.raises(DataError, match=r"row 4.*'f0'.*after z-scoring"):
        score_file(snap, ScoreSettings(users=f, out=tmp_path / "o.parquet"))
