"""`generate` with a scripted LM on the synthetic world: records, artifact, kill and resume, failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmhyper.ctr.evaluate import evaluate, load_artifacts
from llmhyper.hyper.generate import collect, generate
from llmhyper.ctr.prepare import prepare
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.data.synthetic import generate_synthetic
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
    for key in ("raw_weights", "spread", "reasoning", "judge", "flags", "normalized_weights", "delta", "alpha",
                "neighbours", "tokens", "seconds", "batches"):
        assert key in rec
    theta = np.array([rec["normalized_weights"][f] for f in syn.data.feature_names])
    assert np.linalg.norm(theta) == pytest.approx(1.0, abs=1e-5)
    assert sigmoid(prep.X_cal @ theta + rec["delta"]).mean() == pytest.approx(rec["alpha"], abs=1e-5)
    assert rec["tokens"]["prompt_tokens"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["totals"]["ads_done"] == 5 and "commit" in manifest["git"]
    calls = (tmp_path / "run" / "calls.jsonl").read_text().splitlines()
    assert len(calls) == totals["weight_calls"] + 5  # + one judge call per ad
    # the artifact scores in evaluate, and a perfect hypernetwork beats the kNN prior on per-ad AUC
    table = load_artifacts([tmp_path / "run" / "weights"])["llm_hyper"]
    from llmhyper.ctr import baselines as bl

    knn = bl.calibrated(bl.knn_prior(prep.retired, prep.neighbours, cold), prep.X_cal, prep.alphas, "knn_cal")
    res = evaluate(prep, {"lr_cold": bl.lr_cold(prep.retired, cold), "knn_cal": knn, "llm_hyper": table}, n_boot=50,
                   challengers=["llm_hyper"])
    assert set(res["methods"]["llm_hyper"]["vs_knn_cal"]) == {"auc", "ad_auc", "ndcg10", "logloss"}
    from llmhyper.ctr.evaluate import markdown_table

    assert "Paired against knn_cal" in markdown_table(res)
    assert res["methods"]["llm_hyper"]["ad_auc"]["value"] >= res["methods"]["knn_cal"]["ad_auc"]["value"] - 0.01


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
    assert not list((out / "ads").glob("*.tmp"))
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
    assert rec["status"] == "partial" and sorted(rec["filled_from_knn_prior"]) == sorted(syn.data.feature_names[:4])
    assert totals["features_filled_from_prior"] == 4


def test_resume_refuses_other_settings(tmp_path):
    from llmhyper.errors import LLMHyperError
    from llmhyper.hyper.generate import check_resume

    check_resume(tmp_path, {"lm": "embedded", "k": 3}, force=False)
    with pytest.raises(LLMHyperError, match="other settings"):
        check_resume(tmp_path, {"lm": "embedded", "k": 5}, force=False)
    check_resume(tmp_path, {"lm": "embedded", "k": 5}, force=True)
