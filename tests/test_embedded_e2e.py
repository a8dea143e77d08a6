"""The real embedded LLM end to end: one synthetic ad, five features, judge on (about a minute on 2 cores).

Runs with `--embedded` or LLMHYPER_TEST_EMBEDDED=1 (scripts/test.sh and CI set it)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from llmhyper.ctr.prepare import prepare
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.hyper.generate import generate
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.llm.build import build_lm
from llmhyper.paths import model_dir
from tests.fakes import HashEncoder

pytestmark = pytest.mark.embedded


def five_feature_world():
    syn = generate_synthetic(n_users=300, n_warm=30, n_cold=1, seed=2)
    d = syn.data
    return replace(d, features=d.features[:5], X=d.X[:, :5])


def test_real_model_writes_weights_for_one_ad(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_MODEL_DIR", str(model_dir()))  # the one verified model, outside the scratch cache
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    data = five_feature_world()
    enc = HashEncoder()
    prep = prepare(data, encoder=enc, k=2, progress=False)
    program = LLMHyper(ProgramConfig(batch_size=5))
    program.load("programs/zero_shot.json")
    with build_lm("embedded", n_threads=2, max_tokens=300, cache=False) as handle:
        totals = generate(
            prep, enc, program, handle, handle, data.cold_ads, tmp_path / "run", {"e2e": True}, progress=False
        )
    rec = json.loads((tmp_path / "run" / "ads" / f"{data.cold_ads[0]}.json").read_text())
    assert rec["status"] in ("ok", "partial"), rec.get("reason") or rec.get("failed_features")
    assert rec["status"] == "ok" or rec["failed_features"]  # a failure is always explained
    assert set(rec["raw_weights"]) <= {f.name for f in data.features}
    theta = np.array(list(rec["normalized_weights"].values()))
    assert np.linalg.norm(theta) == pytest.approx(1.0, abs=1e-5) or not theta.any()
    assert 0 < rec["alpha"] < 1 and np.isfinite(rec["delta"])
    assert rec["tokens"]["prompt_tokens"] > 100 and rec["tokens"]["completion_tokens"] > 5
    assert rec["judge"], "the judge ran"
    calls = [json.loads(line) for line in (tmp_path / "run" / "calls.jsonl").read_text().splitlines()]
    assert calls and all(c["outputs"] for c in calls)
    assert totals["ads_done"] == 1
    print(
        json.dumps({k: rec[k] for k in ("raw_weights", "reasoning", "judge", "seconds", "tokens")}, indent=1)
    )


def test_real_model_labels_every_feature_from_log_probabilities(tmp_path):
    """The edit program's log-probability mode against the real llama.cpp server: a grammar-forced answer,
    one label distribution per feature, no parse failure, and a rerun answered from the disk cache."""
    from llmhyper.hyper.edit import EditConfig, EditProgram
    from llmhyper.llm.logprobs import client_for_handle

    features = [
        {"name": "interest_gardening", "description": "how strongly the user engages with gardening content"},
        {"name": "interest_cars", "description": "how strongly the user engages with car content"},
        {"name": "age", "description": "the user's age (standardised)"},
    ]
    ad = {"id": "c1", "title": "Pruning shears offer", "text": "An ad for pruning shears, for people into gardening."}
    prior = {"interest_gardening": 0.0, "interest_cars": 0.0, "age": 0.0}
    with build_lm("embedded", n_threads=2) as handle:
        client = client_for_handle(handle, tmp_path / "lp-cache")
        program = EditProgram(EditConfig(mode="logprobs"), client=client)
        pred = program(ad=ad, examples=[], features=features, prior=prior)
        again = program(ad=ad, examples=[], features=features, prior=prior)
        digits = EditProgram(EditConfig(mode="logprobs", layout="digits"), client=client)
        short = digits(ad=ad, examples=[], features=features, prior=prior)
    assert short.failed_features == [] and short.parse_failures == 0 and short.calls == 1
    assert all(sum(short.distributions[n]) == pytest.approx(1.0) for n in prior)
    assert short.tokens["completion_tokens"] < pred.tokens["completion_tokens"]  # the point of the layout
    assert pred.failed_features == [] and pred.parse_failures == 0 and pred.calls == 1
    for name in prior:
        assert sum(pred.distributions[name]) == pytest.approx(1.0)
        assert -2.0 <= pred.edits[name] <= 2.0
    assert pred.tokens["prompt_tokens"] > 50 and pred.tokens["completion_tokens"] >= 3 * 3
    assert again.edits == pred.edits and again.attempts[0]["cached"]
    print(json.dumps({"edits": pred.edits, "tokens": pred.tokens}, indent=1))


def test_real_model_as_an_encoder_of_ads(tmp_path, monkeypatch):
    """The LM's own embedding (the prior's optional `lm` block): unit vectors of its hidden size, the same
    text gives the same vector, and a second pass is served from the embedding cache without a server."""
    from llmhyper.llm.lm_encoder import EMBEDDED_DIM, LMTextEncoder
    from llmhyper.retrieval.cache import embed_ads

    monkeypatch.setenv("LLMHYPER_MODEL_DIR", str(model_dir()))
    texts = ["Toy Story (1995). Animation, Children's, Comedy", "Schindler's List (1993). Drama, War"]
    with LMTextEncoder(n_threads=2) as enc:
        V = enc.encode_texts(texts + texts[:1])
        assert V.shape == (3, EMBEDDED_DIM)
        np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(V[0], V[2], atol=1e-4)
        assert float(V[0] @ V[1]) < 0.9999
        first = embed_ads(enc, ["a", "b"], texts, cache_dir=tmp_path, progress=False)
    again = LMTextEncoder(n_threads=2)  # no server is started for cached texts
    np.testing.assert_array_equal(
        embed_ads(again, ["a", "b"], texts, cache_dir=tmp_path, progress=False), first
    )
    assert again._server is None
