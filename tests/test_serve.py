"""`llmhyper serve`: a real uvicorn server on a free loopback port, driven with httpx."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from llmhyper.serve.scorer import Scorer
from llmhyper.serve.app import MAX_BATCH, MAX_BODY_BYTES, create_app, host_warning, running_server
from llmhyper.weights import WeightTable

D, N_ADS = 8, 30
NAMES = [f"f{j}" for j in range(D)]


def table(seed: int, method: str = "llm_hyper", ids: list[str] | None = None) -> WeightTable:
    rng = np.random.default_rng(seed)
    ids = ids or [f"ad{i}" for i in range(N_ADS)]
    return WeightTable(method, ids, NAMES, rng.normal(0, 0.5, (len(ids), D)), rng.normal(-2, 0.5, len(ids)))


def expected_top(t: WeightTable, x: np.ndarray, k: int, drop: set[str] = frozenset()) -> list[str]:
    p = t.predict(x[None, :])[0]
    order = [t.ad_ids[j] for j in np.argsort(-p, kind="stable") if t.ad_ids[j] not in drop]
    return order[:k]


@pytest.fixture
def client():
    with httpx.Client(trust_env=False, timeout=10.0) as c:
        yield c


@pytest.fixture
def served(tmp_path):
    gen = table(0)
    gen.save(tmp_path / "gen")
    scorer = Scorer.from_dirs(tmp_path / "gen")
    with running_server(create_app(scorer)) as url:
        yield url, gen, scorer, tmp_path


# -- ranking --------------------------------------------------------------------------------------
def test_rank_matches_numpy(served, client):
    url, gen, scorer, _ = served
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.normal(size=D)
        r = client.post(f"{url}/rank", json={"features": dict(zip(NAMES, x.tolist())), "k": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == scorer.snapshot.version
        assert [a["ad_id"] for a in body["ads"]] == expected_top(gen, x, 7)
        p = gen.predict(x[None, :])[0]
        pos = {a: i for i, a in enumerate(gen.ad_ids)}
        np.testing.assert_allclose([a["ctr"] for a in body["ads"]], [p[pos[a["ad_id"]]] for a in body["ads"]],
                                   rtol=1e-5, atol=1e-6)
        assert {a["source"] for a in body["ads"]} == {"generated"}
        # the list form gives the same answer
        r2 = client.post(f"{url}/rank", json={"features": x.tolist(), "k": 7})
        assert r2.json()["ads"] == body["ads"]


def test_default_k_and_batch(served, client):
    url, gen, _, _ = served
    X = np.random.default_rng(2).normal(size=(5, D))
    r = client.post(f"{url}/rank", json={"features": X[0].tolist()})
    assert len(r.json()["ads"]) == 10
    users = [X[0].tolist(), *[dict(zip(NAMES, x.tolist(), strict=True)) for x in X[1:]]]
    r = client.post(f"{url}/rank", json={"users": users, "k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5
    for x, res in zip(X, results, strict=True):
        assert [a["ad_id"] for a in res["ads"]] == expected_top(gen, x, 3)


def test_health(served, client):
    url, _, scorer, _ = served
    h = client.get(f"{url}/health").json()
    assert h["ok"] is True and h["n_ads"] == N_ADS and h["features"] == NAMES
    assert h["version"] == scorer.snapshot.version and h["loaded_at"]
    assert h["sources"] == {"generated": N_ADS, "trained": 0}


# -- bad requests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, message", [
    ({"features": {**{n: 0.0 for n in NAMES}, "height": 1.0}}, 422, "unknown features ['height']"),
    ({"features": {n: 0.0 for n in NAMES[1:]}}, 422, "missing features ['f0']"),
    ({"features": [0.0] * (D - 1)}, 422, f"expected {D} feature values"),
    ({"features": [0.0] * (D + 1)}, 422, f"expected {D} feature values"),
    ({"features": [0.0] * D, "k": 0}, 422, "between 1 and 100"),
    ({"features": [0.0] * D, "k": 101}, 422, "between 1 and 100"),
    ({"features": [0.0] * D, "k": "5"}, 422, "'k' must be an integer"),
    ({"features": [0.0] * D, "k": 2.5}, 422, "'k' must be an integer"),
    ({"features": ["a"] * D}, 422, "must be numbers"),
    ({"features": "0,0,0"}, 422, "object {name: value} or a list"),
    ({"k": 3}, 422, "exactly one of 'features'"),
    ({"features": [0.0] * D, "users": [[0.0] * D]}, 422, "exactly one of 'features'"),
    ({"features": [0.0] * D, "extra": 1}, 422, "unknown fields ['extra']"),
    ({"users": []}, 422, "non-empty list"),
    ({"users": [[0.0] * D, [0.0] * 3]}, 422, "users[1]: expected"),
    ({"users": [[0.0] * D] * (MAX_BATCH + 1)}, 422, f"at most {MAX_BATCH} users"),
    ([1, 2, 3], 422, "must be a JSON object"),
])
def test_bad_requests(served, client, body, status, message):
    url = served[0]
    r = client.post(f"{url}/rank", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_non_finite_values(served, client):
    url = served[0]
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = "{\"features\": [" + ", ".join(["0.0"] * (D - 1) + [literal]) + "]}"
        r = client.post(f"{url}/rank", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (literal, r.text)
        assert "non-finite" in r.json()["detail"]


def test_malformed_and_oversized_bodies(served, client):
    url = served[0]
    r = client.post(f"{url}/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    big = b"{\"features\": [" + b"0.0, " * (MAX_BODY_BYTES // 5) + b"0.0]}"
    r = client.post(f"{url}/rank", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # no Content-Length: the stream is counted as it arrives
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    r = client.post(f"{url}/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get(f"{url}/rank").status_code == 405
    assert client.get(f"{url}/nothing").status_code == 404


# -- flags and hand-over --------------------------------------------------------------------------
def test_flags_and_handover_visible(tmp_path, client):
    gen = table(0)
    gen.flags = {"ad3": ["f0"], "ad5": ["f1"]}
    gen.save(tmp_path / "gen")
    # trained ad4 gets a huge intercept so it tops every ranking; trained file has columns reversed
    trained = WeightTable("lr_warm", ["ad4"], NAMES[::-1], np.zeros((1, D)), [5.0])
    trained.save(tmp_path / "trained")
    scorer = Scorer.from_dirs(tmp_path / "gen", tmp_path / "trained", flag_threshold=1.0)
    with running_server(create_app(scorer)) as url:
        h = client.get(f"{url}/health").json()
        assert h["sources"] == {"generated": N_ADS - 1, "trained": 1} and h["flagged_ads"] == 2
        x = np.zeros(D)
        ads = client.post(f"{url}/rank", json={"features": x.tolist(), "k": N_ADS}).json()["ads"]
        assert ads[0]["ad_id"] == "ad4" and ads[0]["source"] == "trained"
        assert all(a["source"] == "generated" for a in ads[1:])
        assert len(ads) == N_ADS and {"ad3", "ad5"} <= {a["ad_id"] for a in ads}
        x[0] = -1.5  # strong f0 (low counts too): ad3 dropped, ad5 kept
        ads = client.post(f"{url}/rank", json={"features": x.tolist(), "k": N_ADS}).json()["ads"]
        ids = [a["ad_id"] for a in ads]
        assert "ad3" not in ids and "ad5" in ids and len(ids) == N_ADS - 1
        x[1] = 1.0  # strong f1 too: ad5 dropped as well
        ads = client.post(f"{url}/rank", json={"features": x.tolist(), "k": N_ADS}).json()["ads"]
        ids = [a["ad_id"] for a in ads]
        assert "ad3" not in ids and "ad5" not in ids and len(ids) == N_ADS - 2


# -- reload -------------------------------------------------------------------------------------
def test_reload_under_concurrent_requests(served):
    url, gen, _, tmp_path = served
    other = table(1)
    X = np.random.default_rng(3).normal(size=(6, D))
    expected = {}
    for t in (gen, other):
        t.save(tmp_path / "probe")
        v = Scorer.from_dirs(tmp_path / "probe").snapshot.version
        expected[v] = [expected_top(t, x, 5) for x in X]
    problems: list[str] = []
    counts = {"ok": 0}
    seen: set[str] = set()
    stop = threading.Event()
    lock = threading.Lock()

    def hammer(worker: int):
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            i = worker
            while not stop.is_set():
                u = i % len(X)
                i += 1
                try:
                    r = c.post(f"{url}/rank", json={"features": X[u].tolist(), "k": 5})
                except httpx.HTTPError as exc:
                    problems.append(f"transport: {exc!r}")
                    continue
                if r.status_code != 200:
                    problems.append(f"{r.status_code}: {r.text}")
                    continue
                body = r.json()
                # the whole answer comes from one snapshot: it matches that version's ranking exactly
                if [a["ad_id"] for a in body["ads"]] != expected[body["model_version"]][u]:
                    problems.append(f"inconsistent answer for version {body['model_version']}")
                with lock:
                    counts["ok"] += 1
                    seen.add(body["model_version"])

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(3)]
    for th in threads:
        th.start()
    versions = set()
    try:
        with httpx.Client(trust_env=False, timeout=10.0) as c:
            for i in range(6):
                (other if i % 2 == 0 else gen).save(tmp_path / "gen")
                r = c.post(f"{url}/reload")
                assert r.status_code == 200, r.text
                versions.add(r.json()["version"])
                assert c.get(f"{url}/health").json()["version"] == r.json()["version"]
                target = counts["ok"] + 5  # let requests run on this version before the next swap
                deadline = time.monotonic() + 10
                while counts["ok"] < target and time.monotonic() < deadline and not problems:
                    time.sleep(0.005)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not problems, problems[:5]
    assert counts["ok"] > 0
    assert versions == set(expected) and seen == set(expected)


def test_failed_reload_keeps_serving(served, client):
    url, _, scorer, tmp_path = served
    before = scorer.snapshot.version
    (tmp_path / "gen" / "weights.npz").write_bytes(b"garbage")
    r = client.post(f"{url}/reload")
    assert r.status_code == 500 and f"still serving version {before}" in r.json()["detail"]
    r = client.post(f"{url}/rank", json={"features": [0.0] * D, "k": 3})
    assert r.status_code == 200 and r.json()["model_version"] == before


# -- command line ---------------------------------------------------------------------------------
def test_host_warning():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert host_warning(host) is None
    assert "not loopback" in host_warning("0.0.0.0")
    assert "not loopback" in host_warning("example.org")


def test_cli_registers_serve():
    from llmhyper.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--weights", "w", "--trained", "t", "--port", "9000"])
    got = (args.weights, args.trained, args.host, args.port, args.flag_threshold)
    assert got == ("w", "t", "127.0.0.1", 9000, 1.0)
