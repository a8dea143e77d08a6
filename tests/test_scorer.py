"""The serving scorer: hand-computed cases, top-k against numpy, judge flags, hand-over, float32, reload."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from llmhyper.data.contract import load_folder, read_user_features
from llmhyper.data.scaling import feature_scaling, scaling_arrays, stamp_scaling
from llmhyper.data.tables import find_table
from llmhyper.errors import DataError
from llmhyper.serve.artifact import read_artifact
from llmhyper.serve.scorer import FeatureError, Scorer, Snapshot
from llmhyper.weights import WeightTable, sigmoid

NAMES = ["age", "is_female", "like_Action"]
EXAMPLE = Path(__file__).resolve().parent.parent / "data" / "example"


def tiny() -> WeightTable:
    # ad a: 1*age + 0 ; ad b: -1*age + 2*is_female - 1 ; ad c: 0.5*like_Action + 0.5
    theta = [[1.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.5]]
    return WeightTable("llm_hyper", ["a", "b", "c"], NAMES, theta, [0.0, -1.0, 0.5])


def random_table(n_ads=120, d=40, seed=0, method="llm_hyper", prefix="ad") -> WeightTable:
    rng = np.random.default_rng(seed)
    return WeightTable(method, [f"{prefix}{i}" for i in range(n_ads)], [f"f{j}" for j in range(d)],
                       rng.normal(0, 0.3, (n_ads, d)), rng.normal(-2, 0.5, n_ads))


def s(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# -- hand-computed --------------------------------------------------------------------------------
def test_hand_computed_scores_and_rank():
    sc = Scorer.from_tables(tiny())
    x = [2.0, 1.0, 0.0]  # logits: a = 2, b = -2 + 2 - 1 = -1, c = 0.5
    got = sc.scores(x)
    assert got.dtype == np.float32 and got.shape == (1, 3)
    np.testing.assert_allclose(got[0], [s(2.0), s(-1.0), s(0.5)], rtol=1e-6)
    assert [a for a, _ in sc.rank(x, 3)[0]] == ["a", "c", "b"]
    top2 = sc.rank(x, 2)[0]
    assert [a for a, _ in top2] == ["a", "c"]
    assert top2[0][1] == pytest.approx(s(2.0), rel=1e-6)
    # second user: a = -1, b = 1 + 0 - 1 = 0, c = 0.5*2 + 0.5 = 1.5
    ranked = sc.rank([[2.0, 1.0, 0.0], [-1.0, 0.0, 2.0]], 1)
    assert [r[0][0] for r in ranked] == ["a", "c"]
    assert ranked[1][0][1] == pytest.approx(s(1.5), rel=1e-6)


def test_theta_layout_is_contiguous_float32_features_by_ads():
    snap = Scorer.from_tables(tiny()).snapshot
    assert snap.theta.dtype == np.float32 and snap.theta.shape == (3, 3) and snap.theta.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(snap.theta[:, 1], [-1.0, 2.0, 0.0])  # column = ad b
    assert not snap.theta.flags.writeable and not snap.intercept.flags.writeable
    assert snap.intercept.dtype == np.float32


def test_k_larger_than_catalogue_and_bad_k():
    sc = Scorer.from_tables(tiny())
    assert len(sc.rank([0.0, 0.0, 0.0], 50)[0]) == 3
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            sc.rank([0.0, 0.0, 0.0], k)


def test_extreme_logits_still_rank_by_logit():
    # float32 sigmoid saturates at 1.0 for both; the ranking must still follow the logits
    t = WeightTable("m", ["lo", "hi"], ["x"], [[50.0], [60.0]], [0.0, 0.0])
    out = Scorer.from_tables(t).rank([[1.0]], 2)[0]
    assert [a for a, _ in out] == ["hi", "lo"]
    assert all(0.0 <= c <= 1.0 for _, c in out)


def test_ties_break_by_ad_position():
    t = WeightTable("m", ["a", "b", "c", "d", "e"], ["x"], [[1.0], [2.0], [1.0], [2.0], [1.0]], [0.0] * 5)
    sc = Scorer.from_tables(t)
    assert [a for a, _ in sc.rank([[1.0]], 5)[0]] == ["b", "d", "a", "c", "e"]
    assert [a for a, _ in sc.rank([[1.0]], 3)[0]] == ["b", "d", "a"]
    assert [a for a, _ in sc.rank([[0.0]], 2)[0]] == ["a", "b"]
    # the batch path agrees with the single-user path
    assert [[a for a, _ in r] for r in sc.rank([[1.0], [0.0], [-1.0]], 3)] == [
        ["b", "d", "a"], ["a", "b", "c"], ["a", "c", "e"]]


# -- against numpy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 10, 119, 120])
def test_top_k_matches_numpy_argsort(k):
    table = random_table()
    sc = Scorer.from_tables(table)
    X = np.random.default_rng(1).normal(size=(64, 40))
    P = table.predict(X)  # float64 reference
    for i, ranked in enumerate(sc.rank(X, k)):
        expected = np.argsort(-P[i], kind="stable")[:k]
        assert [a for a, _ in ranked] == [table.ad_ids[j] for j in expected]
        np.testing.assert_allclose([c for _, c in ranked], P[i, expected], rtol=2e-5, atol=1e-7)


def test_float32_agrees_with_float64():
    table = random_table(n_ads=500, d=40, seed=3)
    X = np.random.default_rng(4).normal(size=(300, 40))
    got = Scorer.from_tables(table).scores(X)
    ref = sigmoid(X @ table.theta.T + table.intercept)
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref)) < 1e-5
    # rankings agree except where float64 scores are closer than float32 can resolve
    agree = (np.argmax(got, axis=1) == np.argmax(ref, axis=1)).mean()
    assert agree > 0.99


# -- feature order ----------------------------------------------------------------------------------
def test_feature_order_is_checked():
    sc = Scorer.from_tables(tiny())
    sc.scores([[0.0, 0.0, 0.0]], feature_names=NAMES)
    with pytest.raises(FeatureError, match="order"):
        sc.scores([[0.0, 0.0, 0.0]], feature_names=["is_female", "age", "like_Action"])
    with pytest.raises(FeatureError, match="unknown"):
        sc.rank([[0.0, 0.0, 0.0]], 1, feature_names=["age", "is_female", "like_Comedy"])
    with pytest.raises(FeatureError, match="shape"):
        sc.scores([[0.0, 0.0]])
    with pytest.raises(FeatureError, match="non-finite"):
        sc.rank([[0.0, np.inf, 0.0]], 1)


def test_from_dirs_checks_expected_feature_names(tmp_path):
    tiny().save(tmp_path / "g")
    Scorer.from_dirs(tmp_path / "g", feature_names=NAMES)
    with pytest.raises(FeatureError, match="position 0"):
        Scorer.from_dirs(tmp_path / "g", feature_names=["is_female", "age", "like_Action"])


def test_vectorize():
    snap = Scorer.from_tables(tiny()).snapshot
    np.testing.assert_array_equal(snap.vectorize({"is_female": 1, "age": 0.5, "like_Action": -2.0}),
                                  np.array([0.5, 1.0, -2.0], np.float32))
    np.testing.assert_array_equal(snap.vectorize([0.5, 1, -2.0]), np.array([0.5, 1.0, -2.0], np.float32))
    with pytest.raises(FeatureError, match="unknown features \\['height'\\]"):
        snap.vectorize({"age": 0, "is_female": 0, "like_Action": 0, "height": 1})
    with pytest.raises(FeatureError, match="missing features \\['like_Action'\\]"):
        snap.vectorize({"age": 0, "is_female": 0})
    with pytest.raises(FeatureError, match="expected 3"):
        snap.vectorize([1.0, 2.0])
    with pytest.raises(FeatureError, match="non-finite"):
        snap.vectorize([1.0, float("nan"), 0.0])
    with pytest.raises(FeatureError, match="numbers"):
        snap.vectorize([1.0, "2", 0.0])
    with pytest.raises(FeatureError, match="numbers"):
        snap.vectorize([1.0, True, 0.0])


# -- judge flags ------------------------------------------------------------------------------------
def flagged() -> WeightTable:
    t = tiny()
    t.flags = {"a": ["age"], "c": ["is_female", "not_a_feature"], "zz": ["age"]}
    return t


def test_flag_drop_rule():
    sc = Scorer.from_tables(flagged(), flag_threshold=1.0)
    snap = sc.snapshot
    assert dict(snap.flags) == {"a": ("age",), "c": ("is_female",)}  # unknown ads/features ignored
    X = np.array([
        [0.5, 0.0, 0.0],   # nothing strong: all three allowed
        [1.0, 0.0, 0.0],   # |age| = 1.0 >= 1: a dropped (boundary counts)
        [-1.5, 0.0, 0.0],  # strongly low age is strong too: a dropped
        [0.0, 2.0, 0.0],   # strong is_female: c dropped
        [3.0, -1.2, 0.0],  # both: only b left
        [0.99, 0.99, 5.0],  # below threshold: all allowed (like_Action is not flagged)
    ])
    allowed = sc.allowed(X)
    np.testing.assert_array_equal(allowed, [[1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 0], [0, 1, 0], [1, 1, 1]])
    ranked = sc.rank(X, 3)
    for i, r in enumerate(ranked):
        ids = [a for a, _ in r]
        assert set(ids) == {snap.ad_ids[j] for j in np.flatnonzero(allowed[i])}
        assert sc.rank(X[i], 3)[0] == r  # single-user path == batch path
    assert [a for a, _ in ranked[4]] == ["b"]  # fewer than k when flags drop ads
    # scores() itself is not filtered
    assert sc.scores(X).shape == (6, 3)


def test_flag_threshold_changes_the_rule():
    sc = Scorer.from_tables(flagged(), flag_threshold=2.5)
    np.testing.assert_array_equal(sc.allowed([[2.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), [[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError):
        Scorer.from_tables(flagged(), flag_threshold=0.0)


def test_flagged_top_k_matches_masked_numpy():
    table = random_table(seed=5)
    rng = np.random.default_rng(6)
    table.flags = {a: [f"f{j}" for j in rng.choice(40, 2, replace=False)] for a in table.ad_ids[::3]}
    sc = Scorer.from_tables(table, flag_threshold=1.0)
    X = rng.normal(size=(50, 40))
    P = table.predict(X)
    for i, ranked in enumerate(sc.rank(X, 10)):
        ok = [j for j, a in enumerate(table.ad_ids)
              if not any(abs(X[i, int(f[1:])]) >= 1.0 for f in table.flags.get(a, []))]
        expected = sorted(ok, key=lambda j: -P[i, j])[:10]
        assert [a for a, _ in ranked] == [table.ad_ids[j] for j in expected]
        one = sc.rank(X[i], 10)[0]  # single-user path (GEMV: other float rounding than the batch GEMM)
        assert [a for a, _ in one] == [a for a, _ in ranked]
        np.testing.assert_allclose([c for _, c in one], [c for _, c in ranked], rtol=1e-5)


# -- hand-over ---------------------------------------------------------------------------------------
def test_trained_weights_win():
    gen = tiny()
    gen.flags = {"b": ["age"]}
    # trained artifact with its columns in another order, for b and for an ad not generated
    trained = WeightTable("lr_warm", ["b", "w"], ["like_Action", "age", "is_female"],
                          [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [3.0, 0.0])
    sc = Scorer.from_tables(gen, trained)
    snap = sc.snapshot
    assert snap.ad_ids == ("a", "b", "c")  # catalogue = generated ads
    assert [snap.source_of(a) for a in "abc"] == ["generated", "trained", "generated"]
    assert snap.counts() == {"generated": 2, "trained": 1, "flagged_ads": 1}
    x = [0.0, 0.0, 0.0]
    np.testing.assert_allclose(sc.scores(x)[0], [s(0.0), s(3.0), s(0.5)], rtol=1e-6)
    assert sc.rank(x, 1)[0][0][0] == "b"
    assert [a for a, _ in sc.rank([2.0, 0.0, 0.0], 3)[0]] == ["a", "c"]  # flag still applies after hand-over
    union = Scorer.from_tables(gen, trained, catalog="union").snapshot
    assert union.ad_ids == ("a", "b", "c", "w") and union.source_of("w") == "trained"


def test_trained_with_other_features_is_an_error():
    trained = WeightTable("lr_warm", ["b"], ["age", "is_female", "like_Comedy"], [[0.0, 0.0, 0.0]], [0.0])
    with pytest.raises(DataError, match="other features"):
        Scorer.from_tables(tiny(), trained)


# -- loading and reloading ------------------------------------------------------------------------
def test_from_dirs_and_reload_swap(tmp_path):
    tiny().save(tmp_path / "g")
    sc = Scorer.from_dirs(tmp_path / "g")
    old = sc.snapshot
    assert sc.reload().version == old.version  # same bytes, same version
    t = tiny()
    t.intercept = t.intercept + 1.0
    t.save(tmp_path / "g")
    WeightTable("lr_warm", ["c"], NAMES, [[0.0, 0.0, 0.0]], [-5.0]).save(tmp_path / "t")
    sc2 = Scorer.from_dirs(tmp_path / "g", tmp_path / "t")
    assert sc2.snapshot.source_of("c") == "trained"
    new = sc.reload()
    assert new.version != old.version and sc.snapshot is new
    # the old snapshot is untouched and still usable
    np.testing.assert_allclose(old.scores([0.0, 0.0, 0.0])[0], [s(0.0), s(-1.0), s(0.5)], rtol=1e-6)
    np.testing.assert_allclose(new.scores([0.0, 0.0, 0.0])[0], [s(1.0), s(0.0), s(1.5)], rtol=1e-6)


def test_reload_failure_keeps_serving(tmp_path):
    tiny().save(tmp_path / "g")
    sc = Scorer.from_dirs(tmp_path / "g")
    before = sc.snapshot
    (tmp_path / "g" / "weights.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="cannot read"):
        sc.reload()
    assert sc.snapshot is before
    # another feature set is refused on reload
    WeightTable("m", ["a"], ["x"], [[1.0]], [0.0]).save(tmp_path / "g")
    with pytest.raises(FeatureError, match="other features"):
        sc.reload()
    assert sc.snapshot is before


def test_missing_and_nonfinite_artifacts(tmp_path):
    with pytest.raises(DataError, match="no weight artifact"):
        Scorer.from_dirs(tmp_path / "nothing")
    t = tiny()
    t.theta[1, 1] = np.nan
    t.save(tmp_path / "nan")
    with pytest.raises(DataError, match="non-finite"):
        Scorer.from_dirs(tmp_path / "nan")


def test_reload_while_scoring_is_consistent(tmp_path):
    """Readers on other threads always see one whole snapshot: scores match that snapshot's version."""
    a, b = random_table(seed=10), random_table(seed=11)
    a.save(tmp_path / "g")
    sc = Scorer.from_dirs(tmp_path / "g")
    X = np.random.default_rng(12).normal(size=(4, 40))
    expected = {}
    for t in (a, b):
        t.save(tmp_path / "probe")
        expected[Scorer.from_dirs(tmp_path / "probe").snapshot.version] = t.predict(X)
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            snap = sc.snapshot
            got = snap.scores(X)
            if np.max(np.abs(got - expected[snap.version])) > 1e-5:
                errors.append(snap.version)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        for i in range(10):
            (b if i % 2 == 0 else a).save(tmp_path / "g")
            sc.reload()
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors
    assert sc.reloads == 10


