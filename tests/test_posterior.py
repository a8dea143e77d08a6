"""Bayesian logistic regression per ad (`ctr.posterior`): it learns the synthetic world's true weights as
events arrive, faster from a good prior; the online (warm-started) update; empirical Bayes on hand-made
cases; the saved table."""

from __future__ import annotations

import numpy as np
import pytest

from llmhyper.ctr import posterior as po
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.errors import DataError
from llmhyper.weights import WeightTable, sigmoid


@pytest.fixture(scope="module")
def world():
    return generate_synthetic(n_users=3000, n_warm=10, n_cold=6, seed=3)


def _distance_curve(world, prior_of, settings, grid):
    """Mean over the cold ads of |posterior mean - true weights| after the first n users' clicks."""
    data, truth = world.data, world.truth
    out = []
    for n in grid:
        dist = []
        for ad in data.cold_ads:
            j = data.ad_index[ad]
            true = np.append(truth.theta[j], truth.intercept[j])
            post = po.fit(prior_of(j), data.X[:n], data.Y[:n, j], settings)
            dist.append(np.linalg.norm(post.mean - true))
        out.append(float(np.mean(dist)))
    return out


def test_posterior_approaches_the_true_weights_faster_from_a_good_prior(world):
    truth = world.truth
    rng = np.random.default_rng(0)
    d = truth.theta.shape[1]
    # a good prior: the truth blurred by noise of sd 0.3 per weight; no prior: zeros and a flat intercept
    noise = rng.normal(0, 0.3, (truth.theta.shape[0], d + 1))
    good_s = po.PosteriorSettings(precision=10.0)
    none_s = po.PosteriorSettings(precision=0.5, intercept_precision=1e-4)
    grid = [0, 25, 100, 400, 1600]
    good = _distance_curve(
        world,
        lambda j: po.prior(truth.theta[j] + noise[j, :d], truth.intercept[j] + noise[j, d], good_s),
        good_s,
        grid,
    )
    none = _distance_curve(world, lambda j: po.prior(np.zeros(d), 0.0, none_s), none_s, grid)
    # both converge on the truth as events arrive ...
    assert none[-1] < none[2] < none[0] and good[-1] < good[0]
    assert good[-1] < 0.45 and none[-1] < 0.45
    # ... and the good prior is closer at every stage before the data dominate
    for g, n in zip(good[:-1], none[:-1], strict=True):
        assert g < n
    assert good[1] < 0.6 * none[1]


def test_warm_start_equals_refit_on_each_batch_as_prior(world):
    data = world.data
    j = data.ad_index[data.cold_ads[0]]
    s = po.PosteriorSettings(precision=2.0)
    p0 = po.prior(np.zeros(len(data.features)), -1.0, s)
    X, y = data.X[:300], data.Y[:300, j]
    seq = p0
    for k in range(0, 300, 100):
        seq = po.fit(seq, X[k : k + 100], y[k : k + 100], s)
    batch = po.fit(p0, X, y, s)
    assert seq.n == batch.n == 300 and seq.clicks == batch.clicks == int(y.sum())
    # the Laplace update is an approximation: close to the batch posterior, not equal
    assert np.abs(seq.mean - batch.mean).max() < 0.1
    assert np.linalg.norm(seq.precision - batch.precision) < 0.1 * np.linalg.norm(batch.precision)
    # the mode does not depend on where the solver starts
    other = po.fit(p0, X, y, s, start=np.full(len(p0.mean), 3.0))
    np.testing.assert_allclose(other.mean, batch.mean, atol=1e-9)
    newton = po.fit(p0, X, y, po.PosteriorSettings(precision=2.0, solver="newton"))
    np.testing.assert_allclose(newton.mean, batch.mean, atol=1e-9)  # the other solver: the same mode
    np.testing.assert_allclose(newton.precision, batch.precision, atol=1e-8)


def test_map_solves_the_penalised_likelihood():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 4))
    y = (rng.random(80) < sigmoid(X @ [1.0, -1.0, 0.5, 0.0] - 0.5)).astype(float)
    s = po.PosteriorSettings(precision=3.0, intercept_precision=0.5)
    p0 = po.prior([0.2, 0.1, 0.0, -0.3], 0.4, s)
    post = po.fit(p0, X, y, s)
    Xa = np.hstack([X, np.ones((80, 1))])
    grad = Xa.T @ (sigmoid(Xa @ post.mean) - y) + p0.precision @ (post.mean - p0.mean)
    assert np.abs(grad).max() < 1e-8  # the gradient of the negative log posterior vanishes
    p = sigmoid(Xa @ post.mean)
    np.testing.assert_allclose(post.precision, Xa.T @ (Xa * (p * (1 - p))[:, None]) + p0.precision, atol=1e-9)
    assert np.all(post.variance() < 1 / np.diag(p0.precision))  # data only shrink the variance
    draws = post.sample(np.random.default_rng(2), 20000)
    np.testing.assert_allclose(draws.mean(axis=0), post.mean, atol=0.03)
    np.testing.assert_allclose(np.cov(draws.T), post.covariance(), atol=0.02)
    m = post.predict_moderated(X[:5])
    assert np.all(np.abs(m - 0.5) <= np.abs(post.predict(X[:5]) - 0.5) + 1e-12)  # moderated toward 0.5


