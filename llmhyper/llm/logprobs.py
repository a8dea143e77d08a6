"""Labels read from token log-probabilities instead of sampled text.

The edit program asks for one label per feature on a five-point scale. Where the LM server returns token
log-probabilities (llama.cpp's server does, and so do vLLM and OpenAI), a grammar forces the answer into
lines `name: D` (D a digit 1-5, one token), and the label is read as the expected value of D under the
model's distribution at that token. Nothing is sampled and nothing can fail to parse: a call costs one
prompt plus a few forced tokens per feature.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmhyper.errors import LLMHyperError
from llmhyper.store import sha256_bytes, write_json_atomic

LABELS = ("1", "2", "3", "4", "5")  # 1 = much lower than the prior ... 3 = keep it ... 5 = much higher
MIDDLE = 3
_LINE = re.compile(r"^\s*([^\s:]+)\s*:\s*$")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def grammar_for(names: list[str]) -> str:
    """A GBNF grammar (llama.cpp) that admits exactly one `name: D` line per feature, in order."""
    for n in names:
        if '"' in n or "\\" in n or "\n" in n:
            raise LLMHyperError(f"feature name {n!r} cannot be put into a grammar")
    return "root ::= " + " ".join(f'"{n}: " [1-5] "\\n"' for n in names)


def digits_grammar(n: int, group: int = 10) -> str:
    """A GBNF grammar for `n` digits 1-5 in groups of `group`, separated by single spaces."""
    if n < 1:
        raise LLMHyperError("a digits answer needs at least one feature")
    sizes = [min(group, n - i) for i in range(0, n, group)]
    return "root ::= " + ' " " '.join(" ".join(["[1-5]"] * s) for s in sizes) + ' "\\n"'


def read_digit_labels(reply: dict[str, Any], names: list[str]) -> dict[str, list[float]]:
    """Per feature in order, the label distribution at its digit in a digits answer (`3343 ...`). A token
    holding one digit gives the LM's distribution; a token holding several (tokenisers that merge digits)
    gives each digit as certain. Features beyond the answer are left out."""
    tokens = _content_tokens(reply)
    out: dict[str, list[float]] = {}
    for tok in tokens:
        text = str(tok.get("token", "")).strip()
        digits = [c for c in text if c in LABELS]
        if len(digits) == 1 and text == digits[0]:
            if len(out) < len(names):
                out[names[len(out)]] = label_distribution(tok.get("top_logprobs", []), digits[0])
            continue
        for c in digits:
            if len(out) < len(names):
                out[names[len(out)]] = [1.0 if lab == c else 0.0 for lab in LABELS]
    return out


def _content_tokens(reply: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return reply["choices"][0]["logprobs"]["content"] or []
    except (KeyError, IndexError, TypeError):
        raise LLMHyperError(
            "the LM reply has no token log-probabilities (does the server support "
            "'logprobs'? use the text mode otherwise)"
        ) from None


def label_distribution(top_logprobs: list[dict[str, Any]], chosen: str) -> list[float]:
    """Probabilities of the five labels at one token, renormalised over the labels among the top tokens
    (the chosen label alone when none of them is listed)."""
    mass = dict.fromkeys(LABELS, 0.0)
    for t in top_logprobs or []:
        tok = str(t.get("token", "")).strip()
        if tok in mass and t.get("logprob") is not None and math.isfinite(float(t["logprob"])):
            mass[tok] += math.exp(float(t["logprob"]))
    total = sum(mass.values())
    if total <= 0:
        return [1.0 if lab == chosen.strip() else 0.0 for lab in LABELS]
    return [mass[lab] / total for lab in LABELS]


def expected_label(dist: list[float]) -> float:
    """The expected edit in [-2, 2] (label minus the middle label)."""
    return sum(p * (i + 1 - MIDDLE) for i, p in enumerate(dist))


def read_labels(reply: dict[str, Any], names: list[str]) -> dict[str, list[float]]:
    """Per feature, the label distribution at its digit token in an OpenAI-style chat completion with
    `logprobs`. Features the reply does not answer are left out (the caller falls back to the prior)."""
    tokens = _content_tokens(reply)
    wanted, out, line = set(names), {}, ""
    for tok in tokens:
        text = str(tok.get("token", ""))
        stripped = text.strip()
        match = _LINE.match(line)
        if stripped in LABELS and match and match.group(1) in wanted and match.group(1) not in out:
            out[match.group(1)] = label_distribution(tok.get("top_logprobs", []), stripped)
        line += text
        if "\n" in line:
            line = line.rsplit("\n", 1)[1]
    return out


@dataclass
class ChatClient:
    """A minimal OpenAI-compatible chat client for log-probability requests, with a disk cache keyed by
    the model's identity (its SHA-256 for the embedded model, else endpoint + name) and the request, so a
    rerun costs nothing and a different server is never answered from another's cache."""

    base_url: str
    api_key: str | None
    model: str
    identity: str
    cache: Path | None = None
    timeout: float = 600.0
    retries: int = 3

    def complete(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(reply, from_cache)."""
        body = {"model": self.model, **body}
        key = sha256_bytes(json.dumps({"identity": self.identity, "body": body}, sort_keys=True).encode())
        path = self.cache / key[:2] / f"{key}.json" if self.cache else None
        if path is not None and path.exists():
            try:
                return json.loads(path.read_text()), True
            except json.JSONDecodeError:
                path.unlink(missing_ok=True)
        reply = self._post(body)
        if path is not None:
            write_json_atomic(path, reply)
        return reply, False

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last = ""
        for attempt in range(self.retries):
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
            try:
                with _NO_PROXY.open(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:200]!r}"
                if exc.code not in (429, 500, 502, 503, 504):
                    break
            except (OSError, json.JSONDecodeError) as exc:
                last = repr(exc)
            time.sleep(min(8.0, 0.5 * 2**attempt))
        raise LLMHyperError(f"the LM server at {url} failed: {last}")


def client_for_handle(handle: Any, cache: Path | None) -> ChatClient:
    """The log-probability client of a built LM (`llm.build.LMHandle`): the embedded server (keyed by the
    model's SHA-256, so the cache survives restarts on new ports) or the remote `api_base`."""
    desc, settings = handle.description, handle.settings
    if handle.server is not None:
        return ChatClient(
            handle.server.base_url,
            handle.server.api_key,
            desc.get("model", "local"),
            f"sha256:{desc.get('sha256')}",
            cache,
        )
    base = getattr(settings, "api_base", None)
    if not base:
        raise LLMHyperError(
            "the logprobs mode needs an OpenAI-compatible server: the embedded model, or --lm "
            "with --api-base (or use --mode text)"
        )
    spec = settings.spec
    return ChatClient(base, settings.api_key(), spec.split("/", 1)[-1], f"{base}|{spec}", cache)
