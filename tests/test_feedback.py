"""POST /feedback: events are logged durably before the answer, refitted in the background, replayed on
restart; a real uvicorn server killed with SIGKILL mid-stream applies every acknowledged event exactly
once."""

from __future__ import annotations

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

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.serve.app import create_app, running_server
from llmhyper.serve.feedback import FeedbackService, FeedbackSettings
from llmhyper.serve.feedback_log import read_log
from llmhyper.serve.scorer import Scorer
from llmhyper.weights import WeightTable

ROOT = Path(__file__).resolve().parent.parent
D, N_ADS = 6, 12
NAMES = [f"f{j}" for j in range(D)]
IDS = [f"ad{i}" for i in range(N_ADS)]


def table(seed: int = 0) -> WeightTable:
    rng = np.random.default_rng(seed)
    return WeightTable("llm_hyper", IDS, NAMES, rng.normal(0, 0.5, (N_ADS, D)), rng.normal(-1.5, 0.3, N_ADS))


def events(n: int, seed: int = 1, prefix: str = "e") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "ad": IDS[i % 5],
            "features": rng.normal(size=D).round(4).tolist(),
            "clicked": int(rng.random() < 0.3),
            "event_id": f"{prefix}{i}",
            "zscored": True,  # the test artifacts carry no feature scaling
        }
        for i in range(n)
    ]


@pytest.fixture
def artifact(tmp_path):
    table().save(tmp_path / "gen")
    return tmp_path


def open_service(folder: Path, **kw) -> tuple[Scorer, FeedbackService]:
    scorer = Scorer.from_dirs(folder / "gen")
    settings = FeedbackSettings(
        log=folder / "feedback.jsonl", **{"refit_every": 1000, "refit_seconds": 3600, **kw}
    )
    return scorer, FeedbackService.open(scorer.snapshot, settings, publish=scorer.swap)


# -- the service in-process -------------------------------------------------------------------------
def test_events_are_logged_refitted_and_replayed(artifact):
    scorer, fb = open_service(artifact)
    before = scorer.snapshot
    evs = events(60)
    for i in range(0, 60, 20):
        assert fb.ingest(fb.parse({"events": evs[i : i + 20]}))["accepted"] == 20
    assert fb.health()["pending"] == 60 and scorer.snapshot is before  # logged, not applied yet
    assert fb.refit() == 60
    h = fb.health()
    assert h["applied_events"] == 60 and h["pending"] == 0 and h["touched_ads"] == 5
    assert {a: s["impressions"] for a, s in h["ads"].items()} == {f"ad{i}": 12 for i in range(5)}
    assert all(s["moved_l2"] > 0 for s in h["ads"].values())
    after = scorer.snapshot
    assert before.version == f"{fb.base.version}+0" and after.version == f"{fb.base.version}+60"
    moved = np.abs(after.theta - before.theta).max(axis=0)
    assert (moved[:5] > 0).all() and (moved[5:] == 0).all()  # only the touched ads changed
    fb.ingest(fb.parse({"events": events(10, seed=2, prefix="late")}))  # logged, never refitted
    # a restart replays the refitted batch exactly and leaves the tail pending for the worker
    scorer2, fb2 = open_service(artifact)
    assert scorer2.snapshot.version == after.version
    np.testing.assert_array_equal(scorer2.snapshot.theta, after.theta)
    np.testing.assert_array_equal(scorer2.snapshot.intercept, after.intercept)
    assert fb2.health()["pending"] == 10 and fb2.health()["applied_events"] == 60
    assert fb2.refit() == 10 and fb2.health()["applied_events"] == 70


def test_event_ids_make_retries_idempotent(artifact):
    _, fb = open_service(artifact)
    evs = events(10)
    assert fb.ingest(fb.parse({"events": evs[:6]})) == {"accepted": 6, "duplicates": 0, "seq": [1, 6]}
    assert fb.ingest(fb.parse({"events": evs})) == {"accepted": 4, "duplicates": 6, "seq": [7, 10]}
    assert fb.ingest(fb.parse({"events": [evs[0], evs[0]]}))["duplicates"] == 2
    no_id = {k: v for k, v in evs[0].items() if k != "event_id"}
    assert fb.ingest(fb.parse(no_id))["accepted"] == 1  # without an id every post is a new event
    _, fb2 = open_service(artifact)  # the ids survive a restart
    assert fb2.ingest(fb2.parse({"events": evs}))["duplicates"] == 10
    _, logged, _ = read_log(artifact / "feedback.jsonl")
    assert [e.seq for e in logged] == list(range(1, 12))


