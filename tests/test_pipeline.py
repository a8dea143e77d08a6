"""data -> warm models -> retrieval -> baselines -> evaluate, on the synthetic world with known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmhyper.ctr import baselines as bl
from llmhyper.ctr.evaluate import baseline_methods, evaluate, markdown_table
from llmhyper.ctr.prepare import prepare
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.ctr.warm import train_warm
from llmhyper.weights import WeightTable
from tests.fakes import HashEncoder


@pytest.fixture(scope="module")
def world():
    return generate_synthetic(n_users=600, n_warm=60, n_cold=15, seed=3)


@pytest.fixture(scope="module")
def prep(world, tmp_path_factory):
    import os

    os.environ["LLMHYPER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return prepare(world.data, encoder=HashEncoder(), k=3, progress=False)
    finally:
        del os.environ["LLMHYPER_CACHE"]


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_warm_lr_recovers_truth(world):
    t = train_warm(world.data, world.data.warm_ads, C=1.0, min_pos=5, min_neg=5, progress=False)
    truth = world.truth.subset(t.ad_ids)
    cos = [_cos(t.theta[i], truth.theta[i]) for i in range(len(t.ad_ids))]
    assert np.mean(cos) > 0.9


def test_retrieval_finds_same_topic_and_never_self(prep, world):
    same_topic = []
    for ad, nbs in prep.neighbours.items():
        topic = world.data.ad_by_id[ad].metadata["topics"][0]
        assert ad not in [n.ad_id for n in nbs]
        same_topic.append(world.data.ad_by_id[nbs[0].ad_id].metadata["topics"][0] == topic)
    assert np.mean(same_topic) > 0.7


def test_knn_prior_closer_to_truth_than_lr_cold(prep, world):
    cold = world.data.cold_ads
    knn = bl.knn_prior(prep.retired, prep.neighbours, cold)
    med = bl.lr_cold(prep.retired, cold)
    truth = world.truth.subset(cold)
    cos_knn = np.mean([_cos(knn.theta[i], truth.theta[i]) for i in range(len(cold))])
    cos_med = np.mean([_cos(med.theta[i], truth.theta[i]) for i in range(len(cold))])
    assert cos_knn > cos_med + 0.1


def test_calibrated_rows_hit_alpha(prep, world):
    knn = bl.knn_prior(prep.retired, prep.neighbours, world.data.cold_ads)
    cal = bl.calibrated(knn, prep.X_cal, prep.alphas, "knn_cal")
    for i, ad in enumerate(cal.ad_ids):
        assert np.linalg.norm(cal.theta[i]) == pytest.approx(1.0)
        p = 1 / (1 + np.exp(-(prep.X_cal @ cal.theta[i] + cal.intercept[i])))
        assert p.mean() == pytest.approx(prep.alphas[ad], abs=1e-9)


def test_evaluate_table_and_ordering(prep, world, tmp_path):
    methods = baseline_methods(prep, encoder=HashEncoder())
    truth = world.truth.subset(world.data.cold_ads)
    truth.method = "truth"
    methods["truth"] = truth
    res = evaluate(prep, methods, n_boot=200)
    rows = res["methods"]
    assert set(rows) >= {"lr_warm", "lr_cold", "knn", "knn_cal", "popularity", "random", "embsim", "truth"}
    auc = {k: v["auc"]["value"] for k, v in rows.items()}
    assert auc["truth"] >= auc["lr_warm"] - 0.01
    assert auc["lr_warm"] > auc["lr_cold"]
    assert rows["lr_warm"]["auc"]["diff_lo"] > 0 and rows["lr_warm"]["auc"]["p_value"] < 0.05
    assert rows["random"]["ad_auc"]["value"] < 0.6
    table = markdown_table(res)
    assert all(f"| {name} |" in table for name in rows)
    json.dumps(res)  # JSON-safe


def test_artifact_roundtrip_and_subset(prep, world, tmp_path):
    knn = bl.knn_prior(prep.retired, prep.neighbours, world.data.cold_ads)
    knn.flags = {world.data.cold_ads[0]: ["age"]}
    knn.save(tmp_path / "w")
    back = WeightTable.load(tmp_path / "w")
    assert back.ad_ids == knn.ad_ids and np.array_equal(back.theta, knn.theta) and back.flags == knn.flags
    sub = back.subset(world.data.cold_ads[:3])
    res = evaluate(prep, {"lr_cold": bl.lr_cold(prep.retired, world.data.cold_ads), "knn": sub},
                   ad_ids=world.data.cold_ads[:3], n_boot=50)
    assert res["n_ads"] == 3 and res["ads_subset"]


def test_cli_evaluate_writes_json(monkeypatch, tmp_path, capsys):
    import llmhyper.retrieval.encoders as enc
    from llmhyper.cli.main import main

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(enc, "get_encoder", lambda spec="x", **kw: HashEncoder())
    out = tmp_path / "res.json"
    assert main(["evaluate", "--dataset", "synthetic", "--bootstrap", "50", "--json", str(out),
                 "--save", str(tmp_path / "w")]) == 0
    from llmhyper.weights import WeightTable

    assert WeightTable.load(tmp_path / "w" / "retired").method == "retired"
    assert len(WeightTable.load(tmp_path / "w" / "knn_cal").ad_ids) == 12
    res = json.loads(out.read_text())
    assert {"lr_warm", "lr_cold", "knn", "knn_cal", "embsim"} <= set(res["methods"])
    assert "| lr_cold |" in capsys.readouterr().out
