"""`llmhyper score --engine ray`: Ray Data map_batches in local mode gives the local engine's output;
bad input is reported with file, row and column as locally. Skipped when the `ray` extra is missing."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install -e '.[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[ray]')")

from llmhyper.cli import score as score_cmd
from llmhyper.errors import DataError
from llmhyper.serve.batch import ScoreSettings, score_file
from llmhyper.serve.ray_jobs import RaySettings, score_file_ray
from llmhyper.serve.scorer import Scorer
from tests.test_score import assert_same_top, make_world, users_frame, write_users


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray_world")
    gen, trained = make_world(tmp)
    return Scorer.from_dirs(gen, trained, 1.0).snapshot, tmp


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_ray_equals_local(local_ray, world, suffix):
    snap, tmp = world
    users = write_users(tmp / f"users{suffix}", users_frame(500))
    local = score_file(snap, ScoreSettings(users=users, out=tmp / f"local{suffix}.parquet", k=10, chunk=64))
    s = score_file_ray(snap, ScoreSettings(users=users, out=tmp / f"ray{suffix}.parquet", k=10, chunk=64))
    assert_same_top(tmp / f"local{suffix}.parquet", tmp / f"ray{suffix}.parquet")
    assert (s.engine, s.users, s.rows, s.model_version) == ("ray", 500, local.rows, snap.version)
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False  # restored
    assert not list(tmp.glob(".ray*.tmp"))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_ray_bad_value_names_file_row_and_column(local_ray, world, suffix):
    snap, tmp = world
    df = users_frame(300).astype({"f6": object})
    df.loc[217, "f6"] = "abc" if suffix == ".csv" else np.nan
    if suffix == ".parquet":
        df["f6"] = df["f6"].astype(float)
    users = write_users(tmp / f"bad{suffix}", df)
    out = tmp / "bad_out.parquet"
    out.write_bytes(b"previous")
    with pytest.raises(DataError) as info:
        score_file_ray(snap, ScoreSettings(users=users, out=out, chunk=64))
    err = info.value
    assert (err.row, err.field) == ((219 if suffix == ".csv" else 218), "f6") and "\n" not in str(err)
    assert out.read_bytes() == b"previous" and not list(tmp.glob(".bad_out.parquet.*"))


def test_ray_missing_column_fails_before_ray_runs(local_ray, world):
    snap, tmp = world
    users = write_users(tmp / "nocol.parquet", users_frame(20).drop(columns="f1"))
    with pytest.raises(DataError, match="'f1'"):
        score_file_ray(snap, ScoreSettings(users=users, out=tmp / "x.parquet"), RaySettings())


def test_cli_ray_flag(local_ray, world, capsys):
    snap, tmp = world
    users = write_users(tmp / "cli.parquet", users_frame(120))
    parser = argparse.ArgumentParser()
    score_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["score", "--weights", str(tmp / "gen"), "--trained", str(tmp / "trained"), "--users", str(users),
               "--out", str(tmp / "cli_ray.parquet"), "--chunk", "50", "--k", "4", "--ray", "--quiet"])
    assert args.engine == "ray"
    assert score_cmd.run(args) == 0, capsys.readouterr().err
    score_file(snap, ScoreSettings(users=users, out=tmp / "cli_local.parquet", k=4, chunk=50))
    assert_same_top(tmp / "cli_ray.parquet", tmp / "cli_local.parquet")