def test_damaged_logs(artifact):
    _, fb = open_service(artifact)
    fb.ingest(fb.parse({"events": events(5)}))
    log = artifact / "feedback.jsonl"
    lines = log.read_text().splitlines()
    # a line cut short by a kill at the end was never acknowledged: dropped, and the next event reuses its seq
    log.write_text("\n".join(lines) + "\n" + lines[-1][:40])
    _, fb2 = open_service(artifact)
    assert fb2.ingest(fb2.parse(events(1, seed=9, prefix="x")[0]))["seq"] == [6, 6]
    assert [e.seq for e in read_log(log)[1]] == [1, 2, 3, 4, 5, 6]
    # a changed byte inside the log loses an acknowledged event: refuse to start
    lines = log.read_text().splitlines()
    lines[2] = (
        lines[2].replace('"y": 0', '"y": 1') if '"y": 0' in lines[2] else lines[2].replace('"y": 1', '"y": 0')
    )
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="fails its checksum"):
        open_service(artifact)
    del lines[2]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="lost records"):
        open_service(artifact)


def test_a_log_belongs_to_its_prior(artifact):
    open_service(artifact)
    with pytest.raises(LLMHyperError, match="precision"):
        open_service(artifact, precision=2.0)
    with pytest.raises(LLMHyperError, match="refit-solver"):
        open_service(artifact, solver="newton")
    table(seed=5).save(artifact / "gen")
    with pytest.raises(LLMHyperError, match="belongs to the artifacts of version"):
        open_service(artifact)


def test_known_users(artifact):
    users = artifact / "users.csv"
    users.write_text("user," + ",".join(NAMES) + "\nu1," + ",".join(["0.5"] * D) + "\n")
    _, fb = open_service(artifact, users=users)
    [ev] = fb.parse({"ad": "ad1", "user": "u1", "clicked": True})
    assert ev["x"] == [0.5] * D and ev["y"] == 1
    with pytest.raises(LLMHyperError, match="unknown user 'u2'"):
        fb.parse({"ad": "ad1", "user": "u2", "clicked": 0})


# -- over HTTP ----------------------------------------------------------------------------------------
@pytest.fixture
def served(artifact):
    scorer, fb = open_service(artifact, refit_every=25, refit_seconds=0.2)
    fb.start()
    with running_server(create_app(scorer, fb)) as url, httpx.Client(trust_env=False, timeout=10) as client:
        yield url, client, scorer, fb
    fb.stop()