def test_no_events_is_the_prior_and_bad_input_is_refused():
    s = po.PosteriorSettings()
    p0 = po.prior([1.0, 2.0], -1.0, s)
    same = po.fit(p0, np.zeros((0, 2)), [], s)
    assert np.array_equal(same.mean, p0.mean) and same.n == 0
    with pytest.raises(ValueError, match="labels 0 or 1"):
        po.fit(p0, np.ones((2, 2)), [0, 2], s)
    with pytest.raises(ValueError, match="columns"):
        po.fit(p0, np.ones((2, 3)), [0, 1], s)
    with pytest.raises(ValueError, match="positive"):
        po.PosteriorSettings(precision=0)


# -- empirical Bayes on hand-made cases ---------------------------------------------------------------
def _retired_world(seed=0, n_users=600, n_ads=12, d=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_users, d))
    theta = rng.normal(0, 1.0, (n_ads, d))
    b = rng.normal(-1.0, 0.3, n_ads)
    Y = (rng.random((n_users, n_ads)) < sigmoid(X @ theta.T + b)).astype(np.uint8)
    return X, Y, np.ones_like(Y, dtype=bool), theta, b


def _table(theta, b):
    return WeightTable(
        "p", [f"a{i}" for i in range(len(b))], [f"f{j}" for j in range(theta.shape[1])], theta, b
    )


def _score(res, precision, intercept_precision=None):
    ip = precision if intercept_precision is None else intercept_precision
    return next(
        c["heldout_loglik"]
        for c in res.candidates
        if c["precision"] == precision and c["intercept_precision"] == ip
    )


def test_eb_trusts_a_perfect_prior_and_distrusts_a_wrong_one():
    X, Y, M, theta, b = _retired_world()
    eb = po.EBSettings(grid=(0.1, 1.0, 10.0, 100.0), intercept_grid=None, reveal=(10, 40), max_ads=12)
    exact = po.choose_precision(_table(theta, b), X, Y, M, eb)
    assert exact.precision == exact.intercept_precision == 100.0  # the prior IS the truth: lean on it
    wrong = po.choose_precision(_table(-2 * theta, b + 1.5), X, Y, M, eb)
    assert wrong.precision == 0.1  # a prior pointing the wrong way: trust the data
    assert _score(exact, 100.0) > _score(wrong, 100.0)
    assert exact.to_dict()["n_ads"] == 12 and len(exact.candidates) == 4


def test_eb_separates_the_intercept_from_the_weights():
    X, Y, M, theta, b = _retired_world(seed=2, n_ads=16)
    # right weights, intercepts off by +-1.5 per ad: trust the weights, learn the intercept
    shift = np.where(np.arange(16) % 2, 1.5, -1.5)
    eb = po.EBSettings(
        grid=(0.1, 1.0, 10.0, 100.0), intercept_grid=(0.01, 1.0, 100.0), reveal=(20, 60), max_ads=16
    )
    res = po.choose_precision(_table(theta, b + shift), X, Y, M, eb)
    assert res.precision >= 10.0 and res.intercept_precision <= 1.0
    assert res.settings() == po.PosteriorSettings(
        precision=res.precision, intercept_precision=res.intercept_precision
    )
    assert len(res.candidates) == 12


def test_eb_picks_a_middle_precision_for_a_roughly_right_prior():
    X, Y, M, theta, b = _retired_world(seed=4, n_ads=20)
    rng = np.random.default_rng(5)
    blurred = _table(theta + rng.normal(0, 0.5, theta.shape), b + rng.normal(0, 0.2, b.shape))
    eb = po.EBSettings(grid=(0.01, 0.3, 3.0, 30.0, 300.0), intercept_grid=None, reveal=(10, 50), max_ads=20)
    res = po.choose_precision(blurred, X, Y, M, eb)
    assert res.precision in (
        0.3,
        3.0,
        30.0,
    )  # neither ignore nor freeze a prior that is off by ~0.5 per weight
    assert _score(res, res.precision) > max(_score(res, 0.01), _score(res, 300.0))


def test_eb_checks_its_input():
    X, Y, M, theta, b = _retired_world(n_ads=3)
    with pytest.raises(ValueError, match="line up"):
        po.choose_precision(_table(theta[:2], b[:2]), X, Y, M)
    with pytest.raises(ValueError, match="more impressions"):
        po.choose_precision(_table(theta, b), X[:5], Y[:5], M[:5], po.EBSettings(reveal=(10,)))


# -- the table ---------------------------------------------------------------------------------------
def test_table_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    w = WeightTable("llm_hyper", ["x", "y"], ["f0", "f1", "f2"], rng.normal(size=(2, 3)), [-1.0, -2.0])
    table = po.PosteriorTable.from_weights(w, po.PosteriorSettings(precision=4.0))
    post = po.fit(table.get("y"), rng.normal(size=(30, 3)), rng.integers(0, 2, 30), po.PosteriorSettings())
    table.set("y", post)
    table.save(tmp_path / "post")
    back = po.PosteriorTable.load(tmp_path / "post")
    assert back.ad_ids == ["x", "y"] and back.n.tolist() == [0, 30]
    np.testing.assert_array_equal(back.mean, table.mean)
    np.testing.assert_array_equal(back.precision, table.precision)
    assert back.meta["precision"] == 4.0
    weights = back.to_weights()
    np.testing.assert_array_equal(weights.theta[0], w.theta[0])  # untouched ad: still the prior
    (tmp_path / "post" / po.NPZ_NAME).write_bytes(b"garbage")
    with pytest.raises(DataError, match="does not match"):
        po.PosteriorTable.load(tmp_path / "post")
