"""The edit program: labels from log-probabilities (recorded llama.cpp replies), labels from text (a
scripted DSPy LM), and the numbers that turn labels into weights (gamma on hand-made cases)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import dspy
import numpy as np
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from llmhyper.errors import LLMHyperError
from llmhyper.hyper.edit import (
    EditConfig,
    EditProgram,
    edited_theta,
    fit_gamma,
    format_edit_features,
    right_edits,
)
from llmhyper.llm.logprobs import LABELS, ChatClient, expected_label, grammar_for, label_distribution, read_labels

RECORDED = Path(__file__).parent / "data" / "logprob_reply.json"


def test_reads_labels_from_a_recorded_llama_cpp_reply():
    # recorded from the embedded Qwen2.5-Coder-1.5B server with grammar_for(names), 2026-11-30
    reply = json.loads(RECORDED.read_text())
    names = ["share_Action", "share_Romance", "is_female", "age"]
    got = read_labels(reply, names)
    assert list(got) == names
    tokens = reply["choices"][0]["logprobs"]["content"]
    digit_tokens = [t for t in tokens if t["token"].strip() in LABELS]
    for name, tok in zip(names, digit_tokens, strict=True):  # by hand: exp(logprob) of 1..5, renormalised
        mass = {lab: 0.0 for lab in LABELS}
        for t in tok["top_logprobs"]:
            if t["token"].strip() in mass:
                mass[t["token"].strip()] += math.exp(t["logprob"])
        total = sum(mass.values())
        assert got[name] == pytest.approx([mass[lab] / total for lab in LABELS])
        assert sum(got[name]) == pytest.approx(1.0)
        assert -2 <= expected_label(got[name]) <= 2


def test_label_distribution_and_expectation_by_hand():
    top = [{"token": "4", "logprob": math.log(0.6)}, {"token": "3", "logprob": math.log(0.2)},
           {"token": "x", "logprob": math.log(0.1)}, {"token": " 5", "logprob": math.log(0.1)}]
    dist = label_distribution(top, "4")
    assert dist == pytest.approx([0, 0, 0.2 / 0.9, 0.6 / 0.9, 0.1 / 0.9])
    assert expected_label(dist) == pytest.approx((0.6 * 1 + 0.1 * 2) / 0.9)
    assert label_distribution([{"token": "x", "logprob": 0.0}], "2") == [0, 1, 0, 0, 0]  # none listed


def test_reply_without_logprobs_is_a_clear_error():
    with pytest.raises(LLMHyperError, match="log-probabilities"):
        read_labels({"choices": [{"message": {"content": "a: 3"}}]}, ["a"])


def test_grammar_lists_every_feature_once_in_order():
    g = grammar_for(["a_b", "c"])
    assert g == 'root ::= "a_b: " [1-5] "\\n" "c: " [1-5] "\\n"'
    with pytest.raises(LLMHyperError):
        grammar_for(['bad"name'])


def test_right_edits_and_edited_theta():
    units = np.array([0.5, 1.0, 0.2])
    prior = np.array([0.0, 1.0, 0.0])
    trained = np.array([1.0, 0.9, -5.0])
    assert right_edits(trained, prior, units).tolist() == [5, 3, 1]  # +2 units, ~0, clipped at -2
    edits = np.array([2.0, np.nan, -1.0])
    assert edited_theta(prior, edits, units, 0.5).tolist() == pytest.approx([0.5, 1.0, -0.1])
    assert edited_theta(prior, edits, units, 0.0).tolist() == prior.tolist()  # gamma 0: the prior itself


def test_fit_gamma_by_hand():
    rng = np.random.default_rng(0)
    prior = rng.normal(size=(30, 8))
    units = np.full(8, 0.3)
    edits = rng.integers(-2, 3, size=(30, 8)).astype(float)
    trained = prior + 0.7 * edits * units  # edits exactly right at gamma 0.7
    assert fit_gamma(prior, edits, units, trained) == pytest.approx(0.7)
    assert fit_gamma(prior, -edits, units, trained) == 0.0  # edits pointing the wrong way
    assert fit_gamma(prior, np.zeros_like(edits), units, trained) == 0.0  # no edits
    assert fit_gamma(prior, np.full_like(edits, 1e-17), units, trained) == 0.0  # rounding noise is no edit
    noise = rng.integers(-2, 3, size=(30, 8)).astype(float)
    assert fit_gamma(prior, noise, units, trained) < 0.2  # unrelated edits: near 0


# -- the program with a scripted server / LM ---------------------------------------------------------

FEATURES = [{"name": "interest_gardening", "description": "how much the user likes gardening"},
            {"name": "interest_cars", "description": "how much the user likes cars"},
            {"name": "age", "description": "user's age"}]
AD = {"id": "c1", "title": "Rose pruning shears", "text": "Sharp shears for your garden roses"}
EXAMPLES = [{"id": "w1", "title": "Lawn mower", "text": "Mow your lawn", "similarity": 0.8,
             "edits": {"interest_gardening": 4, "interest_cars": 3, "age": 3}}]
PRIOR = {"interest_gardening": 0.1, "interest_cars": 0.0, "age": -0.2}


class ScriptedServer:
    """Stands in for ChatClient: answers a logprob request by the feature names its grammar asks for,
    with label probabilities from `policy(name, prompt)`; any other request fails loudly."""

    def __init__(self, policy):
        self.policy, self.bodies = policy, []

    def complete(self, body):
        self.bodies.append(body)
        grammar = body.get("grammar", "")
        names = re.findall(r'"([^"]+): "', grammar)
        prompt = body["messages"][-1]["content"]
        if not names and "[1-5]" in grammar:  # the digits layout: the features numbered in the prompt
            return self._digits(body, prompt, grammar)
        assert names and body["logprobs"] and body["temperature"] == 0.0, f"unexpected request {body}"
        content = []
        for n in names:
            probs = self.policy(n, prompt)
            best = LABELS[int(np.argmax(probs))]
            content += [{"token": n, "logprob": 0.0, "top_logprobs": []},
                        {"token": ":", "logprob": 0.0, "top_logprobs": []},
                        {"token": " ", "logprob": 0.0, "top_logprobs": []},
                        {"token": best, "logprob": 0.0,
                         "top_logprobs": [{"token": lab, "logprob": math.log(p)} for lab, p in zip(LABELS, probs)
                                          if p > 0]},
                        {"token": "\n", "logprob": 0.0, "top_logprobs": []}]
        return {"choices": [{"message": {"content": ""}, "logprobs": {"content": content}}],
                "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 5 * len(names)}}, False


    def _digits(self, body, prompt, grammar):
        names = re.findall(r"^\d+\. ([^:\s]+):", prompt, re.M)
        assert names and len(names) == grammar.count("[1-5]") and body["logprobs"], f"unexpected request {body}"
        content = []
        for i, n in enumerate(names):
            if i and i % 10 == 0:
                content.append({"token": " ", "logprob": 0.0, "top_logprobs": []})
            probs = self.policy(n, prompt)
            content.append({"token": LABELS[int(np.argmax(probs))], "logprob": 0.0,
                            "top_logprobs": [{"token": lab, "logprob": math.log(p)}
                                             for lab, p in zip(LABELS, probs) if p > 0]})
        return {"choices": [{"message": {"content": ""}, "logprobs": {"content": content}}],
                "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content)}}, False


def new_ad_text(prompt):
    """The new ad's text in either layout (lines: before the past ads; digits: after them)."""
    return prompt.split("New ad:")[1].split("Similar past ads")[0].split("Right answers:")[0]


