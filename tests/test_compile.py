"""`llmhyper compile`: metric + feedback, recipe validation, a tiny GEPA compile with scripted task and
reflection LMs (the proposal fixes the task model, so the val score rises), the evolution log, kill + resume."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import dspy
import numpy as np
import pytest

import llmhyper.optimize.compile as comp
import llmhyper.optimize.lms as lms
from llmhyper.cli.main import main
from llmhyper.ctr.prepare import prepare
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper.generate import generate
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.llm.models import LMHandle
from llmhyper.optimize.compile import compile_recipe
from llmhyper.optimize.lms import build_lms
from llmhyper.optimize.metric import CTRFeedbackMetric
from llmhyper.optimize.recipe import load_recipe
from llmhyper.optimize.split import eligible_ads, make_examples, register_ads, select_split
from llmhyper.runs import RunBusy, RunDir
from tests.fakes import HashEncoder
from tests.scripted_lm import Handle, ScriptedEngine, scripted_lm
from tests.scripted_reflection import RULE, CompileEngine, scripted_pair

REPO = Path(__file__).resolve().parent.parent

RECIPE = """
description = "test"
[data]
dataset = "synthetic"
seed = 1
encoder = "test-hash"
[data.synthetic]
n_users = 300
n_warm = 40
n_cold = 5
[split]
n_train = 4
n_val = 3
min_test_clicks = 4
min_test_nonclicks = 4
[task_lm]
spec = "local/compile-task"
[reflection_lm]
spec = "local/compile-reflect"
temperature = 1.0
[gepa]
max_metric_calls = 16
reflection_minibatch_size = 2
candidate_selection = "current_best"
[program]
batch_size = 4
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMHYPER_CACHE", str(tmp_path_factory.mktemp("cache")))
        syn = generate_synthetic(n_users=300, n_warm=40, n_cold=5, seed=1)
        prep = prepare(syn.data, encoder=HashEncoder(), k=3, progress=False)
        yield syn, prep


@pytest.fixture()
def recipe_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))

    def write(text: str = RECIPE, name: str = "tiny") -> Path:
        p = tmp_path / f"{name}.toml"
        p.write_text(textwrap.dedent(text))
        return p

    return write


def compile_with(recipe: Path, out: Path, engine: CompileEngine, **kw):
    task, refl = scripted_pair(engine)
    return compile_recipe(recipe, out, encoder=HashEncoder(), task_lm=task, reflection_lm=refl, progress=False, **kw)


# -- the metric --------------------------------------------------------------------------------------------

def _ad_and_truth(prep, i: int = 0):
    ad = eligible_ads(prep, 4, 4)[i]
    register_ads(prep, [ad])
    names = prep.data.feature_names
    trained = prep.retired.theta[prep.retired.index_of([ad])[0]]
    return ad, names, dict(zip(names, trained.tolist(), strict=True))


def _pred(weights, names, reasoning="Sports fans click sports ads.", failed=None, judge=None):
    samples = [{"ok": True, "weights": dict(weights), "reasoning": reasoning, "attempts": [{"ok": True}]}]
    return dspy.Prediction(weights=dict(weights), failed_features=failed or {}, reasoning=[reasoning],
                           batches=[{"features": list(names), "samples": samples}], judge=judge or [], flags=[])


def test_metric_rewards_the_trained_weights_and_punishes_flipped_signs(world):
    _, prep = world
    ad, names, trained = _ad_and_truth(prep)
    metric = CTRFeedbackMetric(prep)
    gold = dspy.Example(ad_id=ad)
    good = metric(gold, _pred(trained, names), None, None, None)
    bad = metric(gold, _pred({f: -w for f, w in trained.items()}, names), None, None, None)
    assert 0.0 <= bad.score < 0.5 < good.score <= 1.0
    assert abs(good.score + bad.score - 1.0) < 1e-9  # flipping every sign mirrors the AUC
    a = metric.last[ad]
    assert a.sign_agreement == 0.0 and a.cosine == pytest.approx(-1.0)
    assert "held-out impressions" in good.feedback and "No feature that matters has the wrong sign" in good.feedback


