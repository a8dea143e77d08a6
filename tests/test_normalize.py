"""Normaliser and calibrator: exact hand-made cases and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from llmhyper.ctr.normalize import (
    calibrate_intercept,
    l2_normalize,
    l2_normalize_rows,
    logit,
    neighbour_alpha,
    normalize_and_calibrate,
)
from llmhyper.weights import sigmoid


def test_l2_normalize_hand_case():
    assert np.allclose(l2_normalize(np.array([3.0, 4.0])), [0.6, 0.8])
    z = np.zeros(4)
    out = l2_normalize(z)
    assert np.array_equal(out, z) and out is not z


def test_l2_normalize_rows_hand_case():
    rows = l2_normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]))
    assert np.allclose(rows, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])


def test_calibration_symmetric_hand_case():
    # two users with logits +1 and -1 around delta: mean sigmoid(+-1 + d) = 0.5 exactly at d = 0
    X = np.array([[1.0], [-1.0]])
    assert calibrate_intercept(np.array([1.0]), X, 0.5) == pytest.approx(0.0, abs=1e-10)


def test_calibration_hits_alpha():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 6))
    theta = l2_normalize(rng.standard_normal(6))
    for alpha in (0.01, 0.16, 0.5, 0.93):
        d = calibrate_intercept(theta, X, alpha)
        assert sigmoid(X @ theta + d).mean() == pytest.approx(alpha, abs=1e-10)


def test_all_zero_weights_give_logit_alpha():
    X = np.random.default_rng(0).standard_normal((10, 3))
    theta, d = normalize_and_calibrate(np.zeros(3), X, 0.2)
    assert np.all(theta == 0) and d == pytest.approx(np.log(0.2 / 0.8))


def test_one_user_closed_form():
    X = np.array([[0.5, -2.0]])
    theta = np.array([1.0, 1.0])
    d = calibrate_intercept(theta, X, 0.3)
    assert d == pytest.approx(logit(0.3) - (0.5 - 2.0))
    assert sigmoid(X @ theta + d)[0] == pytest.approx(0.3)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        calibrate_intercept(np.ones(2), np.ones((3, 2)), alpha)


def test_no_users():
    with pytest.raises(ValueError, match="at least one user"):
        calibrate_intercept(np.ones(2), np.zeros((0, 2)), 0.1)


def test_extreme_alpha_and_large_logits_converge():
    X = np.random.default_rng(2).standard_normal((50, 2)) * 30
    d = calibrate_intercept(np.array([1.0, 0.0]), X, 1e-4)
    assert sigmoid(X[:, 0] + d).mean() == pytest.approx(1e-4, rel=1e-6)


def test_neighbour_alpha_is_mean_ctr():
    X = np.zeros((4, 2))
    alpha = neighbour_alpha(np.zeros((2, 2)), np.array([logit(0.1), logit(0.3)]), X)
    assert alpha == pytest.approx(0.2)


def test_huge_finite_weights_keep_their_direction():
    theta = np.array([3e200, 4e200])
    assert np.allclose(l2_normalize(theta), [0.6, 0.8])
    assert np.allclose(l2_normalize(np.array([3e-200, -4e-200])), [0.6, -0.8])
    rows = l2_normalize_rows(np.array([[3e300, 4e300], [3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(rows, [[0.6, 0.8], [0.6, 0.8], [0.0, 0.0]])


def test_ordinary_vectors_are_computed_as_before():
    theta = np.random.default_rng(3).standard_normal(40)
    assert np.array_equal(l2_normalize(theta), theta / np.linalg.norm(theta))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_weights_are_refused(bad):
    with pytest.raises(ValueError, match="not finite"):
        l2_normalize(np.array([1.0, bad]))
    with pytest.raises(ValueError, match="not finite"):
        l2_normalize_rows(np.array([[1.0, 2.0], [bad, 0.0]]))
    with pytest.raises(ValueError, match="not finite"):
        calibrate_intercept(np.array([1.0, 0.0]), np.array([[bad, 0.0], [1.0, 0.0]]), 0.2)