def gardener(name, prompt):
    if name == "interest_gardening" and "garden" in new_ad_text(prompt):
        return [0.0, 0.0, 0.2, 0.3, 0.5]
    return [0.0, 0.0, 1.0, 0.0, 0.0]


def test_logprob_mode_reads_expected_edits_and_shows_the_prior_and_right_answers():
    server = ScriptedServer(gardener)
    prog = EditProgram(EditConfig(mode="logprobs", batch_size=2), client=server)
    pred = prog(ad=AD, examples=EXAMPLES, features=FEATURES, prior=PRIOR)
    assert pred.edits["interest_gardening"] == pytest.approx(0.3 * 1 + 0.5 * 2)
    assert pred.edits["interest_cars"] == 0.0 and pred.edits["age"] == 0.0
    assert pred.calls == 2 and pred.parse_failures == 0 and pred.failed_features == []
    assert pred.tokens["completion_tokens"] == 5 * 3  # both calls' usage counted (2 + 1 features)
    assert pred.tokens["prompt_tokens"] == sum(len(b["messages"][-1]["content"]) // 4 for b in server.bodies)
    first = server.bodies[0]["messages"][-1]["content"]
    assert "- interest_gardening: prior +0.10; past ads 4" in first
    assert first.startswith("Feature definitions:\n- interest_gardening: how much the user likes gardening")
    assert server.bodies[0]["messages"][0]["content"] == prog.instructions


def test_logprob_mode_needs_a_client():
    with pytest.raises(LLMHyperError, match="logprobs mode"):
        EditProgram(EditConfig(mode="logprobs"))


class LabelEngine:
    """A scripted DSPy engine for the text mode: answers `labels` from the feature names in the prompt."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def complete(self, request):
        user = "\n".join(m.text or "" for m in request.messages if m.role == "user")
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(p, "text", "") or "" for p in (request.system or ()))
        if "`answers`" not in system:
            raise AssertionError(f"unexpected prompt: {system[:200]}")
        self.calls += 1
        names = re.findall(r"^- ([A-Za-z_]\w*): prior", user, re.M)
        text = f"[[ ## answers ## ]]\n{json.dumps(self.answer(names))}\n\n[[ ## completed ## ]]"
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=10, output_tokens=10))

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self):
        pass


def test_text_mode_with_a_scripted_lm_and_bad_labels_left_to_the_prior():
    engine = LabelEngine(lambda names: {n: (5 if n == "interest_gardening" else 9 if n == "age" else 3)
                                        for n in names})
    lm = dspy.LM("local/scripted", engine=engine, temperature=0.0, max_tokens=200, cache=False, num_retries=0)
    prog = EditProgram(EditConfig(mode="text"))
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        pred = prog(ad=AD, examples=EXAMPLES, features=FEATURES, prior=PRIOR)
    assert pred.edits == {"interest_gardening": 2.0, "interest_cars": 0.0}
    assert pred.failed_features == ["age"] and pred.parse_failures == 1  # 9 is not a label
    assert engine.calls == 1


def test_format_lists_prior_and_right_answers():
    txt = format_edit_features(FEATURES[:1], PRIOR, EXAMPLES)
    assert txt == "- interest_gardening: prior +0.10; past ads 4"


def test_chat_client_caches_by_identity_and_request(tmp_path, monkeypatch):
    posted = []
    client = ChatClient(base_url="http://127.0.0.1:1/v1", api_key=None, model="m", identity="sha-A", cache=tmp_path)
    monkeypatch.setattr(client, "_post", lambda body: posted.append(body) or {"choices": [], "n": len(posted)})
    a, cached_a = client.complete({"messages": [], "max_tokens": 1})
    b, cached_b = client.complete({"messages": [], "max_tokens": 1})
    assert (cached_a, cached_b) == (False, True) and a == b and len(posted) == 1
    other = ChatClient(base_url="http://127.0.0.1:2/v1", api_key=None, model="m", identity="sha-B", cache=tmp_path)
    monkeypatch.setattr(other, "_post", lambda body: posted.append(body) or {"choices": [], "n": len(posted)})
    assert other.complete({"messages": [], "max_tokens": 1})[1] is False  # another model: never its cache


# -- the digits layout, the gate and the saved program ----------------------------------------------


def test_digits_grammar_and_reader_follow_the_groups_and_merged_digit_tokens():
    from llmhyper.llm.logprobs import digits_grammar, read_digit_labels

    g = digits_grammar(12, 10)
    assert g.count("[1-5]") == 12 and g.count('" "') == 1 and g.endswith('"\\n"')
    with pytest.raises(LLMHyperError):
        digits_grammar(0)
    names = [f"f{i}" for i in range(12)]
    lp = lambda p: [{"token": lab, "logprob": math.log(x)} for lab, x in zip(LABELS, p) if x > 0]  # noqa: E731
    content = [{"token": "4", "top_logprobs": lp([0, 0, 0.5, 0.5, 0])}] + [
        {"token": "3", "top_logprobs": []} for _ in range(8)
    ] + [{"token": "25", "top_logprobs": []}, {"token": " ", "top_logprobs": []}, {"token": "1", "top_logprobs": []}]
    got = read_digit_labels({"choices": [{"logprobs": {"content": content}}]}, names)
    assert got["f0"] == pytest.approx([0, 0, 0.5, 0.5, 0])
    assert got["f9"] == [0, 1, 0, 0, 0] and got["f10"] == [0, 0, 0, 0, 1]  # the merged "25"
    assert got["f11"] == [1, 0, 0, 0, 0]
    short = read_digit_labels({"choices": [{"logprobs": {"content": content[:9]}}]}, names)
    assert len(short) == 9 and "f9" not in short  # an answer cut short: the rest keep the prior
    assert expected_label(got["f0"]) == pytest.approx(0.5)


def test_digits_layout_puts_the_numbered_definitions_first_and_the_new_ad_last():
    server = ScriptedServer(gardener)
    prog = EditProgram(EditConfig(mode="logprobs", layout="digits", shots=1), client=server)
    pred = prog(ad=AD, examples=EXAMPLES, features=FEATURES, prior=PRIOR)
    assert pred.calls == 1 and pred.failed_features == []  # one call for every feature
    assert pred.edits["interest_gardening"] == pytest.approx(0.3 * 1 + 0.5 * 2)
    text = server.bodies[0]["messages"][-1]["content"]
    assert text.startswith("Features, numbered in answer order:\n1. interest_gardening:")
    assert text.count("Past ad ") == 1 and text.rstrip().endswith("Right answers:")  # shots=1: one past ad
    ex = EXAMPLES[0]
    assert "Right answers: " + "".join(str(ex["edits"][f["name"]]) for f in FEATURES) in text


def test_fit_gate_removes_a_position_bias_and_fits_a_gamma_per_group():
    from llmhyper.hyper.edit import Gate, feature_groups, fit_gate

    names = ["share_a", "share_b", "like_a", "like_b", "age"]
    assert feature_groups(names) == ["share", "share", "like", "like", "other"]
    rng = np.random.default_rng(0)
    prior = rng.normal(size=(30, 5))
    units = np.ones(5)
    signal = rng.choice([-1.0, 0.0, 1.0], size=(30, 5))
    edits = signal + np.array([1.0, 1.0, 0.0, 0.0, 0.0])  # the LM says "higher" for the first two always
    trained = prior + signal * np.array([0.5, 0.5, 1.5, 1.5, 0.0])
    raw = fit_gate(prior, edits, units, trained, feature_groups(names), debias=False, per_group=False)
    fixed = fit_gate(prior, edits, units, trained, feature_groups(names), debias=True, per_group=True)
    assert fixed.bias[:2] == pytest.approx([1.0 + signal[:, 0].mean(), 1.0 + signal[:, 1].mean()])
    assert fixed.gamma[2] == pytest.approx(1.5, abs=0.05) and fixed.gamma[4] == 0.0
    err = lambda g: np.abs(g.theta(prior, edits, units) - trained).sum()  # noqa: E731
    assert err(fixed) < err(raw)
    legacy = Gate.from_manifest({"gamma": 0.7}, 5)
    assert legacy.gamma.tolist() == [0.7] * 5 and legacy.bias.tolist() == [0.0] * 5
    with pytest.raises(LLMHyperError):
        Gate.from_manifest({"gamma": 1.0, "gate": {"gamma": [1.0], "bias": [0.0]}}, 5)


def test_the_saved_program_holds_its_configuration_and_gate(tmp_path):
    prog = EditProgram(EditConfig(mode="text", layout="digits", shots=2))
    prog.save(str(tmp_path / "seed.json"))
    prog.gate = {"gamma": [0.5], "bias": [0.0]}
    prog.save(str(tmp_path / "compiled.json"))
    seed, compiled = (json.loads((tmp_path / f).read_text()) for f in ("seed.json", "compiled.json"))
    assert seed["config"]["shots"] == 2 and "gate" not in seed and compiled["gate"]["gamma"] == [0.5]
    again = EditProgram(EditConfig(mode="text"))
    again.load(str(tmp_path / "compiled.json"))
    assert again.gate == {"gamma": [0.5], "bias": [0.0]} and again.instructions == prog.instructions