def test_feedback_names_wrong_signs_with_values_and_quotes_the_reasoning(world):
    _, prep = world
    ad, names, trained = _ad_and_truth(prep, 1)
    flip = sorted(names, key=lambda f: -abs(trained[f]))[:2]
    weights = {f: (-w if f in flip else w) for f, w in trained.items()}
    out = CTRFeedbackMetric(prep)(dspy.Example(ad_id=ad), _pred(weights, names, "Older users avoid it."),
                                  None, None, None)
    fb = out.feedback
    assert "Wrong sign (your weight vs trained)" in fb
    for f in flip:
        assert f"{f} {-trained[f]:+.2f} vs {trained[f]:+.2f}" in fb
    assert '"Older users avoid it."' in fb
    others = [f for f in names if f not in flip and abs(trained[f]) >= 0.05]
    assert f"right for {len(others)} of {len(others) + 2}" in fb


def test_predictor_feedback_covers_the_batch_of_the_traced_call(world):
    _, prep = world
    ad, names, trained = _ad_and_truth(prep, 2)
    batch = sorted(names, key=lambda f: -abs(trained[f]))[:2]
    call_in = {"ad": "x", "examples": "y",
               "features": "\n".join(f"- {f}: some definition. Trained weights: Example 1 +0.10." for f in batch)}
    call_out = dspy.Prediction(reasoning="Because of the batch.", weights={batch[0]: -trained[batch[0]],
                                                                          batch[1]: trained[batch[1]]})
    out = CTRFeedbackMetric(prep)(dspy.Example(ad_id=ad), _pred(trained, names), None, "predict_weights.predict",
                                  [(None, call_in, call_out)])
    assert "In this batch of 2 features" in out.feedback
    assert f"{batch[0]} {-trained[batch[0]]:+.2f} vs {trained[batch[0]]:+.2f}" in out.feedback
    assert '"Because of the batch."' in out.feedback
    assert all(f not in out.feedback.split("In this batch")[1] for f in names if f not in batch)


def test_judge_feedback_names_false_alarms_and_misses(world):
    _, prep = world
    ad, names, trained = _ad_and_truth(prep)
    strong = sorted(names, key=lambda f: -abs(trained[f]))
    right, wrong = strong[0], strong[1]
    weights = {f: (-w if f == wrong else w) for f, w in trained.items()}
    judge = [{"ok": True, "inconsistent_features": [right], "improper_features": [], "verdict": "x"}]
    out = CTRFeedbackMetric(prep)(dspy.Example(ad_id=ad), _pred(weights, names, judge=judge), None, "judge", None)
    assert f"{right} ({trained[right]:+.2f}, trained {trained[right]:+.2f}: its sign was right, a false alarm" \
        in out.feedback
    assert f"You missed weights with the wrong sign: {wrong} {-trained[wrong]:+.2f}" in out.feedback


def test_parse_failures_score_zero_with_feedback_and_never_crash(world):
    _, prep = world
    ad, names, trained = _ad_and_truth(prep)
    metric = CTRFeedbackMetric(prep)
    gold = make_examples(prep, [ad], {})[0]
    program = LLMHyper(ProgramConfig(batch_size=4, max_attempts=1, use_judge=False))
    with dspy.context(lm=scripted_lm(ScriptedEngine(fail_first=999))):
        pred = program(**gold.inputs())
    assert pred.weights == {} and pred.failed_features
    out = metric(gold, pred, None, None, None)
    assert out.score == 0.0
    assert "no weights could be read" in out.feedback and "ONE JSON object" in out.feedback
    # partial answers: scored on what parsed, scaled down, the missing features named
    part = {f: trained[f] for f in names[:4]}
    out = metric(gold, _pred(part, names, failed={f: "AdapterParseError: garbled" for f in names[4:]}),
                 None, None, None)
    assert metric.last[ad].status == "partial"
    assert 0 < out.score <= 4 / 7 + 1e-9
    assert "Only 4 of 7 weights could be read" in out.feedback and names[5] in out.feedback
    # nothing sensible at all: still a score and a text, never an exception
    for junk in (dspy.Prediction(), dspy.Prediction(weights="not a dict"), None):
        out = metric(gold, junk, None, None, None)
        assert out.score == 0.0 and out.feedback
    out = metric(dspy.Example(ad_id="no-such-ad"), _pred(trained, names), None, None, None)
    assert out.score == 0.0 and "could not be scored" in out.feedback


