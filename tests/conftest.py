"""Test isolation: no network beyond loopback, a fresh DSPy configuration and cache per test."""

from __future__ import annotations

import copy
import ipaddress
import os
import socket

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_real_connect = socket.socket.connect


def _loopback_only(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    try:
        if (
            isinstance(host, str)
            and host not in ("localhost",)
            and not ipaddress.ip_address(host).is_loopback
        ):
            raise RuntimeError(f"network access attempted in a test: {address}")
    except ValueError:  # a host name other than localhost
        raise RuntimeError(f"network access attempted in a test: {address}") from None
    return _real_connect(sock, address)


def pytest_addoption(parser):
    parser.addoption(
        "--embedded",
        action="store_true",
        default=False,
        help="also run tests that use the real embedded LLM (minutes)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--embedded") or os.environ.get("LLMHYPER_TEST_EMBEDDED") == "1":
        return
    skip = pytest.mark.skip(reason="real embedded LLM: pass --embedded or set LLMHYPER_TEST_EMBEDDED=1")
    for item in items:
        if "embedded" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)
    try:
        import dspy
        from dspy.dsp.utils.settings import DEFAULT_CONFIG
    except ImportError:  # dspy-free tests still run
        yield
        return
    original_cache = dspy.cache
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    yield
    dspy.configure(**copy.deepcopy(DEFAULT_CONFIG))
    dspy.cache = original_cache


@pytest.fixture()
def default_run(tmp_path, monkeypatch):
    """A scripted run on the default synthetic world, as `llmhyper generate --dataset synthetic` makes it."""
    from llmhyper.ctr.prepare import prepare
    from llmhyper.data.synthetic import generate_synthetic
    from llmhyper.hyper.generate import generate
    from llmhyper.hyper.program import LLMHyper, ProgramConfig
    from tests.fakes import HashEncoder
    from tests.scripted_lm import Handle, scripted_lm
    from tests.scripted_trust import TrustEngine, main_topic_policy

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    syn = generate_synthetic(seed=0)
    enc = HashEncoder()
    prep = prepare(syn.data, encoder=enc, k=3, progress=False)
    run = tmp_path / "run"
    config = {
        "dataset": "synthetic",
        "seed": 0,
        "k": 3,
        "encoder": enc.name,
        "lm": "scripted",
        "batch_size": 4,
        "samples": 1,
        "judge": True,
        "hide_titles": False,
    }
    h = Handle(scripted_lm(TrustEngine(weight_policy=main_topic_policy)))
    generate(
        prep, enc, LLMHyper(ProgramConfig(batch_size=4)), h, h, syn.data.cold_ads, run, config, progress=False
    )
    return run, syn