def test_snapshot_build_directly():
    snap = Snapshot.build(tiny(), version="v1")
    assert snap.version == "v1" and snap.n_ads == 3 and snap.n_features == 3


def test_blocked_scores_equal_unblocked(monkeypatch):
    import llmhyper.serve.snapshot as scorer_module

    table = random_table(n_ads=50, d=40, seed=7)
    X = np.random.default_rng(8).normal(size=(97, 40))
    whole = Scorer.from_tables(table).scores(X)
    monkeypatch.setattr(scorer_module, "_BLOCK_ELEMS", 200)  # 4 users per block, last block partial
    blocked = Scorer.from_tables(table).scores(X)
    # float32: blocked and whole matmuls may sum in another order (a few ulp apart, ~3e-8 near 0.5)
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(blocked, table.predict(X), atol=1e-5)


def test_with_weights_keeps_ads_flags_and_sources_and_swap_serves_it():
    table = random_table(n_ads=6, d=4, seed=3)
    table.flags = {"ad2": ["f0"]}
    scorer = Scorer.from_tables(table)
    snap = scorer.snapshot
    theta = np.zeros((6, 4))
    b = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    new = snap.with_weights(theta, b, "v2")
    assert new.version == "v2" and new.ad_ids == snap.ad_ids and new.flags == snap.flags
    assert new.sources == snap.sources and not new.theta.flags.writeable
    x = np.zeros((1, 4))
    assert new.rank(x, 1)[0][0][0] == "ad5"
    np.testing.assert_allclose(new.scores(x)[0], sigmoid(b), rtol=1e-6)
    x[0, 0] = 2.0  # the judge's flag still drops ad2 for users strong on f0
    assert "ad2" not in [a for a, _ in new.rank(x, 6)[0]]
    assert snap.version != "v2" and snap.theta.any()  # the old snapshot is untouched
    scorer.swap(new)
    assert scorer.snapshot is new
    with pytest.raises(ValueError, match="do not fit"):
        snap.with_weights(theta[:5], b[:5], "bad")
    with pytest.raises(DataError, match="non-finite"):
        snap.with_weights(theta, b * np.nan, "bad")
    with pytest.raises(FeatureError):
        scorer.swap(Scorer.from_tables(random_table(n_ads=6, d=5)).snapshot)