def test_metric_answers_the_calls_gepa_makes(world):
    """GEPA checks the metric's signature when it is built, then asks it for feedback per predictor as DSPy's
    adapter does: (gold, pred, captured trace, predictor name, [(predictor, its inputs, its outputs)])."""
    _, prep = world
    ad = eligible_ads(prep, 4, 4)[3]
    register_ads(prep, [ad])
    metric = CTRFeedbackMetric(prep)
    task, refl = scripted_pair(CompileEngine())
    dspy.GEPA(metric=metric, max_metric_calls=10, reflection_lm=refl.lm)  # raises on a wrong signature
    gold = make_examples(prep, [ad], {})[0]
    program = LLMHyper(ProgramConfig(batch_size=4))
    with dspy.context(lm=task.lm, trace=[]):
        pred = program(**gold.inputs())
        trace = list(dspy.settings.trace)
    weight_calls = [t for t in trace if t[0] is program.predict_weights.predict]
    judge_calls = [t for t in trace if t[0] is program.judge]
    assert len(weight_calls) == 2 and judge_calls  # 7 features in batches of 4, and the judge's review
    named_wrong = set()
    for name, calls in (("predict_weights.predict", weight_calls), ("judge", judge_calls)):
        for predictor, inputs, outputs in calls:
            out = metric(gold, pred, trace, name, [(predictor, inputs, outputs)])
            assert isinstance(out, dspy.Prediction) and isinstance(out.score, float)
            assert 0.0 <= out.score <= 1.0 and out.score == metric(gold, pred, None, None, None).score
            assert isinstance(out.feedback, str) and out.feedback.startswith(("Score", "The weights you reviewed"))
            if name == "judge":
                assert "You flagged no feature as inconsistent" in out.feedback
                continue
            # the scripted model flips every sign: the feedback names this call's features, and only them
            batch = [f for f in prep.data.feature_names if f"- {f}:" in inputs["features"]]
            assert f"In this batch of {len(batch)} features" in out.feedback
            for line in out.feedback.splitlines():
                if line.startswith("Wrong sign (your weight vs trained): "):
                    named = {part.split(" ")[0] for part in line.split(": ", 1)[1].rstrip(".").split("; ")}
                    assert named <= set(batch)
                    named_wrong |= named
    assert named_wrong  # every sign is flipped, so some feature that matters is named


# -- recipes -------------------------------------------------------------------------------------------------

def test_shipped_recipes_validate():
    for name in ("ml100k_small", "synthetic_smoke"):
        r = load_recipe(REPO / "optimizers" / f"{name}.toml")
        assert r.gepa.max_metric_calls > r.n_val
    small = load_recipe(REPO / "optimizers" / "ml100k_small.toml")
    assert (small.n_train, small.n_val, small.gepa.max_metric_calls) == (6, 4, 24)
    assert small.task_lm.spec == small.reflection_lm.spec == "embedded"


