"""A corpus of malformed inputs: data folders (each table, each kind of damage), weight artifacts, command-line
values, program files and recipes. Each must end in one line naming what is wrong (exit code 2: the
`llmhyper: error: ...` line, or argparse's usage error), never in a traceback.

Everything runs in tmp_path on a tiny synthetic folder; the encoders are the hash fake, never MiniLM."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llmhyper.cli.main import main
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.retrieval.encoders import get_encoder as REAL_GET_ENCODER
from llmhyper.weights import WeightTable
from tests.fakes import HashEncoder

N_WARM, N_COLD = 6, 2


# -- fixtures and helpers ---------------------------------------------------------------------------------------


def write_folder(out: Path, n_users: int = 80) -> Path:
    """A valid tiny folder: every user saw every ad; the last N_COLD ads are marked cold."""
    d = generate_synthetic(n_users=n_users, n_warm=N_WARM, n_cold=N_COLD, seed=0).data
    out.mkdir(parents=True)
    with open(out / "ads.jsonl", "w") as f:
        for ad in d.ads:
            rec = ad.model_dump(mode="json", exclude_none=True)
            rec["metadata"]["cold"] = ad.id in d.cold_ads
            f.write(json.dumps(rec) + "\n")
    pd.DataFrame([f.model_dump() for f in d.features]).to_csv(out / "features.csv", index=False)
    users = pd.DataFrame(d.X.round(4), columns=d.feature_names)
    users.insert(0, "user", d.user_ids)
    users.to_csv(out / "users.csv", index=False)
    rows = [{"user": u, "ad": a.id, "clicked": int(d.Y[i, j]), "time": "2024-02-01T12:00:00"}
            for i, u in enumerate(d.user_ids) for j, a in enumerate(d.ads)]
    pd.DataFrame(rows).to_csv(out / "impressions.csv", index=False)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("base") / "d")


@pytest.fixture()
def folder(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "d"))


@pytest.fixture(autouse=True)
def _fake_encoder(monkeypatch, tmp_path):
    import llmhyper.cli.evaluate
    import llmhyper.retrieval.encoders

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    fake = lambda spec="x", **kw: HashEncoder()  # noqa: E731
    monkeypatch.setattr(llmhyper.retrieval.encoders, "get_encoder", fake)
    monkeypatch.setattr(llmhyper.cli.evaluate, "get_encoder", fake)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expect: str) -> str:
    """Exit code 2, no traceback, exactly one error line (the last), which names every `expect`."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], err
    line = errors[0]
    assert line.startswith("llmhyper: error: ") or line.startswith("llmhyper "), line
    for e in expect:
        assert e in line, f"{e!r} not in {line!r}"
    return line


def jsonl_edit(path: Path, i: int, edit: Callable[[dict], None]) -> None:
    lines = path.read_text().splitlines()
    rec = json.loads(lines[i])
    edit(rec)
    lines[i] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def csv_edit(path: Path, edit: Callable[[pd.DataFrame], None]) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df)
    df.to_csv(path, index=False)


def cell(path: Path, row: int, col: str, value) -> None:
    """Set one CSV cell; `row` counts data rows from 0 (the file's line row + 2)."""
    csv_edit(path, lambda df: df.__setitem__(col, df[col].where(df.index != row, value)))