# -- feature scaling: raw values z-scored with the artifact's train means and stds --------------------
SCALE = feature_scaling(NAMES, [34.0, 0.3, 0.5], [11.0, 0.46, 0.2])


def test_raw_values_are_zscored_with_the_artifacts_scaling(tmp_path):
    t = stamp_scaling(tiny(), SCALE)
    t.save(tmp_path / "g")
    snap = Scorer.from_dirs(tmp_path / "g").snapshot
    np.testing.assert_allclose(snap.scaling[0], [34.0, 0.3, 0.5])
    raw = {"age": 56.0, "is_female": 1, "like_Action": 0.1}
    z = [(56.0 - 34.0) / 11.0, (1 - 0.3) / 0.46, (0.1 - 0.5) / 0.2]
    np.testing.assert_allclose(snap.vectorize(raw, raw=True), np.array(z, np.float32), rtol=1e-6)
    np.testing.assert_allclose(snap.zscore([[56.0, 1, 0.1]]), [z])
    assert snap.rank(snap.vectorize(raw, raw=True)) == snap.rank(z)
    with pytest.raises(FeatureError, match="no feature scaling"):
        Scorer.from_tables(tiny()).snapshot.vectorize(raw, raw=True)


def test_scaling_of_both_artifacts_must_agree():
    trained = WeightTable("lr_warm", ["b"], NAMES, np.zeros((1, 3)), [1.0])
    gen = stamp_scaling(tiny(), SCALE)
    snap = Snapshot.build(tiny(), stamp_scaling(trained, SCALE))  # only the trained one has it: used
    np.testing.assert_allclose(snap.scaling[1], [11.0, 0.46, 0.2])
    other = feature_scaling(NAMES, [30.0, 0.3, 0.5], [11.0, 0.46, 0.2])
    with pytest.raises(DataError, match="different feature scalings"):
        Snapshot.build(gen, stamp_scaling(trained, other))