@pytest.mark.parametrize("edit, field, words", [
    (("max_metric_calls = 16", "max_metric_call = 16"), "gepa.max_metric_call", "unknown setting"),
    (("max_metric_calls = 16", "max_metric_calls = 3"), "gepa.max_metric_calls", "leave nothing to optimise"),
    (("max_metric_calls = 16", "max_metric_calls = 'many'"), "gepa.max_metric_calls", "integer"),
    (("candidate_selection = \"current_best\"", "predictors = [\"weights\"]"), "gepa.predictors", "unknown predictor"),
    (("[program]", "[program]\njudge = false"), None, None),  # fine on its own ...
    (("n_val = 3", "n_val = 3\nval_ids = [\"ad1\", \"ad2\"]"), "split.n_val", "val_ids lists 2"),
    (("n_train = 4", "train_ids = [\"ad1\", \"ad2\"]"), "split.val_ids", "both train and val ads"),
    (("dataset = \"synthetic\"", "dataset = \"folder\""), "data.path", "needs path"),
    (("dataset = \"synthetic\"", "dataset = \"criteo\""), "data.dataset", "movielens-100k"),
    (("spec = \"local/compile-task\"", "spec = \"gpt4\""), "task_lm.spec", "not an LM"),
    (("reflection_minibatch_size = 2", "reflection_minibatch_size = 9"), "gepa.reflection_minibatch_size",
     "more than the 4 train ads"),
])
def test_recipe_errors_name_file_and_field(recipe_file, edit, field, words):
    text = RECIPE.replace(*edit)
    if field == "split.val_ids":
        text = text.replace("n_val = 3", "val_ids = [\"ad2\", \"ad9\"]")
    path = recipe_file(text)
    if field is None:
        load_recipe(path)
        return
    with pytest.raises(DataError) as err:
        load_recipe(path)
    assert err.value.field == field and err.value.file == str(path)
    assert str(path) in str(err.value) and f"field '{field}'" in str(err.value)
    if words:
        assert words in str(err.value)


def test_recipe_cross_checks_and_syntax(recipe_file):
    p = recipe_file(RECIPE.replace("[program]", "[program]\njudge = false").replace(
        "candidate_selection = \"current_best\"", "predictors = [\"predict_weights.predict\", \"judge\"]"))
    with pytest.raises(DataError, match="judge cannot be optimised") as err:
        load_recipe(p)
    assert err.value.field == "gepa.predictors"
    text = RECIPE.replace("n_train = 4", "n_train 4")
    p = recipe_file(text)
    with pytest.raises(DataError, match="not valid TOML") as err:
        load_recipe(p)
    assert err.value.row == textwrap.dedent(text).splitlines().index("n_train 4") + 1
    with pytest.raises(DataError) as err:
        load_recipe(recipe_file(RECIPE.split("[gepa]")[0]))
    assert err.value.field == "gepa" and "missing" in str(err.value)
    with pytest.raises(DataError, match="not found"):
        load_recipe(Path(p).with_name("nope.toml"))


def test_split_ids_are_checked_against_the_data_before_any_llm_call(world, recipe_file, tmp_path, monkeypatch):
    ok = eligible_ads(world[1], 4, 4)  # the same synthetic world as the recipe's

    def no_lm(*a, **k):
        raise AssertionError("an LM was built")

    monkeypatch.setattr(comp, "build_lms", no_lm)
    eng = CompileEngine()
    cases = [
        (f"train_ids = [\"{ok[0]}\", \"nope\"]", "split.train_ids", "unknown ad id 'nope'"),
        (f"train_ids = [\"{ok[0]}\", \"ad41\"]", "split.train_ids", "not a retired ad"),  # a cold ad
        ("n_train = 40", "split", "are asked for"),
    ]
    for line, field, words in cases:
        text = RECIPE.replace("n_train = 4", line).replace("reflection_minibatch_size = 2",
                                                           "reflection_minibatch_size = 1")
        with pytest.raises(DataError) as err:
            compile_with(recipe_file(text), tmp_path / "out", eng)
        assert err.value.field == field and words in str(err.value)
    ids = json.dumps(ok[:3])
    text = RECIPE.replace("min_test_clicks = 4", f"min_test_clicks = 4\nval_ids = {ids}").replace(
        "n_val = 3", "").replace("min_test_nonclicks = 4", "min_test_nonclicks = 75")  # 75 test users in all
    with pytest.raises(DataError, match="non-clicks") as err:
        compile_with(recipe_file(text), tmp_path / "out", eng)
    assert err.value.field == "split.val_ids"
    assert eng.total == 0 and not (tmp_path / "out").exists()


