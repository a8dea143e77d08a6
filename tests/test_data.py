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
    assert len(d.ads) == 36 and len(d.features) == 7 and len(d.user_ids) == 400
    assert d.cold_ads == [f"ad{i}" for i in range(30, 36)]  # marked cold in metadata
    assert len(d.warm_ads) == 30
    assert d.M.sum() == 8400
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
    assert users[:2] == ["u0", "u1"] and X.shape == (400, 7)
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
    assert e.value.row == 37 and e.value.field == "id" and "duplicate ad id 'ad3'" in str(e.value)


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
        read_impressions(folder / "impressions.csv", [f"u{i}" for i in range(400)], [f"ad{i}" for i in range(36)])
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
    assert d.M.sum() == 8400 and d.Y.sum() == df["clicked"].sum()


def test_cli_reports_data_errors_without_traceback(folder, capsys):
    from llmhyper.cli.main import main

    (folder / "features.csv").write_text("name,description\ninterest_sports,\n")
    assert main(["data", "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmhyper: error:") and "features.csv" in err and "Traceback" not in err


# -- the example is usable end to end ------------------------------------------------------------------------


def test_example_trains_every_warm_model_and_evaluates(monkeypatch, tmp_path, capsys):
    """data/example once crashed evaluate and generate (no warm ad had enough clicks to train on)."""
    import llmhyper.cli.evaluate
    from llmhyper.cli.main import main
    from tests.fakes import HashEncoder

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llmhyper.cli.evaluate, "get_encoder", lambda spec, **kw: HashEncoder())
    out = tmp_path / "r.json"
    assert main(["evaluate", "--data", str(EXAMPLE), "--bootstrap", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_ads"] == 6 and res["n_test_users"] == 80
    assert res["methods"]["lr_warm"]["auc"]["value"] > 0.7  # the cold ads' own models: the upper bound
    assert "floor" not in capsys.readouterr().err  # every warm ad has its 20 clicks


def test_warm_floor_is_lowered_when_no_ad_reaches_it(capsys):
    from llmhyper.ctr.warm import train_warm
    from llmhyper.data.synthetic import generate_synthetic

    d = generate_synthetic(n_users=60, n_warm=6, n_cold=2, seed=0).data  # ~10 clicks per ad among train users
    t = train_warm(d, d.warm_ads, method="retired", progress=False)
    assert len(t.ad_ids) >= 3 and t.meta["floor_lowered"]["from"] == [20, 20]
    assert t.meta["min_pos"] == t.meta["floor_lowered"]["to"] < 20
    assert "training with a floor of" in capsys.readouterr().err
    d.Y[:] = 0  # no clicks at all: nothing can be trained, and that is an error, not an empty pool
    with pytest.raises(DataError, match="too few clicks"):
        train_warm(d, d.warm_ads, method="retired", progress=False)


# -- ids, repeated impressions, huge values --------------------------------------------------------------------


def test_ids_are_text(folder):
    """`007` and `7` are two users (CSV cells are read as text), and `007` keeps its zeros."""
    _rewrite_csv(folder / "users.csv", lambda df: df.__setitem__("user", df["user"].where(df.index != 0, "007")))
    _rewrite_csv(folder / "users.csv", lambda df: df.__setitem__("user", df["user"].where(df.index != 1, "7")))
    _rewrite_csv(folder / "impressions.csv", lambda df: df.__setitem__(
        "user", df["user"].replace({"u0": "007", "u1": "7"})))
    d = load_folder(folder)
    assert d.user_ids[:2] == ["007", "7"]
    assert d.M[0].sum() == (pd.read_csv(EXAMPLE / "impressions.csv")["user"] == "u0").sum()


def test_empty_user_id_is_an_error(folder):
    lines = (folder / "users.csv").read_text().splitlines()
    lines[3] = "," + lines[3].split(",", 1)[1]
    (folder / "users.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_folder(folder)
    assert e.value.row == 4 and e.value.field == "user" and "empty user id" in str(e.value)


def test_repeated_impressions(folder):
    lines = (folder / "impressions.csv").read_text().splitlines()
    user, ad, clicked, _ = lines[1].split(",")
    same = lines + [f"{user},{ad},{clicked},"]  # the same label again: counts once
    (folder / "impressions.csv").write_text("\n".join(same) + "\n")
    assert load_folder(folder).M.sum() == 8400
    opposite = lines + [f"{user},{ad},{1 - int(clicked)},"]
    (folder / "impressions.csv").write_text("\n".join(opposite) + "\n")
    with pytest.raises(DataError) as e:
        load_folder(folder)
    assert f"rows 2 and {len(lines) + 1}" in str(e.value) and "opposite clicks" in str(e.value)
    assert e.value.row == len(lines) + 1 and e.value.field == "clicked"


def test_huge_finite_values_do_not_overflow(folder):
    base = load_folder(folder)
    _rewrite_csv(folder / "users.csv", lambda df: df.__setitem__(
        "age", df["age"].astype(object).where(df.index != 5, "1e308")))
    _rewrite_csv(folder / "users.csv", lambda df: df.__setitem__("activity", df["activity"] * 1e200))
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # not even a warning
        d = load_folder(folder)
    assert np.isfinite(d.X).all()
    assert np.allclose(d.X[:, 6], base.X[:, 6])  # a column x 1e200 z-scores to the same values
    age = d.X[:, 5]
    assert np.isfinite(age).all() and age.std() > 0  # the outlier dominates the column, but nothing is zeroed


def test_standardize_is_unchanged_for_ordinary_columns():
    from llmhyper.data.contract import standardize

    X = np.random.default_rng(0).standard_normal((50, 4)) * [1, 10, 1e5, 1e-3]
    rows = np.arange(40)
    Z, mu, sd = standardize(X, rows)
    assert np.array_equal(Z, (X - X[rows].mean(0)) / X[rows].std(0))
    assert np.array_equal(mu, X[rows].mean(0))


def test_messages_show_plain_values(folder):
    df = pd.read_csv(folder / "users.csv")
    df["age"] = df["age"].astype(object)
    df.loc[2, "age"] = float("inf")
    (folder / "users.csv").unlink()
    (folder / "users.jsonl").write_text("\n".join(json.dumps(r) for r in df.to_dict("records")) + "\n")
    with pytest.raises(DataError) as e:
        load_folder(folder)
    assert "value 'inf' is not a finite number" in str(e.value) and "np." not in str(e.value)


def test_example_generates(monkeypatch, tmp_path):
    """`llmhyper generate --data data/example` (a scripted LM and the hash encoder): weights for the 6 cold ads."""
    from llmhyper.data import DataSettings
    from llmhyper.hyper.generate import GenerateSettings, run_generate
    from llmhyper.retrieval import encoders
    from llmhyper.weights import WeightTable
    from tests.fakes import HashEncoder
    from tests.scripted_lm import Handle, ScriptedEngine, scripted_lm

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(encoders._SHARED, "test-hash", HashEncoder())
    s = GenerateSettings(out=tmp_path / "run", data=DataSettings(folder=EXAMPLE), encoder="test-hash", judge=False)
    totals = run_generate(s, lm_builder=lambda lm: Handle(scripted_lm(ScriptedEngine())), progress=False)
    assert totals["ads_ok"] == 6
    assert sorted(WeightTable.load(tmp_path / "run" / "weights").ad_ids) == [f"ad{i}" for i in range(30, 36)]


# -- the synthetic worlds ---------------------------------------------------------------------------

def test_synthetic_default_world_is_unchanged():
    from llmhyper.data.synthetic import generate_synthetic

    syn = generate_synthetic()
    assert syn.data.name == "synthetic" and "unseen_topics" not in syn.data.card
    assert syn.data.feature_names == ["interest_sports", "interest_cooking", "interest_travel", "interest_tech",
                                      "interest_fashion", "age", "activity"]
    assert (len(syn.data.warm_ads), len(syn.data.cold_ads)) == (60, 12)
    # pinned numbers of the default seed: other tests and the README depend on this world
    assert syn.data.ad_by_id["ad0"].text == "An ad for a football boots, for people into sports."
    np.testing.assert_allclose(syn.truth.theta[0], [1.426943, 0.134672, 0.039712, -0.146704, 0.038258,
                                                    -0.495255, 0.340533], atol=1e-6)
    assert syn.truth.intercept[0] == pytest.approx(-2.113718, abs=1e-6) and int(syn.data.Y.sum()) == 5660


def test_synthetic_unseen_topics_world():
    from llmhyper.data import DataSettings, load_dataset
    from llmhyper.data.synthetic import TOPICS, UNSEEN_TOPICS

    data = load_dataset(DataSettings(dataset="synthetic-unseen"))
    assert data.name == "synthetic-unseen" and data.card["unseen_topics"] == list(UNSEEN_TOPICS)
    for t in UNSEEN_TOPICS:
        spec = next(s for s in data.features if s.name == f"interest_{t}")
        assert t in spec.description  # described in words, like the seen topics
    assert all(set(data.ad_by_id[a].metadata["topics"]) <= set(TOPICS) for a in data.warm_ads)
    for a in data.cold_ads:
        ad = data.ad_by_id[a]
        assert set(ad.metadata["topics"]) <= set(UNSEEN_TOPICS)
        assert all(t in ad.text for t in ad.metadata["topics"])
