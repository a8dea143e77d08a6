"""The DSPy program with a scripted LM: batching, retries, averaging, judge, regeneration, clamping."""

from __future__ import annotations

import dspy
import pytest

from llmhyper.hyper.program import LLMHyper, ProgramConfig, WeightParseError, check_weights, format_features
from tests.scripted_lm import ScriptedEngine, UnexpectedPrompt, scripted_lm

FEATURES = [{"name": f"f{i}", "description": f"feature number {i}"} for i in range(7)]
EXAMPLES = [{"id": "w1", "title": "Old ad", "text": "about cooking", "caption": "tags: pan", "similarity": 0.9,
             "ctr": 0.12, "weights": {f["name"]: 0.25 for f in FEATURES}}]
AD = {"id": "c1", "title": "New ad", "text": "about cooking too"}


def run(engine, **cfg):
    with dspy.context(lm=scripted_lm(engine)):
        return LLMHyper(ProgramConfig(**cfg))(ad=AD, examples=EXAMPLES, features=FEATURES)


def test_batches_and_one_weight_per_feature():
    eng = ScriptedEngine(weight_policy=lambda f, u: int(f[1:]) / 10)
    pred = run(eng, batch_size=3, use_judge=False)
    assert eng.weight_calls == 3  # 7 features in batches of 3
    assert pred.weights == {f"f{i}": i / 10 for i in range(7)}
    assert pred.parse_failures == 0 and pred.failed_features == {}


def test_shared_prefix_comes_before_the_batch():
    eng = ScriptedEngine()
    lm = scripted_lm(eng)
    with dspy.context(lm=lm):
        LLMHyper(ProgramConfig(batch_size=3, use_judge=False))(ad=AD, examples=EXAMPLES, features=FEATURES)
    users = [h["messages"][-1]["content"] for h in lm.history]
    systems = {h["messages"][0]["content"] for h in lm.history}
    assert len(systems) == 1
    prefix = users[0].split("[[ ## features ## ]]")[0]
    assert all(u.startswith(prefix) for u in users) and "Old ad" in prefix and "New ad" in prefix


def test_unparseable_is_retried_then_recorded_not_zeroed():
    eng = ScriptedEngine(fail_first=1)
    pred = run(eng, batch_size=7, use_judge=False)
    assert pred.parse_failures == 1 and pred.calls == 2 and len(pred.weights) == 7
    eng = ScriptedEngine(fail_first=99)
    pred = run(eng, batch_size=7, use_judge=False, max_attempts=2)
    assert pred.weights == {} and set(pred.failed_features) == {f["name"] for f in FEATURES}
    assert "AdapterParseError" in pred.failed_features["f0"]


def test_samples_are_averaged_with_spread():
    values = iter([0.2, 0.4] * 7)
    eng = ScriptedEngine(weight_policy=lambda f, u: next(values))
    pred = run(eng, batch_size=1, n_samples=2, use_judge=False)
    assert pred.weights["f0"] == pytest.approx(0.3) and pred.spread["f0"] == pytest.approx(0.1)
    assert pred.n_samples_ok["f0"] == 2


def test_judge_flags_and_regenerates_rejected_batches():
    calls = {"n": 0}

    def judge(user):
        calls["n"] += 1
        return (["f4"] if calls["n"] == 1 else []), ["f6"]

    eng = ScriptedEngine(judge_policy=judge)
    pred = run(eng, batch_size=3)
    assert pred.flags == ["f6"]
    assert len(pred.judge) == 2 and pred.judge[0]["inconsistent_features"] == ["f4"]
    assert eng.weight_calls == 3 + 1  # only the batch holding f4 is regenerated
    assert pred.batches[1]["regenerated_for"] == ["f4"]


def test_out_of_range_is_clamped_and_reported():
    eng = ScriptedEngine(weight_policy=lambda f, u: 50.0 if f == "f2" else -0.5)
    pred = run(eng, batch_size=7, use_judge=False)
    assert pred.weights["f2"] == 3.0
    assert pred.batches[0]["samples"][0]["attempts"][0]["clamped"] == ["f2: 50 -> 3"]


def test_check_weights_rules():
    assert check_weights({"Share_Drama": "0.5"}, ["share_Drama"], 3)[0] == {"share_Drama": 0.5}
    with pytest.raises(WeightParseError, match="no weight for 1"):
        check_weights({"a": 1}, ["a", "b"], 3)
    with pytest.raises(WeightParseError, match="not a number"):
        check_weights({"a": "high"}, ["a"], 3)
    with pytest.raises(WeightParseError, match="not finite"):
        check_weights({"a": float("nan")}, ["a"], 3)


def test_feature_text_shows_example_weights():
    text = format_features(FEATURES[:1], EXAMPLES)
    assert text == "- f0: feature number 0. Trained weights: Example 1 +0.25.\nWrite exactly these keys: f0."


def test_scripted_lm_fails_loudly_on_unknown_prompt():
    with dspy.context(lm=scripted_lm(ScriptedEngine())), pytest.raises(Exception, match="no scripted answer"):
        dspy.Predict("question -> answer")(question="hi")


def test_program_state_roundtrip(tmp_path):
    p = LLMHyper()
    p.predict_weights.predict.signature = p.predict_weights.predict.signature.with_instructions("EVOLVED")
    p.save(str(tmp_path / "prog.json"))
    q = LLMHyper()
    q.load(str(tmp_path / "prog.json"))
    assert q.predict_weights.predict.signature.instructions == "EVOLVED"


def test_partial_answer_is_kept_and_only_missing_features_asked_again():
    asked = []

    def policy(feature, user):
        asked.append(feature)
        return None if (len(asked) <= 3 and feature in ("f1", "f2")) else 0.3  # first answer skips f1, f2

    eng = ScriptedEngine(weight_policy=policy)
    pred = run(eng, batch_size=3, use_judge=False)
    first = pred.batches[0]["samples"][0]
    assert [a["asked"] for a in first["attempts"]] == [3, 2] and first["ok"]
    assert first["attempts"][0]["reason"] == "no weight for ['f1', 'f2']"
    assert pred.weights["f0"] == 0.3 and pred.weights["f1"] == 0.3 and pred.failed_features == {}
