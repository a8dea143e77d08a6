"""`generate --workers N` and `generate --ray`: many ads in flight give the same records as one at a time;
a kill during a multi-worker run resumes with nothing lost or redone; transient LM errors are retried and
recorded; the embedded model gets one server per worker; a real HTTP server (the stub) is called in
parallel; Ray in local mode runs the same work end to end, and a killed Ray driver resumes."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import replace

import pytest
from dspy.utils.exceptions import LMRateLimitError

from benchmarks.stub_lm_server import StubLMServer
from llmhyper.cli import generate as generate_cli
from llmhyper.ctr.prepare import prepare
from llmhyper.data import DataSettings, SyntheticSettings
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.generate import GenerateSettings, generate, run_generate
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.hyper.workers import AdRetry
from llmhyper.llm.settings import LMSettings
from llmhyper.retrieval import encoders
from llmhyper.runs import RunDir
from llmhyper.weights import WeightTable
from tests.fakes import HashEncoder
from tests.scripted_lm import Handle, ScriptedEngine, scripted_lm, section

PER_AD = 2  # weight calls per ad: 7 features in batches of 4


def policy(feature: str, user: str) -> float:
    """A weight that depends on the feature and the ad only: the same in every thread and process."""
    h = hashlib.sha256(f"{feature}|{section(user, 'ad')}".encode()).digest()
    return round(h[0] / 255 * 2 - 1, 3)


def scripted_builder(lm_settings: LMSettings) -> Handle:
    """A picklable LM builder (Ray actors import it by name)."""
    return Handle(scripted_lm(ScriptedEngine(weight_policy=policy)))


class SlowEngine(ScriptedEngine):
    """Takes `delay` seconds per call outside the engine's lock, so calls overlap; counts the peak."""

    def __init__(self, delay: float = 0.03, **kw):
        super().__init__(weight_policy=policy, **kw)
        self.delay, self.in_flight, self.peak = delay, 0, 0
        self.count_lock = threading.Lock()

    def complete(self, request):
        with self.count_lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().complete(request)
        finally:
            with self.count_lock:
                self.in_flight -= 1


class FlakyEngine(SlowEngine):
    """The first `busy` calls answer HTTP 429 (as DSPy raises it for any server)."""

    def __init__(self, busy: int, **kw):
        super().__init__(**kw)
        self.busy = busy

    def complete(self, request):
        with self.count_lock:
            self.busy -= 1
            busy = self.busy >= 0
        if busy:
            raise LMRateLimitError("busy (scripted)", status=429, retry_after=0)
        return super().complete(request)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    syn = generate_synthetic(n_users=300, n_warm=40, n_cold=6, seed=1, image_dir=tmp_path / "img")
    enc = HashEncoder()
    return syn, prepare(syn.data, encoder=enc, k=3, progress=False), enc


def run(prep, enc, engine, out, ad_ids, workers, retry=None, **cfg):
    program = LLMHyper(ProgramConfig(batch_size=4, **cfg))
    h = Handle(scripted_lm(engine))
    return generate(prep, enc, program, h, h, ad_ids, out, {"test": True}, progress=False, workers=workers,
                    retry=retry)


def records(out):
    return {a: r for a, r in RunDir(out).records().items()}


def same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for ad in a:
        for key in ("status", "raw_weights", "normalized_weights", "delta", "alpha", "calls", "judge", "flags"):
            assert a[ad][key] == b[ad][key], (ad, key)