@pytest.mark.parametrize("scaling, message", [
    ([1, 2], "must be an object with 'mean' and 'std'"),
    ({"mean": {"age": 0}}, "must be an object with 'mean' and 'std'"),
    ({"mean": {"age": 0.0}, "std": {"age": 1.0}}, "lacks features ['is_female', 'like_Action']"),
    ({"mean": dict.fromkeys(NAMES, 0.0), "std": {**dict.fromkeys(NAMES, 1.0), "age": 0.0}}, "positive finite"),
    ({"mean": {**dict.fromkeys(NAMES, 0.0), "age": "x"}, "std": dict.fromkeys(NAMES, 1.0)}, "not numbers"),
])
def test_malformed_scaling_is_a_one_line_data_error(tmp_path, scaling, message):
    t = tiny()
    t.meta = {"feature_scaling": scaling}
    t.save(tmp_path / "g")
    with pytest.raises(DataError, match=re.escape(message)):
        Scorer.from_dirs(tmp_path / "g")


def test_stamp_scaling_keeps_the_tables_features_only():
    wide = feature_scaling([*NAMES, "extra"], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    t = stamp_scaling(tiny().aligned(NAMES[::-1]), wide)
    assert list(t.meta["feature_scaling"]["mean"]) == NAMES[::-1]
    assert stamp_scaling(tiny(), None).meta == {}
    assert stamp_scaling(tiny(), feature_scaling(["age"], [1.0], [1.0])).meta == {}  # partial: not stamped


def test_load_folder_scaling_reproduces_its_features():
    data = load_folder(EXAMPLE)
    _, X_raw = read_user_features(find_table(EXAMPLE, "users"), data.features)
    mean, std = scaling_arrays(data.scaling, data.feature_names)
    np.testing.assert_allclose((X_raw - mean) / std, data.X, atol=1e-12)
    raw = load_folder(EXAMPLE, do_standardize=False)
    np.testing.assert_array_equal(scaling_arrays(raw.scaling, raw.feature_names)[1], 1.0)


def test_vectorize_huge_numbers():
    snap = Scorer.from_tables(tiny()).snapshot
    with pytest.raises(FeatureError, match="too large"):
        snap.vectorize([10**400, 0, 0])
    with pytest.raises(FeatureError, match="float32 range"):
        snap.vectorize([1e300, 0, 0])


# -- reading an artifact while it is replaced ---------------------------------------------------------
def test_a_half_replaced_artifact_is_read_again_until_both_files_agree(tmp_path):
    tiny().save(tmp_path / "old")
    new = random_table(3, 3, seed=1)
    new.feature_names = list(NAMES)
    new.ad_ids = ["a", "b", "c"]
    new.save(tmp_path / "new")
    d = tmp_path / "g"
    d.mkdir()
    (d / "weights.npz").write_bytes((tmp_path / "new" / "weights.npz").read_bytes())  # the npz renamed first
    (d / "weights.json").write_bytes((tmp_path / "old" / "weights.json").read_bytes())
    with pytest.raises(DataError, match="does not match"):  # never the new npz with the old json
        read_artifact(d, attempts=2)
    writer = threading.Timer(0.1, lambda: (d / "weights.json").write_bytes(
        (tmp_path / "new" / "weights.json").read_bytes()))
    writer.start()
    table, _ = read_artifact(d)
    writer.join()
    np.testing.assert_array_equal(table.theta, new.theta)
