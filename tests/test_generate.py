"""`generate` with a scripted LM on the synthetic world: records, artifact, kill and resume, failures, the run
folder's guards (lock, settings, ids), and the command's one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmhyper.cli import generate as generate_cli
from llmhyper.ctr import baselines as bl
from llmhyper.ctr.evaluate import evaluate, load_artifacts, markdown_table
from llmhyper.ctr.prepare import prepare
from llmhyper.data import DataSettings, SyntheticSettings
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper import generate as gen
from llmhyper.hyper.generate import GenerateSettings, collect, generate, run_generate, run_settings
from llmhyper.hyper.program import DEFAULT_PROGRAM, LLMHyper, ProgramConfig
from llmhyper.llm.build import build_lm
from llmhyper.llm.settings import LMSettings
from llmhyper.paths import REPO
from llmhyper.retrieval import encoders
from llmhyper.runs import RunBusy, RunDir, SettingsMismatch
from llmhyper.store import save_npz_atomic
from llmhyper.weights import WeightTable, sigmoid
from tests.fakes import HashEncoder
from tests.scripted_lm import Handle, ScriptedEngine, scripted_lm


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    syn = generate_synthetic(n_users=300, n_warm=40, n_cold=5, seed=1, image_dir=tmp_path / "img")
    enc = HashEncoder()
    return syn, prepare(syn.data, encoder=enc, k=3, progress=False), enc


def truth_policy(syn):
    """Answers with the true weight of the ad named in the prompt: a perfect hypernetwork."""
    names = syn.truth.feature_names

    def policy(feature, user):
        ad_no = int(user.split("offer #")[1].split()[0].rstrip(".\n"))
        return round(float(syn.truth.theta[ad_no, names.index(feature)]), 3)

    return policy


def run(prep, enc, engine, out, ad_ids, **cfg):
    program = LLMHyper(ProgramConfig(batch_size=4, **cfg))
    h = Handle(scripted_lm(engine))
    return generate(prep, enc, program, h, h, ad_ids, out, {"test": True}, progress=False)


def test_records_and_artifact(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    totals = run(prep, enc, ScriptedEngine(weight_policy=truth_policy(syn)), tmp_path / "run", cold)
    assert totals["ads_ok"] == 5 and totals["ads_failed"] == 0 and totals["parse_failures"] == 0
    rec = json.loads((tmp_path / "run" / "ads" / f"{cold[0]}.json").read_text())
    for key in (
        "raw_weights",
        "spread",
        "reasoning",
        "judge",
        "flags",
        "normalized_weights",
        "delta",
        "alpha",
        "neighbours",
        "tokens",
        "seconds",
        "batches",
        "session",
    ):
        assert key in rec
    theta = np.array([rec["normalized_weights"][f] for f in syn.data.feature_names])
    assert np.linalg.norm(theta) == pytest.approx(1.0, abs=1e-5)
    assert sigmoid(prep.X_cal @ theta + rec["delta"]).mean() == pytest.approx(rec["alpha"], abs=1e-5)
    assert rec["tokens"]["prompt_tokens"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["totals"]["ads_done"] == 5 and "commit" in manifest["git"]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"test": True}
    calls = [json.loads(line) for line in (tmp_path / "run" / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == totals["weight_calls"] + 5  # + one judge call per ad
    assert {c["session"] for c in calls} == {rec["session"]}
    # the artifact scores in evaluate, and a perfect hypernetwork beats the kNN prior on per-ad AUC
    table = load_artifacts([tmp_path / "run" / "weights"])["llm_hyper"]
    knn = bl.calibrated(bl.knn_prior(prep.retired, prep.neighbours, cold), prep.X_cal, prep.alphas, "knn_cal")
    res = evaluate(
        prep,
        {"lr_cold": bl.lr_cold(prep.retired, cold), "knn_cal": knn, "llm_hyper": table},
        n_boot=50,
        challengers=["llm_hyper"],
    )
    assert set(res["methods"]["llm_hyper"]["vs_knn_cal"]) == {"auc", "ad_auc", "ndcg10", "logloss"}
    assert "Paired against knn_cal" in markdown_table(res)
    assert (
        res["methods"]["llm_hyper"]["ad_auc"]["value"] >= res["methods"]["knn_cal"]["ad_auc"]["value"] - 0.01
    )


def test_kill_and_resume_does_not_redo_finished_ads(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    out = tmp_path / "run"
    per_ad = 2  # 7 features in batches of 4
    killer = ScriptedEngine(interrupt_after=per_ad * 2 + 1)  # dies inside the third ad
    with pytest.raises(KeyboardInterrupt):
        run(prep, enc, killer, out, cold, use_judge=False)
    done = sorted(p.stem for p in (out / "ads").glob("*.json"))
    assert done == sorted(cold[:2])
    assert not list((out / "ads").glob("*.tmp")) and not list((out / "ads").glob(".*.tmp"))
    before = {a: (out / "ads" / f"{a}.json").read_text() for a in done}
    first = json.loads((out / "manifest.json").read_text())
    assert first["resumed"] == []
    resumed = ScriptedEngine()
    totals = run(prep, enc, resumed, out, cold, use_judge=False)
    assert resumed.weight_calls == per_ad * 3  # only the 3 unfinished ads
    assert totals["ads_done"] == 5
    assert all((out / "ads" / f"{a}.json").read_text() == before[a] for a in done)
    assert len(WeightTable.load(out / "weights").ad_ids) == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["started"] == first["started"] and len(manifest["resumed"]) == 1


def test_failing_ad_is_recorded_and_run_goes_on(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    eng = ScriptedEngine(fail_first=999)  # never parses
    totals = run(prep, enc, eng, tmp_path / "run", cold[:2], use_judge=False, max_attempts=2)
    assert totals["ads_failed"] == 2 and totals["parse_failures"] == totals["weight_calls"] == 8
    rec = json.loads((tmp_path / "run" / "ads" / f"{cold[0]}.json").read_text())
    assert rec["status"] == "failed" and rec["failed_features"]
    assert len(rec["filled_from_knn_prior"]) == 7  # recorded, and such ads stay out of the artifact
    table, _ = collect(tmp_path / "run", syn.data.feature_names)
    assert table.ad_ids == []


def test_partial_failure_fills_from_prior_and_says_so(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    eng = ScriptedEngine(fail_first=2)  # the first batch fails both attempts, the second parses
    totals = run(prep, enc, eng, tmp_path / "run", cold[:1], use_judge=False, max_attempts=2)
    rec = json.loads((tmp_path / "run" / "ads" / f"{cold[0]}.json").read_text())
    assert rec["status"] == "partial" and sorted(rec["filled_from_knn_prior"]) == sorted(
        syn.data.feature_names[:4]
    )
    assert totals["features_filled_from_prior"] == 4


def test_ids_never_leave_the_run_folder(world, tmp_path):
    """Ad ids are not file names: `../../x`, `a/b` and a 300-character id all stay inside the folder, reach
    the artifact, and are not redone on a rerun."""
    syn, _, enc = world
    data = syn.data
    odd = {data.cold_ads[0]: "../../escaped", data.cold_ads[1]: "shoes/42", data.cold_ads[2]: "x" * 300}
    ads = [a.model_copy(update={"id": odd.get(a.id, a.id)}) for a in data.ads]
    data = replace(data, ads=ads, cold_ads=[odd.get(a, a) for a in data.cold_ads])
    prep = prepare(data, encoder=enc, k=3, progress=False)
    out = tmp_path / "deep" / "run"
    ids = list(odd.values())
    before = set(tmp_path.rglob("*"))
    run(prep, enc, ScriptedEngine(), out, ids, use_judge=False)
    new = {p for p in set(tmp_path.rglob("*")) - before if "cache" not in p.relative_to(tmp_path).parts}
    assert all(p == out.parent or p.is_relative_to(out) for p in new)  # nothing written beside the folder
    assert not (tmp_path / "escaped.json").exists() and not (out / "ads" / "shoes").exists()
    assert len(list((out / "ads").glob("*.json"))) == 3
    assert sorted(WeightTable.load(out / "weights").ad_ids) == sorted(ids)
    again = ScriptedEngine()
    run(prep, enc, again, out, ids, use_judge=False)
    assert again.weight_calls == 0


# -- the command: settings, lock, kills, failures -------------------------------------------

SMALL = SyntheticSettings(n_users=300, n_warm=40, n_cold=5)


@pytest.fixture()
def command(tmp_path, monkeypatch):
    """(settings maker, LM builder maker) for `run_generate` on a small synthetic world, scripted LMs and
    the hashing encoder: the real command path, without any model."""
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(encoders._SHARED, "test-hash", HashEncoder())

    def settings(**kw):
        base = dict(
            out=tmp_path / "run",
            data=DataSettings(dataset="synthetic", seed=1, synthetic=SMALL),
            encoder="test-hash",
            batch_size=4,
            judge=False,
        )
        return GenerateSettings(**{**base, **kw})

    def builder(engine):
        built = []

        def build(lm_settings):
            built.append(lm_settings)
            return Handle(scripted_lm(engine))

        build.built = built
        return build

    return settings, builder


def _no_lm(lm_settings):
    raise AssertionError("no LM may be built when nothing is left to do")


def test_kill_right_after_the_last_record_is_repaired(command, monkeypatch):
    settings, builder = command
    s = settings()
    real = RunDir.write_record

    def dies_after_the_last(self, item_id, record, settings=None):
        real(self, item_id, record, settings)
        if len(list(self.records_dir.glob("*.json"))) == 5:
            raise KeyboardInterrupt("killed right after the last record")

    monkeypatch.setattr(RunDir, "write_record", dies_after_the_last)
    with pytest.raises(KeyboardInterrupt):
        run_generate(s, lm_builder=builder(ScriptedEngine()), progress=False)
    monkeypatch.setattr(RunDir, "write_record", real)
    assert len(WeightTable.load(s.out / "weights").ad_ids) == 4  # stale: one ad short
    records = {p.name: p.read_text() for p in (s.out / "ads").glob("*.json")}
    totals = run_generate(s, lm_builder=_no_lm, progress=False)  # nothing to do but the repair
    assert totals["ads_done"] == totals["ads_ok"] == 5
    assert len(WeightTable.load(s.out / "weights").ad_ids) == 5
    assert json.loads((s.out / "manifest.json").read_text())["totals"]["ads_done"] == 5
    assert {p.name: p.read_text() for p in (s.out / "ads").glob("*.json")} == records  # nothing redone


def test_kill_during_the_artifact_save_is_repaired(command, monkeypatch):
    settings, builder = command
    s = settings()
    real_save = WeightTable.save

    def dies_between_the_two_files(self, directory):
        if len(self.ad_ids) < 5:
            return real_save(self, directory)
        # the new npz is in place and the json's temp file is half written when the kill comes
        d = Path(directory)
        save_npz_atomic(
            d / "weights.npz",
            theta=self.theta,
            intercept=self.intercept,
            ad_ids=np.array(self.ad_ids, dtype=str),
            feature_names=np.array(self.feature_names, dtype=str),
        )
        (d / ".weights.json.abc.tmp").write_text('{"method": "llm_')
        raise KeyboardInterrupt("killed during the artifact save")

    monkeypatch.setattr(WeightTable, "save", dies_between_the_two_files)
    with pytest.raises(KeyboardInterrupt):
        run_generate(s, lm_builder=builder(ScriptedEngine()), progress=False)
    monkeypatch.setattr(WeightTable, "save", real_save)
    with pytest.raises(DataError, match="interrupted"):
        WeightTable.load(s.out / "weights")  # the broken artifact is refused, never half-read
    totals = run_generate(s, lm_builder=_no_lm, progress=False)
    table = WeightTable.load(s.out / "weights")
    assert totals["ads_done"] == 5 and len(table.ad_ids) == 5
    assert np.allclose(np.linalg.norm(table.theta, axis=1), 1.0)
    assert not list((s.out / "weights").glob(".*.tmp"))


def test_two_processes_cannot_share_a_run_folder(command, tmp_path):
    settings, builder = command
    s = settings(data=DataSettings(folder=tmp_path / "no-such-data"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from llmhyper.runs import RunDir; r = RunDir(sys.argv[1]); "
            "r.acquire(); print('locked', flush=True); sys.stdin.read()",
            str(s.out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        engine = ScriptedEngine()
        with pytest.raises(RunBusy, match=f"pid {holder.pid}") as err:
            run_generate(s, lm_builder=builder(engine), progress=False)  # refused before the data are read
        assert "\n" not in str(err.value) and engine.weight_calls == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with pytest.raises(LLMHyperError, match="data folder not found"):  # the lock is free again
        run_generate(s, lm_builder=builder(ScriptedEngine()), progress=False)


def test_failed_first_start_does_not_lock_the_folder(command, tmp_path):
    settings, builder = command
    out = tmp_path / "run"
    with pytest.raises(LLMHyperError, match="data folder not found"):
        run_generate(
            settings(data=DataSettings(folder=tmp_path / "typo")), lm_builder=builder(ScriptedEngine())
        )
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="damaged program"):
        run_generate(settings(program=bad), lm_builder=builder(ScriptedEngine()))

    def unreachable(lm_settings):
        raise LLMHyperError("the LM could not be built")

    with pytest.raises(LLMHyperError, match="could not be built"):
        run_generate(settings(samples=2), lm_builder=unreachable, progress=False)
    assert not (out / "config.json").exists()
    totals = run_generate(
        settings(k=2), lm_builder=builder(ScriptedEngine()), progress=False
    )  # other settings
    assert totals["ads_ok"] == 5 and json.loads((out / "config.json").read_text())["k"] == 2


def test_judge_lm_is_built_and_given_to_the_program(command):
    settings, _ = command
    task, judge = ScriptedEngine(), ScriptedEngine()
    built = []

    def build(lm_settings):
        built.append(lm_settings.spec)
        return Handle(scripted_lm(judge if lm_settings.spec == "hosted_vllm/judge" else task))

    s = settings(limit=2, judge=True, judge_lm=LMSettings(spec="hosted_vllm/judge"))
    totals = run_generate(s, lm_builder=build, progress=False)
    assert built == ["embedded", "hosted_vllm/judge"] and totals["ads_ok"] == 2
    assert task.judge_calls == 0 and judge.judge_calls == 2 and judge.weight_calls == 0
    calls = RunDir(s.out).calls()
    assert len(calls) == task.weight_calls + 2  # the judge's calls are logged with the ad's
    config = json.loads((s.out / "config.json").read_text())
    assert (
        config["judge_lm"] == "hosted_vllm/judge" and config["judge_lm_settings"]["frequency_penalty"] is None
    )


def test_no_ad_succeeded_is_an_error(command):
    settings, builder = command
    s = settings(limit=2)
    with pytest.raises(LLMHyperError, match="none of the 2 ads got weights") as err:
        run_generate(s, lm_builder=builder(ScriptedEngine(fail_first=999)), progress=False)
    assert "\n" not in str(err.value) and "AdapterParseError" in str(err.value)
    assert json.loads((s.out / "manifest.json").read_text())["totals"]["ads_failed"] == 2


def test_unreachable_endpoint_fails_the_run(command):
    settings, _ = command
    lm = LMSettings(spec="hosted_vllm/m", api_base="http://127.0.0.1:9/v1", cache=False)
    s = settings(limit=1, lm=lm)
    with pytest.raises(LLMHyperError, match="none of the 1 ads got weights"):
        run_generate(s, lm_builder=lambda ls: build_lm(replace(ls, num_retries=0)), progress=False)


def test_resume_refuses_other_settings_and_data(command, tmp_path):
    settings, builder = command
    s = settings(limit=2)
    run_generate(s, lm_builder=builder(ScriptedEngine()), progress=False)
    with pytest.raises(SettingsMismatch, match="batch_size"):
        run_generate(replace(s, batch_size=3), lm_builder=_no_lm, progress=False)
    with pytest.raises(SettingsMismatch, match="frequency_penalty"):
        run_generate(replace(s, lm=LMSettings(frequency_penalty=0.1)), lm_builder=_no_lm, progress=False)
    changed = DataSettings(dataset="synthetic", seed=1, synthetic=replace(SMALL, n_cold=6))  # one more ad
    with pytest.raises(SettingsMismatch, match="data_fingerprint"):
        run_generate(replace(s, data=changed), lm_builder=_no_lm, progress=False)
    # the program counts by content: a copy elsewhere is the same program, an edited one is not
    copy = tmp_path / "elsewhere" / "zero_shot.json"
    copy.parent.mkdir()
    copy.write_text(DEFAULT_PROGRAM.read_text())
    more = ScriptedEngine()
    totals = run_generate(replace(s, program=copy, limit=3), lm_builder=builder(more), progress=False)
    assert totals["ads_done"] == 3 and more.weight_calls == 2  # only the third ad
    state = json.loads(copy.read_text())
    state["judge"]["signature"]["instructions"] += " Be brief."
    copy.write_text(json.dumps(state))
    with pytest.raises(SettingsMismatch, match="program_sha256"):
        run_generate(replace(s, program=copy), lm_builder=_no_lm, progress=False)
    forced = run_generate(
        replace(s, program=copy, force=True, limit=4), lm_builder=builder(ScriptedEngine()), progress=False
    )
    assert forced["ads_done"] == 4
    assert (
        json.loads((s.out / "config.json").read_text())["program_sha256"] != run_settings(s)["program_sha256"]
    )


def test_same_folder_relative_or_absolute_is_the_same_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    rel = GenerateSettings(out=Path("run"), data=DataSettings(folder=Path("mydata")))
    absolute = replace(rel, data=DataSettings(folder=tmp_path / "mydata"), program=DEFAULT_PROGRAM)
    assert run_settings(rel) == run_settings(absolute)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"samples": 0}, "samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"ads": ()}, "names no ad"),
        ({"ads": ("",)}, "empty"),
        ({"k": 0}, "k must"),
        ({"lm": LMSettings(temperature=float("nan"))}, "temperature"),
        ({"lm": LMSettings(temperature=-1.0)}, "temperature"),
        ({"lm": LMSettings(max_tokens=0)}, "max_tokens"),
    ],
)
def test_settings_are_checked_before_any_work(command, monkeypatch, kw, message):
    settings, builder = command
    monkeypatch.setattr(
        gen, "load_dataset", lambda s: pytest.fail("data loaded before the settings were checked")
    )
    with pytest.raises(LLMHyperError, match=message) as err:
        run_generate(settings(**kw), lm_builder=builder(ScriptedEngine()))
    assert "\n" not in str(err.value)
    assert not settings().out.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "",
        "[1, 2]",
        '{"predict_weights": {}, "judge": {}}',
        "FOLDER",
        '{"predict_weights.predict": 1, "judge": 2}',
    ],
)
def test_malformed_program_fails_before_data_and_models(command, monkeypatch, tmp_path, content):
    settings, builder = command
    monkeypatch.setattr(
        gen, "load_dataset", lambda s: pytest.fail("data loaded before the program was checked")
    )
    path = tmp_path / "prog.json"
    if content == "FOLDER":
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        run_generate(settings(program=path), lm_builder=builder(ScriptedEngine()))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# -- the command line -------------------------------------------------------------------------


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="llmhyper")
    generate_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["--samples", "0"],
        ["--batch-size", "-1"],
        ["--temperature", "nan"],
        ["--temperature", "-1"],
        ["--limit", "0"],
        ["--limit", "-1"],
        ["--threads", "0"],
        ["--max-tokens", "0"],
        ["--frequency-penalty", "inf"],
        ["--workers", "0"],
        ["--retries", "-1"],
        ["--ad-retries", "-1"],
        ["--retry-wait", "-1"],
    ],
)
def test_command_line_refuses_bad_numbers(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("--out", str(tmp_path / "run"), *argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_command_line_builds_typed_settings(tmp_path):
    args = _parse(
        "--out",
        "runs/x",
        "--dataset",
        "synthetic",
        "--data",
        str(tmp_path),
        "--lm",
        "hosted_vllm/m",
        "--api-base",
        "http://127.0.0.1:9/v1",
        "--judge-lm",
        "embedded",
        "--ads",
        "a, b,a",
        "--samples",
        "2",
        "--no-judge",
    )
    s = generate_cli.settings_from(args)
    assert isinstance(s, GenerateSettings) and s.out == Path("runs/x") and s.data.folder == tmp_path.resolve()
    assert s.lm == LMSettings(spec="hosted_vllm/m", api_base="http://127.0.0.1:9/v1")
    assert s.judge_lm == LMSettings(spec="embedded")  # no --api-base for the embedded judge
    assert s.ads == ("a", "b", "a") and s.samples == 2 and not s.judge
    assert s.lm.max_tokens == 320 and s.lm.penalty is None and s.judge_lm.penalty == 0.5
    assert (
        generate_cli.settings_from(
            _parse("--out", "x", "--lm", "embedded", "--judge-lm", "embedded")
        ).judge_lm
        is None
    )
    with pytest.raises(LLMHyperError, match="names no ad"):
        generate_cli.settings_from(_parse("--out", "x", "--ads", " , ")).validate()


def test_command_line_program_error_comes_first(tmp_path):
    args = _parse(
        "--out",
        str(tmp_path / "run"),
        "--data",
        str(tmp_path / "missing"),
        "--program",
        str(tmp_path / "nope.json"),
    )
    with pytest.raises(DataError, match="program file not found"):
        generate_cli.run(args)
    assert not (tmp_path / "run").exists()