def test_many_workers_give_the_records_of_one(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    one, many = SlowEngine(), SlowEngine()
    t1 = run(prep, enc, one, tmp_path / "one", cold, workers=1)
    t4 = run(prep, enc, many, tmp_path / "four", cold, workers=4)
    assert one.peak == 1 and many.peak > 1  # the ads really were in flight together
    assert t1["ads_ok"] == t4["ads_ok"] == 6 and t4["weight_calls"] == t1["weight_calls"]
    same_weights(records(tmp_path / "one"), records(tmp_path / "four"))
    # each ad's calls are its own, though the ads shared one LM at the same time
    calls = RunDir(tmp_path / "four").calls()
    assert Counter(c["ad_id"] for c in calls) == {a: PER_AD + 1 for a in cold}  # + the judge
    for c in calls:
        ad_no = c["ad_id"].removeprefix("ad")
        assert f"offer #{ad_no}" in json.dumps(c["messages"])
    a, b = WeightTable.load(tmp_path / "one" / "weights"), WeightTable.load(tmp_path / "four" / "weights")
    assert sorted(a.ad_ids) == sorted(b.ad_ids)
    assert (a.theta[a.index_of(cold)] == b.theta[b.index_of(cold)]).all()


def test_kill_during_a_multi_worker_run_resumes_with_nothing_lost_or_redone(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    out, workers, kill_after = tmp_path / "run", 3, 5
    killer = SlowEngine(interrupt_after=kill_after)  # the 6th weight call (and every later one) is a kill
    with pytest.raises(KeyboardInterrupt):
        run(prep, enc, killer, out, cold, workers=workers, use_judge=False)
    before = {p.name: p.read_text() for p in (out / "ads").glob("*.json")}
    done = len(before)
    assert done >= 1 and not list((out / "ads").glob(".*.tmp"))
    # every answered call belongs to a recorded ad, or to one ad per worker that was still in flight
    assert 0 <= kill_after - PER_AD * done < workers
    # the artifact may lag the records written together just before the kill (or not exist yet, when they
    # all were): the next start repairs it
    if (out / "weights" / "weights.json").exists():
        recorded = {json.loads(t)["ad_id"] for t in before.values()}
        assert set(WeightTable.load(out / "weights").ad_ids) <= recorded
    resumed = SlowEngine()
    totals = run(prep, enc, resumed, out, cold, workers=workers, use_judge=False)
    assert resumed.weight_calls == PER_AD * (len(cold) - done)  # only the unfinished ads
    assert totals["ads_done"] == totals["ads_ok"] == len(cold)
    assert all((out / "ads" / name).read_text() == text for name, text in before.items())
    assert Counter(c["ad_id"] for c in RunDir(out).calls()) == {a: PER_AD for a in cold}
    assert sorted(WeightTable.load(out / "weights").ad_ids) == sorted(cold)
    same_weights(records(out), _one_worker_records(prep, enc, tmp_path / "reference", cold))


def _one_worker_records(prep, enc, out, cold):
    run(prep, enc, SlowEngine(delay=0), out, cold, workers=1, use_judge=False)
    return records(out)


def test_transient_errors_are_retried_and_recorded(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    flaky = FlakyEngine(busy=2)
    totals = run(prep, enc, flaky, tmp_path / "run", cold, workers=2, retry=AdRetry(times=2, wait=0),
                 use_judge=False)
    assert totals["ads_ok"] == len(cold) and totals["ad_retries"] == 2
    recs = records(tmp_path / "run")
    retried = [r["retries"] for r in recs.values() if r["retries"]]
    assert sum(map(len, retried)) == 2
    assert all(x["error"] == "LMRateLimitError" and x["status"] == 429 and x["wait_s"] == 0
               for rs in retried for x in rs)
    # past the cap the ad fails with the reason (and is retried by the next run, like any failure)
    down = FlakyEngine(busy=10**6)
    totals = run(prep, enc, down, tmp_path / "down", cold[:2], workers=2, retry=AdRetry(times=1, wait=0),
                 use_judge=False)
    assert totals["ads_failed"] == 2
    rec = records(tmp_path / "down")[cold[0]]
    assert "LMRateLimitError" in rec["reason"] and len(rec["retries"]) == 1
    assert AdRetry(wait=2.0, cap=5.0).delay(RuntimeError(), 3) == 5.0  # doubling, capped
    assert AdRetry().delay(LMRateLimitError("x", retry_after=7), 0) == 7.0  # the server's Retry-After


# -- the command ------------------------------------------------------------------------------

SMALL = SyntheticSettings(n_users=300, n_warm=40, n_cold=5)


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(encoders._SHARED, "test-hash", HashEncoder())

    def make(**kw):
        base = {"out": tmp_path / "run", "data": DataSettings(dataset="synthetic", seed=1, synthetic=SMALL),
                "encoder": "test-hash", "batch_size": 4, "judge": False}
        return GenerateSettings(**{**base, **kw})

    return make


def test_embedded_model_gets_one_server_per_worker(settings):
    built = []

    def build(lm_settings):
        built.append(lm_settings)
        return scripted_builder(lm_settings)

    totals = run_generate(settings(workers=3, lm=LMSettings(n_threads=2)), lm_builder=build, progress=False)
    assert totals["ads_ok"] == 5
    assert len(built) == 3 and {b.n_threads for b in built} == {1} and {b.spec for b in built} == {"embedded"}
    built.clear()  # any other server: one LM for all workers
    remote = LMSettings(spec="hosted_vllm/x", api_base="http://127.0.0.1:9/v1")
    run_generate(settings(workers=3, lm=remote, out=settings().out.parent / "remote"), lm_builder=build,
                 progress=False)
    assert [b.spec for b in built] == ["hosted_vllm/x"]


def test_stub_server_is_called_in_parallel_and_its_429s_retried(settings):
    with StubLMServer(latency=0.1, fail_every=4) as stub:
        lm = LMSettings(spec="hosted_vllm/stub", api_base=stub.base_url, cache=False)
        totals = run_generate(settings(workers=4, lm=lm, judge=True), progress=False)
        stats = dict(stub.stats)
    assert totals["ads_ok"] == 5 and totals["ads_failed"] == 0
    assert stats["peak_in_flight"] > 1 and stats["rate_limited"] >= 1  # DSPy's own retries answered them
    assert stats["answered"] == totals["weight_calls"] + 5  # every call logged once (+ one judge call per ad)


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="llmhyper")
    generate_cli.add_parser(parser.add_subparsers(dest="command"))
    return generate_cli.settings_from(parser.parse_args(["generate", "--out", "x", *argv]))


def test_command_line_workers_retries_and_ray():
    s = _parse("--workers", "8", "--retries", "5", "--ad-retries", "0", "--retry-wait", "0.5", "--ray",
               "--ray-address", "auto")
    assert (s.workers, s.lm.num_retries, s.ad_retries, s.retry_wait, s.ray, s.ray_address) == (
        8, 5, 0, 0.5, True, "auto")
    d = _parse()
    assert (d.workers, d.lm.num_retries, d.ad_retries, d.ray, d.ray_address) == (1, None, 2, False, None)
    with pytest.raises(LLMHyperError, match="only for --ray"):
        _parse("--ray-address", "auto").validate()
    for bad in ({"workers": 0}, {"ad_retries": -1}, {"retry_wait": float("nan")}):
        with pytest.raises(LLMHyperError):
            replace(d, **bad).validate()


# -- Ray in local mode ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install -e '.[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_local_mode_end_to_end_and_a_killed_driver_resumes(local_ray, settings, monkeypatch):
    local = settings(out=settings().out.parent / "local", workers=1)
    run_generate(local, lm_builder=scripted_builder, progress=False)
    s = settings(ray=True, workers=3)
    real = RunDir.write_record

    def driver_killed_after_two(self, item_id, record, settings=None):
        real(self, item_id, record, settings)
        if len(list(self.records_dir.glob("*.json"))) == 2:
            raise KeyboardInterrupt("the driver is killed")

    monkeypatch.setattr(RunDir, "write_record", driver_killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_generate(s, lm_builder=scripted_builder, progress=False)
    monkeypatch.setattr(RunDir, "write_record", real)
    before = {p.name: p.read_text() for p in (s.out / "ads").glob("*.json")}
    assert len(before) == 2
    totals = run_generate(s, lm_builder=scripted_builder, progress=False)
    assert totals["ads_done"] == totals["ads_ok"] == 5
    assert all((s.out / "ads" / name).read_text() == text for name, text in before.items())
    assert Counter(c["ad_id"] for c in RunDir(s.out).calls()) == {a: PER_AD for a in records(s.out)}
    same_weights(records(local.out), records(s.out))
    manifest = json.loads((s.out / "manifest.json").read_text())
    assert manifest["lm"]["model"] == "local/scripted" and len(manifest["resumed"]) == 1