def wait_applied(client, url, n, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = client.get(f"{url}/health").json()["feedback"]
        if h["applied_events"] >= n and h["pending"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"events not applied in {timeout} s: {h}")


def test_feedback_over_http(served):
    url, client, scorer, _ = served
    v0 = scorer.snapshot.version
    r = client.post(f"{url}/feedback", json={"events": events(30)})
    assert r.status_code == 202 and r.json()["accepted"] == 30 and r.json()["seq"] == [1, 30]
    r = client.post(f"{url}/feedback", json=events(31)[30])
    assert r.status_code == 202 and r.json()["seq"] == [31, 31]
    h = wait_applied(client, url, 31)
    assert h["ads"]["ad0"]["impressions"] == 7 and h["refits"] >= 1
    body = client.post(f"{url}/rank", json={"features": [0.0] * D, "k": 3, "zscored": True}).json()
    assert body["model_version"] == scorer.snapshot.version != v0
    assert client.post(f"{url}/reload").status_code == 409


@pytest.mark.parametrize(
    "body, message",
    [
        ({"ad": "nope", "clicked": 1, "features": [0.0] * D}, "unknown ad 'nope'"),
        ({"ad": "ad1", "clicked": 2, "features": [0.0] * D}, "'clicked' must be 0, 1"),
        ({"ad": "ad1", "clicked": 0.5, "features": [0.0] * D}, "'clicked' must be 0, 1"),
        ({"ad": "ad1", "clicked": 1}, "exactly one of 'features'"),
        ({"ad": "ad1", "clicked": 1, "features": [0.0] * (D - 1), "zscored": True},
         f"expected {D} feature values"),
        ({"ad": "ad1", "clicked": 1, "features": [0.0] * D}, "carries no feature scaling"),
        ({"ad": "ad1", "clicked": 1, "features": [0.0] * D, "zscored": "yes"}, "'zscored' must be true or false"),
        ({"ad": "ad1", "clicked": 1, "user": "u1"}, "knows no users"),
        ({"ad": "ad1", "clicked": 1, "features": [0.0] * D, "extra": 1}, "unknown fields ['extra']"),
        ({"ad": "ad1", "clicked": 1, "features": [0.0] * D, "event_id": ""}, "'event_id' must be a string"),
        ({"events": []}, "non-empty list"),
        ({"events": [{"ad": "ad1", "clicked": 1, "features": [0.0] * D}, {"ad": "ad1"}], "zscored": True},
         "events[1]:"),
        ({"events": [{"ad": "ad1", "clicked": 1, "features": [0.0] * D}] * 257}, "at most 256 events"),
        ([1, 2], "an event must be an object"),
    ],
)
def test_bad_feedback_is_422_and_logs_nothing(served, body, message):
    url, client, _, fb = served
    r = client.post(f"{url}/feedback", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert fb.health()["logged_events"] == 0  # a request is taken whole or not at all
    r = client.post(f"{url}/feedback", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_feedback_off_is_404(artifact):
    scorer = Scorer.from_dirs(artifact / "gen")
    with running_server(create_app(scorer)) as url, httpx.Client(trust_env=False) as client:
        r = client.post(f"{url}/feedback", json=events(1)[0])
        assert r.status_code == 404 and "--feedback-log" in r.json()["detail"]
        assert "feedback" not in client.get(f"{url}/health").json()


def test_thompson_ranks_by_posterior_draws(artifact):
    scorer, fb = open_service(artifact, thompson=True, precision=0.5)
    with running_server(create_app(scorer, fb)) as url, httpx.Client(trust_env=False) as client:
        x = {"features": [0.3] * D, "k": N_ADS, "zscored": True}
        orders = {
            tuple(a["ad_id"] for a in client.post(f"{url}/rank", json=x).json()["ads"]) for _ in range(20)
        }
        assert len(orders) > 1  # a wide prior: draws differ
    plain = Scorer.from_dirs(artifact / "gen")
    with running_server(create_app(plain)) as url, httpx.Client(trust_env=False) as client:
        x = {"features": [0.3] * D, "k": N_ADS, "zscored": True}
        orders = {
            tuple(a["ad_id"] for a in client.post(f"{url}/rank", json=x).json()["ads"]) for _ in range(5)
        }
        assert len(orders) == 1  # off by default: the mean ranks


# -- kill -9 against a real server process --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # only the serve command's parser: other commands being reworked cannot stop this test's server
    launch = (
        "import argparse, sys; from llmhyper.cli import serve; p = argparse.ArgumentParser(); "
        "serve.add_parser(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launch,
            "serve",
            "--weights",
            str(folder / "gen"),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--feedback-log",
            str(folder / "feedback.jsonl"),
            "--refit-every",
            "20",
            "--refit-seconds",
            "0.2",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    with httpx.Client(trust_env=False, timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if c.get(f"{url}/health").status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not come up")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_kill_9_mid_stream_applies_every_acknowledged_event_exactly_once(artifact):
    evs = events(400, seed=7)
    acked: list[str] = []
    sent: list[dict] = []
    proc, url = _start(artifact)
    try:
        stop = threading.Event()

        def stream():
            with httpx.Client(trust_env=False, timeout=5) as c:
                for i in range(0, len(evs), 4):
                    if stop.is_set():
                        return
                    chunk = evs[i : i + 4]
                    sent.extend(chunk)
                    try:
                        r = c.post(f"{url}/feedback", json={"events": chunk})
                    except httpx.HTTPError:
                        return  # the server died under us: this chunk is unacknowledged
                    if r.status_code == 202:
                        acked.extend(e["event_id"] for e in chunk)

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 120 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        _kill(proc)  # mid-stream, with events pending and a refit maybe under way
        stop.set()
        t.join(10)
        assert len(acked) >= 120

        proc, url = _start(artifact)
        with httpx.Client(trust_env=False, timeout=10) as c:
            _, logged, _ = read_log(artifact / "feedback.jsonl")
            ids = [e.event_id for e in logged]
            assert len(ids) == len(set(ids))  # nothing logged twice
            assert set(acked) <= set(ids)  # every acknowledged event survived the kill
            h = wait_applied(c, url, len(ids))
            assert h["applied_events"] == len(ids) == h["logged_events"]
            # the client retries everything it sent (acknowledged or not): the log takes only what it lacks
            r = c.post(f"{url}/feedback", json={"events": sent[:200]})
            r2 = c.post(f"{url}/feedback", json={"events": sent[200:]}) if len(sent) > 200 else None
            taken = r.json()["accepted"] + (r2.json()["accepted"] if r2 else 0)
            assert taken == len(sent) - len(ids)
            h = wait_applied(c, url, len(sent))
            want = {}
            for e in sent:
                want[e["ad"]] = want.get(e["ad"], 0) + 1
            assert h["applied_events"] == len(sent) == h["logged_events"]  # each event counted exactly once
            assert {a: s["impressions"] for a, s in h["ads"].items()} == want
            probe = {"users": [[0.0] * D, [1.0] * D, [-0.5] * D], "k": N_ADS, "zscored": True}
            before = c.post(f"{url}/rank", json=probe).json()
        _kill(proc)  # all applied: a restart must serve exactly these weights
        proc, url = _start(artifact)
        with httpx.Client(trust_env=False, timeout=10) as c:
            assert c.post(f"{url}/rank", json=probe).json() == before
            assert c.get(f"{url}/health").json()["feedback"]["applied_events"] == len(sent)
    finally:
        if proc.poll() is None:
            _kill(proc)
