"""`llmhyper serve`: a real uvicorn server on a free loopback port, driven with httpx."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from llmhyper.data.scaling import feature_scaling, stamp_scaling
from llmhyper.errors import LLMHyperError
from llmhyper.serve.app import MAX_BATCH, MAX_BODY_BYTES, create_app, host_warning, running_server
from llmhyper.serve.scorer import Scorer
from llmhyper.serve.workers import ArtifactWatcher, check_workers
from llmhyper.weights import WeightTable

ROOT = Path(__file__).resolve().parent.parent

D, N_ADS = 8, 30
NAMES = [f"f{j}" for j in range(D)]
Z = {"zscored": True}  # `table` artifacts carry no feature scaling: their users' features are z-scored


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
        r = client.post(f"{url}/rank", json={**Z, "features": dict(zip(NAMES, x.tolist())), "k": 7})
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
        r2 = client.post(f"{url}/rank", json={**Z, "features": x.tolist(), "k": 7})
        assert r2.json()["ads"] == body["ads"]


def test_default_k_and_batch(served, client):
    url, gen, _, _ = served
    X = np.random.default_rng(2).normal(size=(5, D))
    r = client.post(f"{url}/rank", json={**Z, "features": X[0].tolist()})
    assert len(r.json()["ads"]) == 10
    users = [X[0].tolist(), *[dict(zip(NAMES, x.tolist(), strict=True)) for x in X[1:]]]
    r = client.post(f"{url}/rank", json={**Z, "users": users, "k": 3})
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
    r = client.post(f"{url}/rank", json={**Z, **body} if isinstance(body, dict) else body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_non_finite_values(served, client):
    url = served[0]
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = "{\"zscored\": true, \"features\": [" + ", ".join(["0.0"] * (D - 1) + [literal]) + "]}"
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
        ads = client.post(f"{url}/rank", json={**Z, "features": x.tolist(), "k": N_ADS}).json()["ads"]
        assert ads[0]["ad_id"] == "ad4" and ads[0]["source"] == "trained"
        assert all(a["source"] == "generated" for a in ads[1:])
        assert len(ads) == N_ADS and {"ad3", "ad5"} <= {a["ad_id"] for a in ads}
        x[0] = -1.5  # strong f0 (low counts too): ad3 dropped, ad5 kept
        ads = client.post(f"{url}/rank", json={**Z, "features": x.tolist(), "k": N_ADS}).json()["ads"]
        ids = [a["ad_id"] for a in ads]
        assert "ad3" not in ids and "ad5" in ids and len(ids) == N_ADS - 1
        x[1] = 1.0  # strong f1 too: ad5 dropped as well
        ads = client.post(f"{url}/rank", json={**Z, "features": x.tolist(), "k": N_ADS}).json()["ads"]
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
                    r = c.post(f"{url}/rank", json={**Z, "features": X[u].tolist(), "k": 5})
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
    r = client.post(f"{url}/rank", json={**Z, "features": [0.0] * D, "k": 3})
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


# -- raw features: the artifact carries the train users' scaling (issue 16) ---------------------------
MEAN = np.linspace(-3.0, 40.0, D)  # e.g. an age column next to shares
STD = np.linspace(0.2, 12.0, D)


def scaled_table(seed: int = 0) -> WeightTable:
    return stamp_scaling(table(seed), feature_scaling(NAMES, MEAN, STD))


def test_raw_and_zscored_requests_give_the_same_ranking(tmp_path, client):
    gen = scaled_table()
    gen.save(tmp_path / "gen")
    scorer = Scorer.from_dirs(tmp_path / "gen")
    raw = MEAN + STD * np.random.default_rng(4).normal(size=(6, D))  # raw values, as a client has them
    z = (raw - MEAN) / STD
    with running_server(create_app(scorer)) as url:
        assert client.get(f"{url}/health").json()["raw_features"] is True
        for r_row, z_row in zip(raw, z, strict=True):
            a = client.post(f"{url}/rank", json={"features": dict(zip(NAMES, r_row.tolist())), "k": 10})
            b = client.post(f"{url}/rank", json={"features": z_row.tolist(), "k": 10, "zscored": True})
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            assert [x["ad_id"] for x in a.json()["ads"]] == [x["ad_id"] for x in b.json()["ads"]]
            assert [x["ad_id"] for x in a.json()["ads"]] == expected_top(gen, z_row, 10)
            np.testing.assert_allclose([x["ctr"] for x in a.json()["ads"]], [x["ctr"] for x in b.json()["ads"]],
                                       rtol=1e-5, atol=1e-6)
        a = client.post(f"{url}/rank", json={"users": raw.tolist(), "k": 5}).json()["results"]
        b = client.post(f"{url}/rank", json={"users": z.tolist(), "k": 5, "zscored": True}).json()["results"]
        assert [[x["ad_id"] for x in r["ads"]] for r in a] == [[x["ad_id"] for x in r["ads"]] for r in b]
        # raw values sent as if z-scored rank differently: the flag matters
        c = client.post(f"{url}/rank", json={"users": raw.tolist(), "k": 5, "zscored": True}).json()["results"]
        assert [[x["ad_id"] for x in r["ads"]] for r in c] != [[x["ad_id"] for x in r["ads"]] for r in b]


def test_raw_features_need_a_scaling(served, client):
    url = served[0]
    assert client.get(f"{url}/health").json()["raw_features"] is False
    r = client.post(f"{url}/rank", json={"features": [0.0] * D, "k": 3})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "no feature scaling" in detail and '"zscored": true' in detail and "\n" not in detail
    r = client.post(f"{url}/rank", json={"features": [0.0] * D, "zscored": "yes"})
    assert r.status_code == 422 and "'zscored' must be true or false" in r.json()["detail"]


# -- hostile bodies and damaged artifacts answer in one line (issue 14, item 11) ---------------------
@pytest.mark.parametrize("raw, status, message", [
    (b"[" * 2000 + b"]" * 2000, 400, "nested too deeply"),
    (b'{"features": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    (b'{"zscored": true, "features": [' + b"7" * 401 + b"," + b"0," * (D - 2) + b"0]}", 422, "too large"),
    (b'{"zscored": true, "features": {"f0": -' + b"9" * 401 + b", "
     + b", ".join(f'"f{j}": 0'.encode() for j in range(1, D)) + b"}}", 422, "too large"),
    (b'{"zscored": true, "features": [1e300' + b", 0" * (D - 1) + b"]}", 422, "float32 range"),
    (b'{"zscored": true, "k": ' + b"5" * 401 + b', "features": [' + b"0," * (D - 1) + b"0]}", 422,
     "a number of 401 digits"),
])
def test_hostile_bodies_get_a_one_line_answer(served, client, raw, status, message):
    url = served[0]
    r = client.post(f"{url}/rank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail and len(detail) < 400


def test_raw_value_beyond_float32_after_scaling(tmp_path, client):
    scaled_table().save(tmp_path / "gen")
    with running_server(create_app(Scorer.from_dirs(tmp_path / "gen"))) as url:
        r = client.post(f"{url}/rank", json={"features": [1e300] + [0.0] * (D - 1)})
        assert r.status_code == 422 and "after z-scoring" in r.json()["detail"]


def _damage(kind: str, d) -> None:
    npz, js = d / "weights.npz", d / "weights.json"
    if kind == "garbage npz":
        npz.write_bytes(b"garbage")
    elif kind == "truncated npz":
        npz.write_bytes(npz.read_bytes()[:100])
    elif kind == "empty npz":
        npz.write_bytes(b"")
    elif kind == "json list":
        js.write_text("[1, 2, 3]")
    elif kind == "json cut":
        js.write_text(js.read_text()[:20])
    elif kind == "flags list":
        info = json.loads(js.read_text())
        js.write_text(json.dumps({**info, "flags": ["ad1"]}))
    elif kind == "meta list":
        info = json.loads(js.read_text())
        js.write_text(json.dumps({**info, "meta": [1]}))
    elif kind == "bad scaling":
        info = json.loads(js.read_text())
        js.write_text(json.dumps({**info, "meta": {"feature_scaling": {"mean": {}, "std": {}}}}))
    elif kind == "huge weights":
        t = table(5)
        t.theta[0, 0] = 1e300
        t.save(d)
    elif kind == "missing json":
        js.unlink()
    elif kind == "other features":
        WeightTable("llm_hyper", ["ad0"], ["x"], np.zeros((1, 1)), [0.0]).save(d)


@pytest.mark.parametrize("kind", ["garbage npz", "truncated npz", "empty npz", "json list", "json cut",
                                  "flags list", "meta list", "bad scaling", "huge weights", "missing json",
                                  "other features"])
def test_reload_of_a_damaged_artifact_answers_in_one_line(served, client, kind):
    url, _, scorer, tmp_path = served
    before = scorer.snapshot.version
    _damage(kind, tmp_path / "gen")
    r = client.post(f"{url}/reload")
    assert r.status_code == 500, r.text
    detail = r.json()["detail"]
    assert detail.startswith("reload failed: ") and f"still serving version {before}" in detail
    assert "\n" not in detail and "Traceback" not in detail
    r = client.post(f"{url}/rank", json={**Z, "features": [0.0] * D, "k": 3})
    assert r.status_code == 200 and r.json()["model_version"] == before


def test_an_unexpected_error_is_a_one_line_500(client):
    class Broken:
        reloads = 0

        @property
        def snapshot(self):
            raise RuntimeError("something\nbroke")

    with running_server(create_app(Broken())) as url:
        r = client.post(f"{url}/rank", json={"features": [0.0] * D})
        assert r.status_code == 500 and r.json()["detail"] == "internal error (RuntimeError: something broke)"


# -- several workers, one artifact (issue 15, item 4) -------------------------------------------------
def test_watcher_reloads_on_change_and_keeps_serving_a_damaged_artifact(tmp_path):
    table(0).save(tmp_path / "gen")
    scorer = Scorer.from_dirs(tmp_path / "gen")
    logs: list[str] = []
    w = ArtifactWatcher(scorer, 0.05, log=logs.append)
    v0 = scorer.snapshot.version
    assert w.check() is False  # nothing changed
    table(1).save(tmp_path / "gen")
    assert w.check() is True and scorer.snapshot.version != v0 and w.reloads == 1
    v1 = scorer.snapshot.version
    (tmp_path / "gen" / "weights.npz").write_bytes(b"garbage")
    assert w.check() is False and scorer.snapshot.version == v1
    assert "cannot read" in w.last_error and "still serving version" in logs[-1]
    assert w.check() is False and len(logs) == 2  # said once, not at every poll
    table(0).save(tmp_path / "gen")
    assert w.check() is True and scorer.snapshot.version == v0 and w.last_error is None
    assert w.health()["reloads"] == 2


def test_workers_with_feedback_are_refused():
    with pytest.raises(LLMHyperError, match="durable event log has one writer"):
        check_workers(2, 2.0, feedback=True)
    with pytest.raises(LLMHyperError, match="--watch-seconds"):
        check_workers(1, 1.0, feedback=True)
    check_workers(4, 2.0, feedback=False)
    check_workers(1, 0.0, feedback=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(url: str, path: str, body=None, timeout: float = 2.0):
    """One request on a fresh connection, so the kernel may hand it to any worker."""
    with httpx.Client(trust_env=False, timeout=timeout) as c:
        return c.post(f"{url}{path}", json=body) if body is not None else c.get(f"{url}{path}")


def test_two_workers_serve_one_snapshot_and_both_pick_up_new_weights(tmp_path):
    scaled_table(0).save(tmp_path / "gen")
    port = _free_port()
    launch = ("import argparse, sys; from llmhyper.cli import serve; p = argparse.ArgumentParser(); "
              "serve.add_parser(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", launch, "serve", "--weights", str(tmp_path / "gen"),
                             "--port", str(port), "--workers", "2", "--watch-seconds", "0.2",
                             "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    x = (MEAN + STD * np.random.default_rng(9).normal(size=D)).tolist()
    try:
        answers: dict[int, dict] = {}  # worker pid -> its last /health
        deadline = time.monotonic() + 120
        while len(answers) < 2 and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                h = _poll(url, "/health").json()
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            answers[h["pid"]] = h
        assert len(answers) == 2, f"saw workers {sorted(answers)}"
        v0 = Scorer.from_dirs(tmp_path / "gen").snapshot.version
        assert {h["version"] for h in answers.values()} == {v0}
        rankings = {}
        for _ in range(200):
            r = _poll(url, "/rank", {"features": x, "k": 10})
            assert r.status_code == 200, r.text
            rankings.setdefault(r.json()["model_version"], set()).add(tuple(a["ad_id"] for a in r.json()["ads"]))
            if len(rankings[v0]) > 1:
                break
        assert list(rankings) == [v0] and len(rankings[v0]) == 1  # every answer the same ranking
        new = scaled_table(1)
        new.save(tmp_path / "gen")  # atomic renames, as every artifact writer does
        v1 = Scorer.from_dirs(tmp_path / "gen").snapshot.version
        t0 = time.monotonic()
        latest = {pid: h["version"] for pid, h in answers.items()}
        while time.monotonic() - t0 < 30 and set(latest.values()) != {v1}:
            h = _poll(url, "/health").json()
            latest[h["pid"]] = h["version"]
        took = time.monotonic() - t0
        assert set(latest.values()) == {v1} and len(latest) == 2, latest
        assert took < 30
        print(f"new weights served by both workers {took:.2f} s after the save")
        z = ((np.array(x) - MEAN) / STD)
        r = _poll(url, "/rank", {"features": x, "k": 10}).json()
        assert r["model_version"] == v1 and [a["ad_id"] for a in r["ads"]] == expected_top(new, z, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# -- end to end: a data folder -> generate -> serve raw features ---------------------------------------
def test_generated_artifact_carries_the_scaling_and_serves_raw_features(tmp_path, monkeypatch, client):
    from llmhyper.data import DataSettings
    from llmhyper.data.contract import load_folder, read_user_features
    from llmhyper.data.tables import find_table
    from llmhyper.hyper.generate import GenerateSettings, run_generate
    from llmhyper.retrieval import encoders
    from tests.fakes import HashEncoder
    from tests.scripted_lm import Handle, ScriptedEngine, scripted_lm

    example = ROOT / "data" / "example"
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(encoders._SHARED, "test-hash", HashEncoder())
    engine = ScriptedEngine(weight_policy=lambda f, u: 0.8 if f.startswith("interest") else -0.3)
    settings = GenerateSettings(out=tmp_path / "run", data=DataSettings(folder=example), encoder="test-hash",
                                batch_size=4, judge=False, limit=3)
    run_generate(settings, lm_builder=lambda lm: Handle(scripted_lm(engine)), progress=False)
    data = load_folder(example)
    art = WeightTable.load(tmp_path / "run" / "weights")
    assert art.meta["feature_scaling"] == data.scaling  # the train users' means and stds, every feature
    _, X_raw = read_user_features(find_table(example, "users"), data.features)
    with running_server(create_app(Scorer.from_dirs(tmp_path / "run" / "weights"))) as url:
        for i in (0, 7, 42):
            raw = dict(zip(data.feature_names, X_raw[i].tolist(), strict=True))  # straight from users.csv
            a = client.post(f"{url}/rank", json={"features": raw, "k": 3}).json()
            b = client.post(f"{url}/rank", json={"features": data.X[i].tolist(), "k": 3, "zscored": True}).json()
            assert [x["ad_id"] for x in a["ads"]] == [x["ad_id"] for x in b["ads"]] == \
                expected_top(art, data.X[i], 3)


def test_evaluate_save_stamps_the_scaling_into_every_baseline(tmp_path, monkeypatch, capsys):
    import llmhyper.retrieval.encoders as enc
    from llmhyper.cli.main import main
    from llmhyper.data.contract import load_folder
    from tests.fakes import HashEncoder

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(enc, "get_encoder", lambda spec="x", **kw: HashEncoder())
    example = ROOT / "data" / "example"
    assert main(["evaluate", "--data", str(example), "--bootstrap", "20", "--save", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    scaling = load_folder(example).scaling
    saved = sorted(p.parent.name for p in (tmp_path / "w").glob("*/weights.json"))
    assert {"retired", "knn_cal", "lr_cold"} <= set(saved)
    for name in saved:
        assert WeightTable.load(tmp_path / "w" / name).meta["feature_scaling"] == scaling, name
