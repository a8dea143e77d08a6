"""The learned content prior (ctr/prior.py): it recovers the synthetic world's weights better than k-NN,
cross-validation picks a sensible penalty, it saves and loads without pickle, and in the unseen-topics
world it cannot know the cold ads' weights (the case only reading the text can solve)."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pytest

from llmhyper.ctr import baselines as bl
from llmhyper.ctr import prior as pr
from llmhyper.ctr.evaluate import baseline_methods, best_prior, evaluate, markdown_table
from llmhyper.ctr.prepare import ad_texts, prepare
from llmhyper.data.contract import Ad
from llmhyper.data.synthetic import UNSEEN_TOPICS, generate_synthetic
from llmhyper.errors import DataError
from llmhyper.retrieval.encoders import Encoder
from tests.fakes import HashEncoder


def _prep(world, tmp_path_factory):
    import os

    os.environ["LLMHYPER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return prepare(world.data, encoder=HashEncoder(), k=3, progress=False)
    finally:
        del os.environ["LLMHYPER_CACHE"]


@pytest.fixture(scope="module")
def world():
    return generate_synthetic(n_users=600, n_warm=60, n_cold=15, seed=3)


@pytest.fixture(scope="module")
def prep(world, tmp_path_factory):
    return _prep(world, tmp_path_factory)


@pytest.fixture(scope="module")
def unseen():
    return generate_synthetic(n_users=600, n_warm=60, n_cold=15, seed=3, unseen_topics=True)


@pytest.fixture(scope="module")
def unseen_prep(unseen, tmp_path_factory):
    return _prep(unseen, tmp_path_factory)


def _cos_rows(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_ridge_recovers_truth_better_than_knn(prep, world):
    cold = world.data.cold_ads
    rows = pr.ridge_methods(prep, HashEncoder())
    ridge, knn = rows["ridge"], bl.knn_prior(prep.retired, prep.neighbours, cold)
    truth = world.truth.subset(cold)
    cos_ridge = _cos_rows(ridge.theta, truth.theta).mean()
    cos_knn = _cos_rows(knn.theta, truth.theta).mean()
    assert cos_ridge > cos_knn + 0.02 and cos_ridge > 0.9
    # the choice is recorded, and made among the candidates on retired ads only
    meta = ridge.meta
    assert meta["inputs"] and meta["alpha"] in pr.PriorSettings().alphas
    assert meta["n_fit_ads"] == len(prep.retired.ad_ids)
    assert {tuple(c["inputs"]) for c in meta["candidates"]} >= {("meta",), ("vector",), ("meta", "vector")}
    assert set(meta["retired_validation_auc"]) == {"knn_cal", "ridge", "ridge_cal"}
    # the calibrated row: unit direction, intercept at the neighbours' alpha
    cal = rows["ridge_cal"]
    np.testing.assert_allclose(np.linalg.norm(cal.theta, axis=1), 1.0)
    p = 1 / (1 + np.exp(-(prep.X_cal @ cal.theta.T + cal.intercept)))
    np.testing.assert_allclose(p.mean(axis=0), [prep.alphas[a] for a in cold], atol=1e-9)


def _handmade(noise_only: bool, n=120, p=6, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, p))
    W = rng.standard_normal((p, 3))
    T = rng.standard_normal((n, 3)) if noise_only else Z @ W + 0.05 * rng.standard_normal((n, 3))
    ads = [Ad(id=f"a{i}", title=f"a{i}") for i in range(n)]
    return ads, {"vector": Z}, T[:, :2], T[:, 2]


def _neg_mse(theta, b, T, b_true):
    return -float(np.mean((np.column_stack([theta, b]) - np.column_stack([T, b_true])) ** 2))


@pytest.mark.parametrize("noise_only", [False, True])
def test_cv_picks_a_sensible_penalty(noise_only):
    ads, blocks, T, b = _handmade(noise_only)
    alphas = (0.001, 0.1, 10.0, 1000.0, 1e5)
    folds = pr.fold_ids(len(ads), 5, 0)
    rows = pr.select_penalty(ads, blocks, T, b, ("vector",), alphas, folds,
                             lambda th, bb: _neg_mse(th, bb, T, b))
    best = max(rows, key=lambda r: r["score"])["alpha"]
    # a clean linear map wants almost no penalty; pure noise wants the predictions shrunk to the mean
    assert best <= 0.1 if not noise_only else best >= 1000.0


def test_ridge_path_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    ads, blocks, T, b = _handmade(False, n=40, p=50)  # more columns than rows, as with ad vectors
    Y = np.column_stack([T, b])
    for alpha, (coef, bias) in zip((0.5, 20.0), pr.ridge_path(blocks["vector"], Y, (0.5, 20.0))):
        m = Ridge(alpha=alpha).fit(blocks["vector"], Y)
        np.testing.assert_allclose(coef, m.coef_, atol=1e-8)
        np.testing.assert_allclose(bias, m.intercept_, atol=1e-8)


def test_save_load_roundtrip(prep, world, tmp_path):
    ids = prep.retired.ad_ids
    ads = [world.data.ad_by_id[a] for a in ids]
    blocks = pr.ad_blocks(prep, ids)
    settings = pr.PriorSettings(alphas=(1.0, 10.0), inputs=("meta", "date", "vector"))
    prior, _ = pr.select_prior(prep, blocks, settings)
    prior.save(tmp_path / "p")
    assert not any(p.suffix in (".pkl", ".pickle") for p in (tmp_path / "p").iterdir())
    back = pr.RidgePrior.load(tmp_path / "p")
    assert back.inputs == ["meta", "date", "vector"] and back.alpha == prior.alpha
    assert back.vocab == prior.vocab and back.meta["cv_auc"] == prior.meta["cv_auc"]
    cold = world.data.cold_ads
    cold_ads = [world.data.ad_by_id[a] for a in cold]
    cb = pr.ad_blocks(prep, cold)
    for x, y in zip(prior.predict(cold_ads, cb), back.predict(cold_ads, cb)):
        np.testing.assert_allclose(x, y)
    # damage is a one-line DataError
    (tmp_path / "p" / pr.NPZ_NAME).write_bytes(b"not an npz")
    with pytest.raises(DataError):
        pr.RidgePrior.load(tmp_path / "p")
    with pytest.raises(DataError):
        back.predict(cold_ads, {})  # the vector block is missing


def test_structured_columns():
    ads = [Ad(id="1", title="t", launch_date=date(2020, 1, 1), metadata={"genres": ["A", "B"], "n": 5}),
           Ad(id="2", title="t", metadata={"genres": ["A"], "cold": True, "tag": "x"}),
           Ad(id="3", title="t", launch_date=date(2021, 1, 1), metadata={"genres": ["B", "C"], "tag": "y"})]
    vocab = pr.categorical_vocab(ads)
    assert vocab == {"genres": ["A", "B"]}  # numbers, flags and one-off values get no column
    np.testing.assert_array_equal(pr.meta_columns(ads, vocab), [[1, 1], [1, 0], [0, 1]])
    d = pr.date_columns(ads, date(2020, 1, 1).toordinal(), 366.0)
    np.testing.assert_allclose(d, [[0, 0], [0, 1], [1, 0]])


def test_image_half_is_recovered():
    rng = np.random.default_rng(0)
    t, i = rng.standard_normal((2, 5, 16))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    c = (t + i) / np.linalg.norm(t + i, axis=1, keepdims=True)
    np.testing.assert_allclose(2 * (c * t).sum(1, keepdims=True) * c - t, i, atol=1e-12)


def test_unseen_topics_world(unseen, unseen_prep):
    data = unseen.data
    names = data.feature_names
    new = [f"interest_{t}" for t in UNSEEN_TOPICS]
    assert set(new) <= set(names)
    for a in data.warm_ads:
        assert not set(data.ad_by_id[a].metadata["topics"]) & set(UNSEEN_TOPICS)
    for a in data.cold_ads:
        ad = data.ad_by_id[a]
        topic = ad.metadata["topics"][0]
        assert topic in UNSEEN_TOPICS and topic in ad.text  # the text names the topic in words
        spec = next(s for s in data.features if s.name == f"interest_{topic}")
        assert topic in spec.description
        assert unseen.truth.subset([a]).theta[0, names.index(f"interest_{topic}")] > 1.0
    rows = pr.ridge_methods(unseen_prep, HashEncoder())
    cold = data.cold_ads
    truth = unseen.truth.subset(cold)
    ridge = rows["ridge"]
    # the prior puts next to nothing on the cold ad's own topic, so its direction misses the truth
    on_topic = [ridge.theta[i, names.index(f"interest_{data.ad_by_id[a].metadata['topics'][0]}")]
                for i, a in enumerate(cold)]
    assert np.abs(on_topic).max() < 0.3
    assert abs(_cos_rows(ridge.theta, truth.theta).mean()) < 0.3
    # while an oracle reading the text ("for people into gardening") against the definitions is close
    oracle = np.zeros_like(truth.theta)
    for i, a in enumerate(cold):
        for t in data.ad_by_id[a].metadata["topics"]:
            oracle[i, names.index(f"interest_{t}")] = 1.0
    assert _cos_rows(oracle, truth.theta).mean() > 0.8


def test_evaluate_shows_ridge_rows_and_pairs_against_best_prior(prep, world):
    methods = baseline_methods(prep, encoder=HashEncoder())
    assert {"ridge", "ridge_cal"} <= set(methods)
    best, val = best_prior(methods)
    assert best == max(val, key=val.get)
    truth = world.truth.subset(world.data.cold_ads)
    truth.method = "truth"
    methods["truth"] = truth
    res = evaluate(prep, methods, n_boot=50, challengers=["truth"])
    assert res["best_prior"] == best and res["bars"][0] == best and "knn_cal" in res["bars"]
    assert all(f"vs_{b}" in res["methods"]["truth"] for b in res["bars"])
    assert res["prior"]["inputs"] and "alpha" in res["prior"]
    by_inputs = res["prior"]["cv_auc_by_inputs"]
    assert "+".join(res["prior"]["inputs"]) in by_inputs and "vector" in by_inputs
    assert max(v["cv_auc"] for v in by_inputs.values()) == res["prior"]["cv_auc"]
    table = markdown_table(res)
    assert "| ridge |" in table and "| ridge_cal |" in table
    assert f"Paired against {best} (the best prior" in table
    json.dumps(res)


def test_too_few_retired_ads_gives_no_rows(prep):
    small = type(prep)(**{**prep.__dict__, "retired": prep.retired.subset(prep.retired.ad_ids[:3])})
    assert pr.ridge_methods(small) == {}


class _TableEncoder(Encoder):
    """A text encoder that looks each text up in a table: stands in for an LM whose embedding of the ad
    carries its weights."""

    name = "test-table"

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.dim = len(next(iter(table.values())))

    def encode_texts(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)

    def encode_images(self, image_paths):
        raise AssertionError("text only")

    def caption(self, image_path, top=3):
        raise AssertionError("text only")


def test_an_extra_encoder_that_carries_the_weights_is_chosen(prep, world, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path))
    cold = world.data.cold_ads
    ids = prep.retired.ad_ids + cold
    truth = world.truth.subset(ids).aligned(world.data.feature_names)
    rng = np.random.default_rng(0)
    noisy = truth.theta + 0.1 * rng.standard_normal(truth.theta.shape)
    enc = _TableEncoder(dict(zip(ad_texts(world.data, ids), noisy, strict=True)))
    plain = pr.ridge_methods(prep, HashEncoder())["ridge"]
    with_lm = pr.ridge_methods(prep, HashEncoder(), extra={"lm": enc})["ridge"]
    cands = {tuple(c["inputs"]) for c in with_lm.meta["candidates"]}
    assert {("lm",), ("vector", "lm"), ("meta", "lm")} <= cands  # alone, beside the ad vector, with metadata
    assert "lm" in with_lm.meta["inputs"] and "lm" not in plain.meta["inputs"]
    assert with_lm.meta["cv_auc"] > plain.meta["cv_auc"]  # chosen on retired ads ...
    t = world.truth.subset(cold).aligned(world.data.feature_names).theta
    assert (
        _cos_rows(with_lm.theta, t).mean() > _cos_rows(plain.theta, t).mean() + 0.01
    )  # ... and it helps cold
    with pytest.raises(ValueError, match="taken"):
        pr.ad_blocks(prep, ids, None, extra={"meta": enc})
