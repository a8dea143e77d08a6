"""The data contract: happy path on data/example and every documented error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmhyper.data.contract import load_folder, read_ads, read_feature_specs, read_impressions, read_user_features
from llmhyper.errors import DataError

EXAMPLE = Path(__file__).resolve().parent.parent / "data" / "example"


@pytest.fixture()
def folder(tmp_path):
    dst = tmp_path / "d"
    shutil.copytree(EXAMPLE, dst)
    return dst


def test_example_loads(folder):
    d = load_folder(folder)
    assert len(d.ads) == 12 and len(d.features) == 7 and len(d.user_ids) == 60
    assert d.cold_ads == ["ad10", "ad11"]  # marked cold in metadata
    assert len(d.warm_ads) == 10
    assert d.M.sum() == 240
    assert np.allclose(d.X[d.train_users].mean(0), 0, atol=1e-9)  # standardised on train users


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_all_formats_read_the_same(folder, fmt):
    df = pd.read_csv(folder / "users.csv")
    users_path = folder / f"users.{fmt}"
    (folder / "users.csv").unlink()
    if fmt == "jsonl":
        users_path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    elif fmt == "parquet":
        df.to_parquet(users_path)
    else:
        df.to_csv(users_path, index=False)
    specs = read_feature_specs(folder / "features.csv")
    users, X = read_user_features(users_path, specs)
    assert users[:2] == ["u0", "u1"] and X.shape == (60, 7)
    assert X[0, 0] == pytest.approx(df.iloc[0]["interest_sports"])


def _rewrite_csv(path: Path, edit) -> None:
    df = pd.read_csv(path)
    edit(df)
    df.to_csv(path, index=False)


def test_feature_without_description(folder):
    df = pd.read_csv(folder / "features.csv")
    df.loc[2, "description"] = None
    df.to_csv(folder / "features.csv", index=False)
    with pytest.raises(DataError) as e:
        read_feature_specs(folder / "features.csv")
    assert e.value.row == 4 and e.value.field == "description" and "features.csv" in str(e.value)


def test_feature_column_without_spec(folder):
    _rewrite_csv(folder / "users.csv", lambda df: df.__setitem__("mystery", 1.0))
    with pytest.raises(DataError, match="'mystery' has no description"):
        load_folder(folder)


def test_duplicate_ad_ids(folder):
    lines = (folder / "ads.jsonl").read_text().splitlines()
    (folder / "ads.jsonl").write_text("\n".join(lines + [lines[3]]))
    with pytest.raises(DataError) as e:
        read_ads(folder / "ads.jsonl")
    assert e.value.row == 13 and e.value.field == "id" and "duplicate ad id 'ad3'" in str(e.value)


def test_bad_json_line(folder):
    lines = (folder / "ads.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-3]
    (folder / "ads.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError) as e:
        read_ads(folder / "ads.jsonl")
    assert e.value.row == 5 and "not valid JSON" in str(e.value)


def test_ad_field_error_names_field(folder):
    lines = (folder / "ads.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["launch_date"] = "yesterday"
    lines[1] = json.dumps(rec)
    (folder / "ads.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError) as e:
        read_ads(folder / "ads.jsonl")
    assert e.value.row == 2 and e.value.field == "launch_date"


def test_missing_image_file(folder):
    lines = (folder / "ads.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["image"] = "images/nope.png"
    lines[0] = json.dumps(rec)
    (folder / "ads.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError) as e:
        read_ads(folder / "ads.jsonl")
    assert e.value.row == 1 and e.value.field == "image" and "nope.png" in str(e.value)


def test_unknown_user_and_ad_in_impressions(folder):
    _rewrite_csv(folder / "impressions.csv", lambda df: df.__setitem__("user", df["user"].where(df.index != 7, "ghost")))
    with pytest.raises(DataError) as e:
        load_folder(folder)
    assert e.value.row == 9 and e.value.field == "user" and "ghost" in str(e.value)
    shutil.copy(EXAMPLE / "impressions.csv", folder / "impressions.csv")
    _rewrite_csv(folder / "impressions.csv", lambda df: df.__setitem__("ad", df["ad"].where(df.index != 0, "ad99")))
    with pytest.raises(DataError, match="unknown ad 'ad99'"):
        load_folder(folder)


def test_bad_click_value(folder):
    _rewrite_csv(folder / "impressions.csv", lambda df: df.__setitem__("clicked", df["clicked"].astype(object).where(df.index != 3, "maybe")))
    with pytest.raises(DataError) as e:
        read_impressions(folder / "impressions.csv", [f"u{i}" for i in range(60)], [f"ad{i}" for i in range(12)])
    assert e.value.row == 5 and e.value.field == "clicked"


@pytest.mark.parametrize("bad", ["nan", "inf", "abc"])
def test_non_finite_features(folder, bad):
    text = (folder / "users.csv").read_text().splitlines()
    cells = text[6].split(",")
    cells[3] = bad
    text[6] = ",".join(cells)
    (folder / "users.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError) as e:
        load_folder(folder)
    assert e.value.row == 7 and e.value.field == "interest_travel" and "finite" in str(e.value)


def test_empty_table(folder):
    (folder / "impressions.csv").write_text("user,ad,clicked,time\n")
    with pytest.raises(DataError, match="empty"):
        load_folder(folder)


def test_missing_table_and_duplicate_user(folder):
    (folder / "features.csv").unlink()
    with pytest.raises(DataError, match="missing table 'features'"):
        load_folder(folder)
    shutil.copy(EXAMPLE / "features.csv", folder / "features.csv")
    text = (folder / "users.csv").read_text().splitlines()
    (folder / "users.csv").write_text("\n".join(text + [text[1]]) + "\n")
    with pytest.raises(DataError, match="duplicate user 'u0'"):
        load_folder(folder)


def test_parquet_impressions_via_arrow(folder):
    df = pd.read_csv(folder / "impressions.csv")
    df.to_parquet(folder / "impressions.parquet")
    (folder / "impressions.csv").unlink()
    d = load_folder(folder)
    assert d.M.sum() == 240 and d.Y.sum() == df["clicked"].sum()


def test_cli_reports_data_errors_without_traceback(folder, capsys):
    from llmhyper.cli.main import main

    (folder / "features.csv").write_text("name,description\ninterest_sports,\n")
    assert main(["data", "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmhyper: error:") and "features.csv" in err and "Traceback" not in err