def test_split_is_seeded_disjoint_and_keeps_val_when_train_grows(world, recipe_file):
    _, prep = world
    r = load_recipe(recipe_file())
    s1 = select_split(r, prep, "x.toml")
    assert len(s1.train) == 4 and len(s1.val) == 3 and not set(s1.train) & set(s1.val)
    assert select_split(r, prep, "x.toml").train == s1.train
    r.split.n_train = 6
    s2 = select_split(r, prep, "x.toml")
    assert s2.val == s1.val and s2.train[:4] == s1.train
    ok = set(eligible_ads(prep, 4, 4))
    assert set(s2.train + s2.val) <= ok


# -- compile end to end ------------------------------------------------------------------------------------

def test_compile_improves_val_score_and_writes_program_manifest_and_log(recipe_file, tmp_path):
    recipe = recipe_file()
    eng = CompileEngine()
    res = compile_with(recipe, tmp_path / "programs", eng)
    assert eng.calls["reflection"] >= 1
    assert res.val_before < 0.5 < res.val_after and res.val_after - res.val_before > 0.3
    # the program: loads into a fresh LLMHyper (what `generate --program` does) with the evolved instruction
    prog = LLMHyper()
    prog.load(str(res.program_path))
    assert RULE in prog.predict_weights.predict.signature.instructions
    assert RULE not in LLMHyper().predict_weights.predict.signature.instructions
    m = json.loads(res.manifest_path.read_text())
    assert m["val_score_before"] == res.val_before and m["val_score_after"] == res.val_after
    assert len(m["split"]["train_ads"]) == 4 and len(m["split"]["val_ads"]) == 3
    assert set(m["val_scores_after"]) == set(m["split"]["val_ads"])
    assert m["budget"]["max_metric_calls"] == 16 and m["budget"]["metric_calls_used"] >= 16
    assert m["lms"]["task"]["model"] == "local/compile-task"
    assert m["lms"]["reflection"]["model"] == "local/compile-reflect"
    assert m["tokens"]["task_lm"]["prompt_tokens"] > 0 and m["tokens"]["reflection_lm"]["calls"] >= 1
    assert m["wall_seconds"] > 0 and "commit" in m["git"] and m["recipe"]["sha256"]
    assert m["program_sha256"] and m["generate_flags"] == "--batch-size 4 --samples 1"

    # the evolution folder, in our own format
    evo = res.evolution_dir
    cj = json.loads((evo / "candidates.json").read_text())
    assert cj["format"] == "llmhyper-evolution/1" and cj["val_ads"] == m["split"]["val_ads"]
    assert cj["best"] == m["best_candidate"] and len(cj["candidates"]) == m["candidates"] >= 2
    seed, best = cj["candidates"][0], cj["candidates"][cj["best"]]
    assert seed["parents"] == [] and seed["origin"] == "seed"
    assert set(seed["instructions"]) == {"predict_weights.predict", "judge"}
    assert best["parents"] and best["changed"] == ["predict_weights.predict"]
    assert set(best["val_scores"]) == set(cj["val_ads"])
    assert best["val_score"] == pytest.approx(np.mean(list(best["val_scores"].values())), abs=1e-3)
    pareto = json.loads((evo / "pareto.json").read_text())
    assert set(pareto["per_ad"]) == set(cj["val_ads"]) and cj["best"] in pareto["front"]
    its = [json.loads(line) for line in (evo / "iterations.jsonl").read_text().splitlines()]
    assert [i["iteration"] for i in its] == list(range(1, len(its) + 1))
    first = its[0]
    assert first["outcome"] == "accepted" and first["new_candidate"] == 1
    assert set(first["minibatch"]) <= set(cj["train_ads"]) and len(first["parent_scores"]) == 2
    records = first["reflective_dataset"]["predict_weights.predict"]
    assert records and {"Inputs", "Generated Outputs", "Feedback"} <= set(records[0])
    assert any("Wrong sign" in f for f in first["feedback"]["predict_weights.predict"])
    calls = first["proposal"]["reflection_calls"]
    assert len(calls) == 1 and "current_instruction" in json.dumps(calls[0]["messages"])
    assert RULE in json.dumps(calls[0]["outputs"]) and RULE in first["proposal"]["new_instructions"][
        "predict_weights.predict"]
    assert first["parent_assessments"][0]["ad_id"] == first["minibatch"][0]
    events = [json.loads(line) for line in (evo / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    for k in ("run_start", "optimization_start", "valset_evaluated", "reflective_dataset_built", "proposal_end",
              "candidate_accepted", "iteration_end", "optimization_end", "run_end"):
        assert k in kinds
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and events[-1]["status"] == "complete"
    assert (evo / "gepa" / "gepa_state.bin").exists()
    assert (evo / "gepa" / "lm_cache").is_dir() and not dspy.cache.enable_disk_cache  # the test's cache is back


def test_a_folder_in_use_by_another_compile_is_refused(recipe_file, tmp_path):
    eng = CompileEngine()
    with RunDir(tmp_path / "p" / "tiny.evolution"):  # as another process running this compile would hold it
        with pytest.raises(RunBusy, match="in use by another llmhyper process"):
            compile_with(recipe_file(), tmp_path / "p", eng)
    assert eng.total == 0


def test_compiled_program_runs_in_generate(recipe_file, tmp_path, world):

    res = compile_with(recipe_file(), tmp_path / "programs", CompileEngine())
    syn, prep = world
    program = LLMHyper(ProgramConfig(batch_size=4))
    program.load(str(res.program_path))
    eng = CompileEngine()
    task, _ = scripted_pair(eng)
    h = Handle(task.lm)
    cold = syn.data.cold_ads[:1]
    totals = generate(prep, HashEncoder(), program, h, h, cold, tmp_path / "run", {"t": 1}, progress=False)
    assert totals["ads_ok"] == 1
    rec = json.loads((tmp_path / "run" / "ads" / f"{cold[0]}.json").read_text())
    # the evolved instruction made the scripted model copy the nearest ad's weights
    first = prep.retired.theta[prep.retired.index_of([prep.neighbours[cold[0]][0].ad_id])[0]]
    got = np.array([rec["raw_weights"][f] for f in syn.data.feature_names])
    assert np.allclose(got, np.round(first, 2), atol=0.011)


def test_unparseable_task_model_compiles_without_crashing(recipe_file, tmp_path):
    res = compile_with(recipe_file(), tmp_path / "programs", CompileEngine(garbage=True))
    assert res.val_before == 0.0 and res.val_after == 0.0 and res.best_candidate == 0
    assert json.loads(res.manifest_path.read_text())["candidates"] == 1


def test_kill_and_resume_continue_without_redoing_work(recipe_file, tmp_path):
    recipe = recipe_file()
    full = CompileEngine()
    ref = compile_with(recipe, tmp_path / "A", full)

    killed = CompileEngine(kill_after=18)  # after the seed's val eval, the first minibatch and the reflection
    with pytest.raises(KeyboardInterrupt):
        compile_with(recipe, tmp_path / "B", killed)
    evo = tmp_path / "B" / f"{recipe.stem}.evolution"
    assert (evo / "gepa" / "gepa_state.bin").exists() and not (tmp_path / "B" / f"{recipe.stem}.json").exists()
    events = [json.loads(line) for line in (evo / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "interrupted"
    cut = [json.loads(line) for line in (evo / "iterations.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["outcome"]) for r in cut] == [(1, "interrupted")]

    resumed = CompileEngine()
    res = compile_with(recipe, tmp_path / "B", resumed)
    # every call answered before the kill comes from the run's LM cache: exactly the rest is paid for
    assert resumed.total == full.total - killed.total
    assert res.val_after == ref.val_after and res.metric_calls == ref.metric_calls
    assert json.loads((evo / "candidates.json").read_text())["candidates"] == \
        json.loads((ref.evolution_dir / "candidates.json").read_text())["candidates"]
    its = [json.loads(line) for line in (evo / "iterations.jsonl").read_text().splitlines()]
    assert [i["iteration"] for i in its] == list(range(1, len(its) + 1))  # the cut iteration was replayed
    assert its[0]["run"] == 2 and its[0]["outcome"] == "accepted"
    starts = [json.loads(line) for line in (evo / "events.jsonl").read_text().splitlines()
              if '"run_start"' in line]
    assert [s["resumed"] for s in starts] == [False, True] and [s["run"] for s in starts] == [1, 2]
    m = json.loads(res.manifest_path.read_text())
    assert [r["run"] for r in m["runs"]] == [2] and m["runs"][0]["resumed"]
    assert [(r["run"], r["status"]) for r in m["interrupted_runs"]] == [(1, "interrupted")]

    again = CompileEngine()  # a finished compile, rerun: nothing left to pay for
    compile_with(recipe, tmp_path / "B", again)
    assert again.total == 0
    assert len(json.loads(res.manifest_path.read_text())["runs"]) == len(m["runs"]) + 1


def test_resume_refuses_other_settings(recipe_file, tmp_path):
    compile_with(recipe_file(), tmp_path / "p", CompileEngine())
    changed = recipe_file(RECIPE.replace("batch_size = 4", "batch_size = 3"))
    with pytest.raises(LLMHyperError, match="other settings.*program.batch_size"):
        compile_with(changed, tmp_path / "p", CompileEngine())
    # a larger budget is not another setting: it extends the run
    res = compile_with(recipe_file(), tmp_path / "p", CompileEngine(), max_metric_calls=22)
    assert res.manifest["budget"]["max_metric_calls"] == 22


# -- command line ----------------------------------------------------------------------------------------------

def test_cli_compile_dry_run_and_errors(recipe_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(comp, "get_encoder", lambda spec, **kw: HashEncoder())
    recipe = recipe_file()
    assert main(["compile", str(recipe), "--out", str(tmp_path / "p"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["train_ads"]) == 4 and len(plan["val_ads"]) == 3
    assert plan["estimate"]["task_lm_calls_per_metric_call"] == 3  # 2 batches of 4 features + the judge
    assert not (tmp_path / "p").exists()
    bad = recipe_file(RECIPE.replace("max_metric_calls = 16", "max_metric_calls = 2"))
    assert main(["compile", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "gepa.max_metric_calls" in err


def test_build_lms_shares_one_embedded_server_and_reads_keys_from_env(recipe_file, monkeypatch):
    built = []

    class FakeServer:
        base_url, api_key = "http://127.0.0.1:9/v1", "secret"

    def fake_build_lm(spec, **kw):
        built.append((spec, kw))
        return LMHandle(lm=dspy.LM("hosted_vllm/m", api_base=FakeServer.base_url, api_key="k"),
                        description={"spec": spec, "model": "m"}, server=FakeServer())

    monkeypatch.setattr(lms, "build_lm", fake_build_lm)
    recipe = load_recipe(REPO / "optimizers" / "ml100k_small.toml")
    task, refl = build_lms(recipe)
    assert len(built) == 1 and built[0][1]["n_ctx"] == 8192  # one server, big enough for the reflection prompt
    assert refl.lm.kwargs["temperature"] == 1.0 and refl.lm.kwargs["max_tokens"] == 1024
    assert refl.lm.kwargs["api_base"] == FakeServer.base_url and refl.lm.kwargs["api_key"] == "secret"
    assert refl.description["shares_server_with"] == "task_lm"

    monkeypatch.undo()
    monkeypatch.setenv("MY_KEY", "sk-test")
    text = RECIPE.replace('spec = "local/compile-reflect"', 'spec = "openai/gpt-4o"\napi_key_env = "MY_KEY"')
    task, refl = build_lms(load_recipe(recipe_file(text)))
    assert task.lm.model == "local/compile-task" and refl.lm.model == "openai/gpt-4o"
    assert refl.description["model"] == "gpt-4o" and refl.lm.kwargs["temperature"] == 1.0
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(LLMHyperError, match="MY_KEY"):
        build_lms(load_recipe(recipe_file(text)))