def lines_edit(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def to_format(folder: Path, stem: str, fmt: str, edit: Callable[[pd.DataFrame], None] | None = None) -> None:
    """Rewrite a CSV table as JSONL or Parquet (with an optional edit of the frame first)."""
    src = folder / f"{stem}.csv"
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    if edit:
        edit(df)
    src.unlink()
    if fmt == "parquet":
        df.to_parquet(folder / f"{stem}.parquet")
    else:
        (folder / f"{stem}.jsonl").write_text("\n".join(json.dumps(r) for r in df.to_dict("records")) + "\n")


# -- data folders: `llmhyper data --data DIR` -------------------------------------------------------------------
# (case id, damage, words the error line must hold)

def _users_null(df: pd.DataFrame) -> None:
    df["user"] = df["user"].astype(object)
    df.loc[4, "user"] = None


DATA_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    # ads
    ("ads-missing", lambda f: (f / "ads.jsonl").unlink(), ("missing table 'ads'",)),
    ("ads-two-tables", lambda f: (f / "ads.csv").write_text("id,title\nx,y\n"), ("more than one 'ads' table",)),
    ("ads-bad-json", lambda f: lines_edit(f / "ads.jsonl", lambda ls: ls[:2] + [ls[2][:-4]] + ls[3:]),
     ("ads.jsonl", "row 3", "not valid JSON")),
    ("ads-line-is-list", lambda f: lines_edit(f / "ads.jsonl", lambda ls: ls[:1] + ["[1, 2]"] + ls[2:]),
     ("ads.jsonl", "row 2", "JSON object")),
    ("ads-deep-json", lambda f: lines_edit(f / "ads.jsonl", lambda ls: ls + ['{"id": ' + "[" * 100000 + "]" * 100000 + "}"]),
     ("ads.jsonl", "row 9", "not valid JSON")),
    ("ads-duplicate-id", lambda f: jsonl_edit(f / "ads.jsonl", 3, lambda r: r.update(id="ad1")),
     ("row 4", "field 'id'", "duplicate ad id 'ad1'")),
    ("ads-blank-id", lambda f: jsonl_edit(f / "ads.jsonl", 1, lambda r: r.update(id="   ")),
     ("row 2", "field 'id'", "is empty")),
    ("ads-null-id", lambda f: jsonl_edit(f / "ads.jsonl", 1, lambda r: r.update(id=None)), ("row 2", "field 'id'")),
    ("ads-float-id", lambda f: jsonl_edit(f / "ads.jsonl", 1, lambda r: r.update(id=1.5)), ("row 2", "field 'id'")),
    ("ads-no-title", lambda f: jsonl_edit(f / "ads.jsonl", 0, lambda r: r.pop("title")),
     ("row 1", "field 'title'")),
    ("ads-blank-title", lambda f: jsonl_edit(f / "ads.jsonl", 0, lambda r: r.update(title=" ")),
     ("row 1", "field 'title'", "is empty")),
    ("ads-bad-date", lambda f: jsonl_edit(f / "ads.jsonl", 2, lambda r: r.update(launch_date="yesterday")),
     ("row 3", "field 'launch_date'")),
    ("ads-metadata-list", lambda f: jsonl_edit(f / "ads.jsonl", 2, lambda r: r.update(metadata=[1, 2])),
     ("row 3", "field 'metadata'")),
    ("ads-cold-not-bool", lambda f: jsonl_edit(f / "ads.jsonl", 7, lambda r: r["metadata"].update(cold="yes")),
     ("row 8", "metadata.cold", "true or false")),
    ("ads-unknown-field", lambda f: jsonl_edit(f / "ads.jsonl", 0, lambda r: r.update(colour="red")),
     ("row 1", "field 'colour'")),
    ("ads-image-missing", lambda f: jsonl_edit(f / "ads.jsonl", 0, lambda r: r.update(image="img/nope.png")),
     ("row 1", "field 'image'", "nope.png")),
    ("ads-image-not-image", lambda f: ((f / "bad.png").write_text("not a picture"),
                                       jsonl_edit(f / "ads.jsonl", 0, lambda r: r.update(image="bad.png"))),
     ("row 1", "field 'image'", "not a readable image")),
    ("ads-image-folder", lambda f: ((f / "imgdir").mkdir(),
                                    jsonl_edit(f / "ads.jsonl", 0, lambda r: r.update(image="imgdir"))),
     ("row 1", "field 'image'")),
    ("ads-not-utf8", lambda f: (f / "ads.jsonl").write_bytes(b'{"id": "a\xff\xfe"}\n'), ("ads.jsonl", "UTF-8")),
    ("ads-empty-file", lambda f: (f / "ads.jsonl").write_text(""), ("ads.jsonl", "empty")),
    ("ads-a-folder", lambda f: ((f / "ads.jsonl").unlink(), (f / "ads.jsonl").mkdir()),
     ("ads.jsonl", "found a folder")),
    ("ads-csv-bad-metadata", lambda f: (f / "ads.jsonl").unlink() or (f / "ads.csv").write_text(
        'id,title,metadata\nad0,A,{not json\n'), ("ads.csv", "row 2", "metadata")),
    # features
    ("features-no-description-column", lambda f: (f / "features.csv").write_text("name\ninterest_sports\n"),
     ("features.csv", "field 'description'")),
    ("features-empty-description", lambda f: cell(f / "features.csv", 2, "description", ""),
     ("features.csv", "row 4", "field 'description'")),
    ("features-bad-name", lambda f: cell(f / "features.csv", 0, "name", "1st-feature"),
     ("features.csv", "row 2", "field 'name'")),
    ("features-duplicate", lambda f: cell(f / "features.csv", 1, "name", "interest_sports"),
     ("features.csv", "row 3", "duplicate feature 'interest_sports'")),
    ("features-reserved-name", lambda f: cell(f / "features.csv", 0, "name", "user"),
     ("features.csv", "row 2", "reserved")),
    ("features-ragged-csv", lambda f: lines_edit(f / "features.csv", lambda ls: ls[:2] + [ls[2] + ",x,y"] + ls[3:]),
     ("features.csv", "could not be read")),
    ("features-header-only", lambda f: (f / "features.csv").write_text("name,description\n"),
     ("features.csv", "empty")),
    # users
    ("users-no-user-column", lambda f: csv_edit(f / "users.csv", lambda df: df.rename(columns={"user": "uid"},
                                                                                      inplace=True)),
     ("users.csv", "no 'user' column")),
    ("users-column-without-spec", lambda f: csv_edit(f / "users.csv", lambda df: df.__setitem__("mystery", "1")),
     ("users.csv", "'mystery' has no description")),
    ("users-feature-without-column", lambda f: csv_edit(f / "users.csv", lambda df: df.pop("age")),
     ("users.csv", "field 'age'", "has no column")),
    ("users-duplicate", lambda f: cell(f / "users.csv", 5, "user", "u0"),
     ("users.csv", "row 7", "duplicate user 'u0'")),
    ("users-empty-id", lambda f: cell(f / "users.csv", 3, "user", ""), ("users.csv", "row 5", "empty user id")),
    ("users-text-value", lambda f: cell(f / "users.csv", 5, "interest_travel", "abc"),
     ("users.csv", "row 7", "field 'interest_travel'", "'abc' is not a finite number")),
    ("users-inf", lambda f: cell(f / "users.csv", 5, "age", "inf"), ("row 7", "field 'age'", "'inf'")),
    ("users-nan", lambda f: cell(f / "users.csv", 5, "age", "nan"), ("row 7", "field 'age'", "'nan'")),
    ("users-overflow", lambda f: cell(f / "users.csv", 5, "age", "1e400"), ("row 7", "field 'age'", "'1e400'")),
    ("users-missing-cell", lambda f: cell(f / "users.csv", 5, "age", ""), ("row 7", "field 'age'", "missing value")),
    ("users-jsonl-null-id", lambda f: to_format(f, "users", "jsonl", _users_null),
     ("users.jsonl", "row 5", "empty user id")),
    ("users-parquet-null-id", lambda f: to_format(f, "users", "parquet", _users_null),
     ("users.parquet", "row 5", "empty user id")),
    ("users-jsonl-inf", lambda f: to_format(f, "users", "jsonl", lambda df: df.__setitem__(
        "age", df["age"].astype(float).where(df.index != 2, float("inf")))), ("users.jsonl", "row 3", "'inf'")),
    # impressions
    ("impressions-no-clicked", lambda f: csv_edit(f / "impressions.csv", lambda df: df.pop("clicked")),
     ("impressions.csv", "no 'clicked' column")),
    ("impressions-no-user", lambda f: csv_edit(f / "impressions.csv", lambda df: df.pop("user")),
     ("impressions.csv", "no 'user' column")),
    ("impressions-unknown-column", lambda f: csv_edit(f / "impressions.csv", lambda df: df.__setitem__("pos", "1")),
     ("impressions.csv", "unknown column 'pos'")),
    ("impressions-unknown-user", lambda f: cell(f / "impressions.csv", 7, "user", "ghost"),
     ("impressions.csv", "row 9", "unknown user 'ghost'")),
    ("impressions-unknown-ad", lambda f: cell(f / "impressions.csv", 0, "ad", "ad99"),
     ("impressions.csv", "row 2", "unknown ad 'ad99'")),
    ("impressions-id-007", lambda f: cell(f / "impressions.csv", 0, "user", "007"),
     ("impressions.csv", "row 2", "unknown user '007'")),
    ("impressions-bad-click", lambda f: cell(f / "impressions.csv", 3, "clicked", "maybe"),
     ("row 5", "field 'clicked'", "'maybe'")),
    ("impressions-click-2", lambda f: cell(f / "impressions.csv", 3, "clicked", "2"), ("row 5", "field 'clicked'")),
    ("impressions-empty-click", lambda f: cell(f / "impressions.csv", 3, "clicked", ""), ("row 5", "field 'clicked'")),
    ("impressions-empty-ad", lambda f: cell(f / "impressions.csv", 3, "ad", ""), ("row 5", "empty ad id")),
    ("impressions-bad-time", lambda f: cell(f / "impressions.csv", 4, "time", "yesterday"),
     ("row 6", "field 'time'", "ISO 8601")),
    ("impressions-opposite-labels", lambda f: lines_edit(f / "impressions.csv", lambda ls: ls + [
        ls[1].replace(",0,", ",9,").replace(",1,", ",0,").replace(",9,", ",1,")]),
     ("impressions.csv", "rows 2 and", "opposite clicks")),
    ("impressions-header-only", lambda f: (f / "impressions.csv").write_text("user,ad,clicked,time\n"),
     ("impressions.csv", "empty")),
    ("impressions-parquet-garbage", lambda f: ((f / "impressions.csv").unlink(),
                                               (f / "impressions.parquet").write_bytes(b"PAR1 nope")),
     ("impressions.parquet", "could not be read")),
    # the folder as a whole
    ("no-cold-ads", lambda f: lines_edit(f / "ads.jsonl", lambda ls: [ln.replace('"cold": true', '"cold": false')
                                                                      for ln in ls]), ("no cold ads",)),
    ("no-warm-ads", lambda f: lines_edit(f / "ads.jsonl", lambda ls: [ln.replace('"cold": false', '"cold": true')
                                                                      for ln in ls]), ("no warm ads",)),
    ("no-clicks", lambda f: csv_edit(f / "impressions.csv", lambda df: df.__setitem__("clicked", "0")),
     ("too few clicks to train any warm model",)),
    ("all-clicks", lambda f: csv_edit(f / "impressions.csv", lambda df: df.__setitem__("clicked", "1")),
     ("too few clicks",)),
    ("one-user", lambda f: (csv_edit(f / "users.csv", lambda df: df.drop(index=range(1, len(df)), inplace=True)),
                            csv_edit(f / "impressions.csv", lambda df: df.drop(index=df.index[df["user"] != "u0"],
                                                                               inplace=True))),
     ("too few clicks",)),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_damaged_data_folder(case, folder, capsys):
    _, damage, expect = case
    damage(folder)
    assert_one_line_error(*run_cli(["data", "--data", str(folder)], capsys), *expect)


def test_data_path_is_a_file_or_missing(folder, capsys):
    assert_one_line_error(*run_cli(["data", "--data", str(folder / "users.csv")], capsys), "is a file")
    assert_one_line_error(*run_cli(["data", "--data", str(folder / "nope")], capsys), "not found")


def test_cold_ads_without_labels_cannot_be_evaluated(folder, capsys):
    """Generation needs no labels for cold ads; evaluation does, and says so in one line."""
    csv_edit(folder / "impressions.csv", lambda df: df.drop(index=df.index[df["ad"].isin(["ad6", "ad7"])],
                                                             inplace=True))
    assert run_cli(["data", "--data", str(folder)], capsys)[0] == 0
    code, err = run_cli(["evaluate", "--data", str(folder), "--bootstrap", "5"], capsys)
    assert_one_line_error(code, err, "none of the 2 cold ads can be evaluated", "impressions among the test users")


# -- weight artifacts: `llmhyper evaluate --weights DIR` --------------------------------------------------------


@pytest.fixture()
def artifact(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(3)]
    WeightTable("mine", ["ad6", "ad7"], names, rng.standard_normal((2, 3)), np.zeros(2)).save(tmp_path / "w")
    return tmp_path / "w"


def _npz(art: Path, drop_sha: bool = True, **replace) -> None:
    """Rewrite weights.npz with some arrays replaced (None removes one); drop the JSON's hash so the
    damage reaches the array checks."""
    with np.load(art / "weights.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in replace.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(art / "weights.npz", **arrays)
    if drop_sha:
        _json(art, lambda info: info.pop("npz_sha256"))


def _json(art: Path, edit: Callable[[dict], None]) -> None:
    info = json.loads((art / "weights.json").read_text())
    edit(info)
    (art / "weights.json").write_text(json.dumps(info))


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


WEIGHT_CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("missing-folder", lambda a: shutil.rmtree(a), ("no weight artifact here",)),
    ("a-file", lambda a: (shutil.rmtree(a), a.write_text("x")), ("no weight artifact here",)),
    ("no-npz", lambda a: (a / "weights.npz").unlink(), ("weights.npz",)),
    ("no-json", lambda a: (a / "weights.json").unlink(), ("weights.json",)),
    ("truncated-npz", lambda a: _cut(a / "weights.npz", 100), ("weights.npz", "does not match")),
    ("truncated-npz-no-hash", lambda a: (_json(a, lambda i: i.pop("npz_sha256")), _cut(a / "weights.npz", 100)),
     ("weights.npz", "damaged weight arrays")),
    ("empty-npz", lambda a: (_json(a, lambda i: i.pop("npz_sha256")), (a / "weights.npz").write_bytes(b"")),
     ("weights.npz", "damaged weight arrays")),
    ("npz-wrong-keys", lambda a: _npz(a, theta=None), ("weights.npz", "lack ['theta']")),
    ("npz-shape-mismatch", lambda a: _npz(a, theta=np.zeros((3, 3))), ("weights.npz", "theta has shape")),
    ("npz-intercept-shape", lambda a: _npz(a, intercept=np.zeros(5)), ("weights.npz", "intercept")),
    ("npz-nan", lambda a: _npz(a, theta=np.full((2, 3), np.nan)), ("field 'theta'", "not finite")),
    ("npz-huge", lambda a: _npz(a, theta=np.full((2, 3), 1e300)), ("field 'theta'", "exceed")),
    ("npz-huge-intercept", lambda a: _npz(a, intercept=np.array([0.0, -1e7])), ("field 'intercept'", "exceed")),
    ("npz-text-theta", lambda a: _npz(a, theta=np.array([["a", "b", "c"]] * 2)), ("must be numbers",)),
    ("npz-object-array", lambda a: _npz(a, theta=np.array([{"a": 1}] * 2, dtype=object)),
     ("damaged weight arrays",)),
    ("npz-0d-ids", lambda a: _npz(a, ad_ids=np.array("ad6")), ("field 'ad_ids'", "1-d")),
    ("npz-duplicate-ids", lambda a: _npz(a, ad_ids=np.array(["ad6", "ad6"])), ("duplicate ad ids",)),
    ("json-a-list", lambda a: (a / "weights.json").write_text("[1, 2]"), ("weights.json", "JSON object")),
    ("json-invalid", lambda a: (a / "weights.json").write_text("{not json"), ("weights.json", "damaged")),
    ("json-flags-list", lambda a: _json(a, lambda i: i.update(flags=["age"])), ("field 'flags'",)),
    ("json-flags-values", lambda a: _json(a, lambda i: i.update(flags={"ad6": "age"})), ("field 'flags'",)),
    ("json-meta-list", lambda a: _json(a, lambda i: i.update(meta=[1])), ("field 'meta'",)),
    ("json-method-not-text", lambda a: _json(a, lambda i: i.update(method={"x": 1})), ("field 'method'",)),
    ("json-features-differ", lambda a: _json(a, lambda i: i.update(feature_names=["a", "b", "c"])),
     ("field 'feature_names'",)),
    ("json-n-ads-differ", lambda a: _json(a, lambda i: i.update(n_ads=7)), ("field 'n_ads'",)),
    ("other-data", lambda a: None, ("'mine' lacks 7 features of synthetic", "other data")),
    ("named-like-a-baseline", lambda a: _json(a, lambda i: i.update(method="knn_cal")),
     ("'knn_cal'", "name of a baseline")),
]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_damaged_weight_artifact(case, artifact, capsys):
    _, damage, expect = case
    damage(artifact)
    code, err = run_cli(["evaluate", "--dataset", "synthetic", "--weights", str(artifact)], capsys)
    assert_one_line_error(code, err, *expect)


def test_same_artifact_twice(artifact, capsys):
    code, err = run_cli(["evaluate", "--dataset", "synthetic", "--weights", str(artifact), "--weights",
                         str(artifact) + "/"], capsys)
    assert_one_line_error(code, err, "given twice")


# -- command-line values ----------------------------------------------------------------------------------------

EV = ["evaluate", "--dataset", "synthetic"]
GEN = ["generate", "--dataset", "synthetic", "--out", "{tmp}/run", "--lm", "openai/none", "--api-base",
       "http://127.0.0.1:9"]
CLI_CASES: list[tuple[str, list[str], tuple[str, ...]]] = [  # "{tmp}" is the test's tmp_path
    ("dataset-typo", ["data", "--dataset", "synthetic-typo"], ("--dataset", "invalid choice")),
    ("data-empty", ["data", "--data", ""], ("--data", "must not be empty")),
    ("seed-negative", ["data", "--dataset", "synthetic", "--seed", "-1"], ("--seed", "0 or more")),
    ("seed-text", ["data", "--dataset", "synthetic", "--seed", "one"], ("--seed", "whole number")),
    ("k-zero", EV + ["--k", "0"], ("--k", "at least 1")),
    ("edit-shots-above-k", ["edit", "compile", "--dataset", "synthetic", "--shots", "5,3", "--k", "3"], ("--shots 5", "--k 3")),
    ("edit-shots-repeated", ["edit", "compile", "--dataset", "synthetic", "--shots", "3,3"], ("--shots", "distinct")),
    ("encoder-empty", EV + ["--encoder", ""], ("--encoder", "must not be empty")),
    ("bootstrap-negative", EV + ["--bootstrap", "-1"], ("--bootstrap", "0 or more")),
    ("bootstrap-text", EV + ["--bootstrap", "many"], ("--bootstrap",)),
    ("json-under-a-file", EV + ["--json", "{tmp}/a_file/out.json"], ("a_file is a file",)),
    ("json-is-a-folder", EV + ["--json", "{tmp}/a_dir"], ("it is a folder",)),
    ("save-is-a-file", EV + ["--save", "{tmp}/a_file"], ("it is a file",)),
    ("save-under-a-file", EV + ["--save", "{tmp}/a_file/w"], ("a_file is a file",)),
    ("weights-empty", EV + ["--weights", ""], ("--weights", "must not be empty")),
    ("limit-negative", GEN + ["--limit", "-1"], ("--limit",)),
    ("limit-zero", GEN + ["--limit", "0"], ("--limit",)),
    ("ads-empty", GEN + ["--ads", ""], ("--ads",)),
    ("ads-only-commas", GEN + ["--ads", " , "], ("--ads",)),
    ("samples-zero", GEN + ["--samples", "0"], ("--samples",)),
    ("batch-size-negative", GEN + ["--batch-size", "-2"], ("--batch-size",)),
    ("temperature-nan", GEN + ["--temperature", "nan"], ("--temperature",)),
    ("out-under-a-file", [a.replace("{tmp}/run", "{tmp}/a_file/run") for a in GEN], ("a_file",)),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_value(case, tmp_path, capsys):
    _, argv, expect = case
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    code, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line_error(code, err, *expect)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_unknown_encoder_is_one_line(capsys, monkeypatch):
    import llmhyper.cli.evaluate

    monkeypatch.setattr(llmhyper.cli.evaluate, "get_encoder", REAL_GET_ENCODER)
    code, err = run_cli(["evaluate", "--dataset", "synthetic", "--encoder", "bogus"], capsys)
    assert_one_line_error(code, err, "unknown encoder 'bogus'")


# -- program files: `llmhyper generate --program FILE` ----------------------------------------------------------

PROGRAM_CASES: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("missing", lambda t: t / "nope.json", ("nope.json", "not found")),
    ("empty", lambda t: _write(t / "p.json", ""), ("p.json",)),
    ("truncated", lambda t: _write(t / "p.json", '{"predict_weights.predict": {"demos": ['), ("p.json",)),
    ("a-list", lambda t: _write(t / "p.json", "[1, 2, 3]"), ("p.json", "list")),
    ("wrong-keys", lambda t: _write(t / "p.json", '{"something": {}}'), ("p.json", "not an LLM-HYPER program")),
    ("a-folder", lambda t: (t / "prog").mkdir() or t / "prog", ("prog", "folder")),
    ("not-utf8", lambda t: _write(t / "p.json", b"\xff\xfe{}"), ("p.json",)),
]


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", PROGRAM_CASES, ids=[c[0] for c in PROGRAM_CASES])
def test_broken_program_fails_before_any_work(case, tmp_path, capsys):
    _, make, expect = case
    program = make(tmp_path)
    code, err = run_cli(["generate", "--dataset", "synthetic", "--out", str(tmp_path / "run"), "--program",
                         str(program), "--lm", "openai/none", "--api-base", "http://127.0.0.1:9"], capsys)
    assert_one_line_error(code, err, *expect)
    assert not (tmp_path / "cache" / "embeddings").exists()  # failed before the ads were embedded


# -- recipes: `llmhyper compile RECIPE --dry-run` ---------------------------------------------------------------

RECIPE = """
description = "test"
[data]
dataset = "synthetic"
seed = 1
encoder = "test-hash"
[split]
n_train = 4
n_val = 3
[task_lm]
spec = "local/compile-task"
[reflection_lm]
spec = "local/compile-reflect"
[gepa]
max_metric_calls = 16
"""

RECIPE_CASES: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("missing", lambda t: t / "nope.toml", ("nope.toml", "not found")),
    ("a-folder", lambda t: (t / "r.toml").mkdir() or t / "r.toml", ("r.toml",)),
    ("bad-syntax", lambda t: _write(t / "r.toml", RECIPE.replace("n_val = 3", "n_val = = 3")),
     ("r.toml", "not valid TOML")),
    ("unknown-key", lambda t: _write(t / "r.toml", RECIPE.replace("n_val = 3", "n_vall = 3")),
     ("r.toml", "n_vall", "unknown setting")),
    ("wrong-type", lambda t: _write(t / "r.toml", RECIPE.replace("max_metric_calls = 16", 'max_metric_calls = "x"')),
     ("r.toml", "gepa.max_metric_calls")),
    ("missing-section", lambda t: _write(t / "r.toml", RECIPE.replace("[gepa]\nmax_metric_calls = 16\n", "")),
     ("r.toml", "gepa", "missing")),
    ("not-utf8", lambda t: _write(t / "r.toml", b"description = \"\xff\"\n"), ("r.toml", "UTF-8")),
    ("empty", lambda t: _write(t / "r.toml", ""), ("r.toml",)),
    ("folder-data-missing", lambda t: _write(t / "r.toml", RECIPE.replace('dataset = "synthetic"',
                                                                         'dataset = "folder"\npath = "nowhere"')),
     ("r.toml", "nowhere")),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_broken_recipe(case, tmp_path, capsys):
    _, make, expect = case
    recipe = make(tmp_path)
    code, err = run_cli(["compile", str(recipe), "--out", str(tmp_path / "p"), "--dry-run"], capsys)
    assert_one_line_error(code, err, *expect)


def test_corpus_size():
    assert len(DATA_CASES) + len(WEIGHT_CASES) + len(CLI_CASES) + len(PROGRAM_CASES) + len(RECIPE_CASES) >= 60


# -- what must keep working -------------------------------------------------------------------------------------


def test_bootstrap_zero_means_no_intervals(folder, capsys, tmp_path):
    out = tmp_path / "r.json"
    code, err = run_cli(["evaluate", "--data", str(folder), "--bootstrap", "0", "--json", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    auc = res["methods"]["knn_cal"]["auc"]
    assert auc["lo"] is None and auc["p_value"] is None and np.isfinite(auc["value"])
