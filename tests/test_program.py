"""The DSPy program with a scripted LM: batching, retries, averaging, judge, regeneration, clamping."""

from __future__ import annotations

import json

import dspy
import pytest

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper.program import (
    DEFAULT_PROGRAM,
    LLMHyper,
    ProgramConfig,
    WeightParseError,
    check_weights,
    format_features,
    load_program,
)
from tests.scripted_lm import ScriptedEngine, scripted_lm

FEATURES = [{"name": f"f{i}", "description": f"feature number {i}"} for i in range(7)]
EXAMPLES = [
    {
        "id": "w1",
        "title": "Old ad",
        "text": "about cooking",
        "caption": "tags: pan",
        "similarity": 0.9,
        "ctr": 0.12,
        "weights": {f["name"]: 0.25 for f in FEATURES},
    }
]
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


def test_judge_lm_is_given_to_the_program_not_poked_into_it():
    task, judge = ScriptedEngine(), ScriptedEngine()
    judge_lm = scripted_lm(judge)
    program = LLMHyper(ProgramConfig(batch_size=7), judge_lm=judge_lm)
    assert program.judge.lm is None  # nothing set on the predictor (so no LM is ever saved with the program)
    with dspy.context(lm=scripted_lm(task)):
        pred = program(ad=AD, examples=EXAMPLES, features=FEATURES)
    assert task.weight_calls == 1 and task.judge_calls == 0
    assert judge.judge_calls == 1 and judge.weight_calls == 0 and len(judge_lm.history) == 1
    assert pred.judge[0]["ok"]
    copy = program.deepcopy()  # GEPA copies programs: the copies share the judge LM (and its history)
    assert copy.judge_lm is judge_lm and copy.predict_weights is not program.predict_weights
    saved = program.dump_state()
    assert saved["judge"]["lm"] is None


@pytest.mark.parametrize(
    "kw",
    [
        {"batch_size": 0},
        {"n_samples": 0},
        {"max_attempts": 0},
        {"batch_size": -3},
        {"max_regenerations": -1},
        {"sample_temperature": float("nan")},
        {"weight_bound": 0.0},
        {"batch_size": 2.5},
    ],
)
def test_program_config_refuses_what_cannot_run(kw):
    with pytest.raises(LLMHyperError) as err:
        ProgramConfig(**kw)
    assert "\n" not in str(err.value)


def _state():
    return json.loads(DEFAULT_PROGRAM.read_text())


def _write(tmp_path, content):
    path = tmp_path / "prog.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _bad_instruction():
    s = _state()
    s["judge"]["signature"]["instructions"] = 42
    return s


def _wrong_keys():
    s = _state()
    s["predict_weights"] = s.pop("predict_weights.predict")
    return s


def _few_fields():
    s = _state()
    s["judge"]["signature"]["fields"] = s["judge"]["signature"]["fields"][:2]
    return s


def _with_lm():
    s = _state()
    s["judge"]["lm"] = {"model": "openai/gpt-4o", "api_base": "http://evil.example/v1"}
    return s


def _extra_predictor_key():
    s = _state()
    s["judge"]["forward"] = "x"
    return s


MALFORMED = {
    "truncated": lambda: DEFAULT_PROGRAM.read_text()[:200],
    "empty": lambda: "",
    "a list": lambda: [1, 2],
    "wrong keys": _wrong_keys,
    "non-string instruction": _bad_instruction,
    "too few fields": _few_fields,
    "an LM inside": _with_lm,
    "an attribute for the predictor": _extra_predictor_key,
    "field not an object": lambda: {**_state(), "judge": [1]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_program_is_one_line(case, tmp_path):
    path = _write(tmp_path, MALFORMED[case]())
    with pytest.raises(DataError) as err:
        load_program(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg


def test_program_path_that_is_a_folder_or_missing(tmp_path):
    with pytest.raises(DataError, match="found a folder"):
        load_program(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_program(tmp_path / "nope.json")


def test_load_program_reads_the_shipped_program():
    program = load_program(DEFAULT_PROGRAM, ProgramConfig(batch_size=4), judge_lm="judge")
    assert program.config.batch_size == 4 and program.judge_lm == "judge"
    assert program.judge.signature.instructions == _state()["judge"]["signature"]["instructions"]


def test_a_vision_lm_gets_the_ad_image_in_its_request(tmp_path):
    """--vision: the ad's image travels to the LM as an image part (the paper's multimodal input); a
    text-only program sends none."""
    from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events
    from PIL import Image

    from llmhyper.hyper.program import LLMHyper, ProgramConfig

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "poster.png")

    class SeeingEngine:
        def __init__(self):
            self.parts = []

        def complete(self, request):
            self.parts.append([type(p).__name__ for m in request.messages for p in m.parts])
            text = '[[ ## reasoning ## ]]\nRed.\n\n[[ ## weights ## ]]\n{"a": 0.5}\n\n[[ ## completed ## ]]'
            return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))

        def stream(self, request):
            return response_to_events(self.complete(request))

        def close(self):
            pass

    ad = {"id": "x", "title": "Red shoes", "text": "Shoes", "caption": "shoe", "image": str(tmp_path / "poster.png")}
    features = [{"name": "a", "description": "feature a"}]
    for vision in (True, False):
        engine = SeeingEngine()
        lm = dspy.LM("local/seeing", engine=engine, cache=False, num_retries=0)
        with dspy.context(lm=lm):
            pred = LLMHyper(ProgramConfig(batch_size=1, use_judge=False, vision=vision))(
                ad=ad, examples=[], features=features
            )
        assert pred.weights == {"a": 0.5}
        assert ("ImagePart" in engine.parts[0]) is vision
