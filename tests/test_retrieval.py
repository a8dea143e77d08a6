"""AdIndex: exact cosine top-k, self-exclusion, save/load without pickle, clear errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from llmhyper.errors import DataError
from llmhyper.retrieval.index import AdIndex, AdIndexError, Neighbour


def _data(n=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return [f"ad{i}" for i in range(n)], rng.normal(size=(n, dim)).astype(np.float32)


def _brute(index_vecs, queries, k, exclude=None):
    a = index_vecs / np.linalg.norm(index_vecs, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ a.T
    out = []
    for qi, row in enumerate(sims):
        order = [j for j in np.argsort(-row, kind="stable") if exclude is None or j not in exclude[qi]]
        out.append([(int(j), float(row[j])) for j in order[:k]])
    return out


def test_topk_matches_brute_force_cosine():
    ids, vecs = _data()
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(9, 16)).astype(np.float32) * 7.0  # unnormalised on purpose
    index = AdIndex("test-enc").build(ids, vecs * rng.uniform(0.1, 5, size=(60, 1)))  # scale-free
    got = index.search(queries, k=5)
    want = _brute(vecs, queries, 5)
    assert len(got) == 9
    for g, w in zip(got, want):
        assert [n.ad_id for n in g] == [ids[j] for j, _ in w]
        np.testing.assert_allclose([n.similarity for n in g], [s for _, s in w], atol=1e-5)
        assert all(isinstance(n, Neighbour) and isinstance(n.similarity, float) for n in g)
        sims = [n.similarity for n in g]
        assert sims == sorted(sims, reverse=True)


def test_single_vector_query_and_k_larger_than_index():
    ids, vecs = _data(n=4)
    index = AdIndex().build(ids, vecs)
    res = index.search(vecs[0], k=10)  # 1-d query
    assert len(res) == 1 and len(res[0]) == 4
    assert res[0][0] == Neighbour("ad0", pytest.approx(1.0, abs=1e-5))


def test_an_ad_never_retrieves_itself():
    ids, vecs = _data()
    index = AdIndex().build(ids, vecs)
    res = index.search_ids(ids, vecs, k=3)
    want = _brute(vecs, vecs, 3, exclude=[{i} for i in range(len(ids))])
    for qi, (g, w) in enumerate(zip(res, want)):
        assert len(g) == 3
        assert ids[qi] not in [n.ad_id for n in g]
        assert [n.ad_id for n in g] == [ids[j] for j, _ in w]
    # a query that is not in the index is unaffected by its own id
    q = np.random.default_rng(5).normal(size=(1, 16)).astype(np.float32)
    assert [n.ad_id for n in index.search_ids(["new-ad"], q, 3)[0]] == \
           [n.ad_id for n in index.search(q, 3)[0]]


def test_exclude_ids_shared_and_per_query():
    ids, vecs = _data(n=10)
    index = AdIndex().build(ids, vecs)
    # excluding many ids still returns k results (over-fetch)
    res = index.search(vecs[:2], k=3, exclude_ids=ids[:6])
    for r in res:
        assert len(r) == 3 and not {n.ad_id for n in r} & set(ids[:6])
    per = index.search(vecs[:2], k=9, exclude_ids=[["ad0"], {"ad1", "ad2"}])
    assert len(per[0]) == 9 and "ad0" not in {n.ad_id for n in per[0]}
    assert len(per[1]) == 8 and not {"ad1", "ad2"} & {n.ad_id for n in per[1]}
    with pytest.raises(AdIndexError, match="per-query"):
        index.search(vecs[:2], k=3, exclude_ids=[["ad0"]])


def test_save_load_round_trip(tmp_path):
    ids, vecs = _data()
    index = AdIndex("minilm-effnet-conse").build(ids, vecs)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "ads.json").read_text())
    assert meta["ids"] == ids and meta["encoder"] == "minilm-effnet-conse" and meta["dim"] == 16
    loaded = AdIndex.load(tmp_path / "idx")
    assert loaded.ids == ids and loaded.dim == 16 and loaded.encoder_name == "minilm-effnet-conse"
    assert loaded.search_ids(ids[:7], vecs[:7], 4) == index.search_ids(ids[:7], vecs[:7], 4)
    np.testing.assert_allclose(loaded.vector("ad3"), vecs[3] / np.linalg.norm(vecs[3]), atol=1e-6)
    with pytest.raises(DataError, match="other-encoder|minilm-effnet-conse"):
        AdIndex.load(tmp_path / "idx", encoder_name="other-encoder")


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        AdIndex.load(tmp_path / "nothing")
    ids, vecs = _data(n=5)
    AdIndex().build(ids, vecs).save(tmp_path)
    (tmp_path / "ads.json").write_text(json.dumps({"ids": ids[:3], "dim": 16}))
    with pytest.raises(DataError, match="lists 3 ids"):
        AdIndex.load(tmp_path)


def test_errors():
    ids, vecs = _data(n=5)
    with pytest.raises(AdIndexError, match="empty"):
        AdIndex().search(vecs, 3)
    with pytest.raises(AdIndexError, match="no ads"):
        AdIndex().build([], np.zeros((0, 16), np.float32))
    with pytest.raises(AdIndexError, match="5 ids but 4 vectors"):
        AdIndex().build(ids, vecs[:4])
    with pytest.raises(AdIndexError, match="duplicate"):
        AdIndex().build(["a", "a", "b", "c", "d"], vecs)
    index = AdIndex("enc-x").build(ids, vecs)
    with pytest.raises(AdIndexError, match="dimension 8 .* 16-d"):
        index.search(np.ones((2, 8), np.float32), 3)
    with pytest.raises(AdIndexError, match="k must be"):
        index.search(vecs, 0)
    with pytest.raises(AdIndexError, match="NaN"):
        index.search(np.full((1, 16), np.nan, np.float32), 1)
    with pytest.raises(AdIndexError, match="2 ids but 5"):
        index.search_ids(["a", "b"], vecs, 1)


def test_deepcopy_shares_the_index():
    ids, vecs = _data(n=5)
    index = AdIndex().build(ids, vecs)
    assert copy.deepcopy(index) is index
    assert copy.deepcopy({"idx": index})["idx"] is index
