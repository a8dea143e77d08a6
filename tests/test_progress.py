"""llmhyper.llm.progress: one stderr line per LLM call (LMProgress) and DSPy's truncation warning explained
once (TruncationNote). Runs real dspy.LM calls on an in-process engine: no server, no network."""

from __future__ import annotations

import io
import logging
import threading

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from llmhyper.llm import progress
from llmhyper.llm.build import build_lm
from llmhyper.llm.progress import TRUNCATION_NOTE, LMProgress, TruncationNote, install_truncation_note


class Engine:
    """Answers "ok"; `cut` prompts end with finish_reason "length" (a truncated answer); `boom` raises."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def complete(self, request) -> Response:
        text = "\n".join(m.text or "" for m in request.messages if m.role == "user")
        with self.lock:
            self.calls += 1
        if "boom" in text:
            raise ValueError("engine exploded")
        return Response(id=None, model=request.model, message=Message.assistant([TextPart("ok " + text)]),
                        finish_reason="length" if "cut" in text else "stop",
                        usage=Usage(input_tokens=100 + len(text), output_tokens=7))

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self):
        pass


def _lm(cache: bool = False) -> dspy.LM:
    return dspy.LM("local/engine", engine=Engine(), temperature=0.0, max_tokens=64, cache=cache, num_retries=0)


@pytest.fixture
def note():
    """A fresh TruncationNote on DSPy's logger (removed afterwards)."""
    logger = logging.getLogger(progress.TRUNCATION_LOGGER)
    old = list(logger.filters)
    for f in old:
        logger.removeFilter(f)
    installed = install_truncation_note()
    yield installed
    logger.removeFilter(installed)
    for f in old:
        logger.addFilter(f)


def test_one_line_per_call_with_tokens_and_seconds():
    out = io.StringIO()
    lm = _lm()
    cb = LMProgress(stream=out)
    with dspy.context(callbacks=[cb]):
        lm("hello")
        lm("hello again")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("llmhyper: LLM call 1: ") and lines[1].startswith("llmhyper: LLM call 2: ")
    assert " s, 105 prompt + 7 completion tokens" in lines[0]
    assert "111 prompt + 7 completion tokens" in lines[1]
    assert cb.calls == 2 and cb.prompt_tokens == 216 and cb.completion_tokens == 14 and cb.truncated == 0


def test_lm_level_callback_and_cache_hit(tmp_path):
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    out = io.StringIO()
    lm = _lm(cache=True)
    lm.callbacks = [LMProgress(stream=out)]
    lm("same prompt")
    lm("same prompt")
    first, second = out.getvalue().splitlines()
    assert "prompt +" in first
    assert second.endswith("from the cache")


def test_failed_call_is_reported_and_reraised():
    out = io.StringIO()
    with dspy.context(callbacks=[LMProgress(stream=out)]), pytest.raises(Exception, match="exploded"):
        _lm()("boom")
    (line,) = out.getvalue().splitlines()
    assert "LLM call 1:" in line and "failed:" in line and "engine exploded" in line


def test_truncation_is_explained_once_and_marked_per_call(note, caplog):
    out = io.StringIO()
    lm = _lm()
    with caplog.at_level(logging.WARNING, logger=progress.TRUNCATION_LOGGER), \
            dspy.context(callbacks=[LMProgress(stream=out)]):
        lm("cut one")
        lm("fine")
        lm("cut two")
    warnings = [r.getMessage() for r in caplog.records if r.name == progress.TRUNCATION_LOGGER]
    assert warnings == [TRUNCATION_NOTE]  # DSPy's "increase max_tokens" is replaced, the second dropped
    assert "increase max_tokens" not in caplog.text
    assert note.count == 2
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("cut at max_tokens=64") and lines[2].endswith("cut at max_tokens=64")
    assert "cut" not in lines[1].split("tokens")[-1]


def test_install_is_idempotent_and_build_lm_installs_it(note):
    logger = logging.getLogger(progress.TRUNCATION_LOGGER)
    assert install_truncation_note() is note
    build_lm("openai/gpt-4o-mini", api_key="x").close()  # builds without calling the network
    assert [f for f in logger.filters if isinstance(f, TruncationNote)] == [note]


def test_other_warnings_pass_untouched(note):
    rec = logging.LogRecord(progress.TRUNCATION_LOGGER, logging.WARNING, __file__, 1, "something %s", ("else",),
                            None)
    assert note.filter(rec) and rec.getMessage() == "something else" and note.count == 0


def test_concurrent_calls_keep_their_own_usage(note):
    out = io.StringIO()
    lm = _lm()
    cb = LMProgress(stream=out)
    prompts = [f"p{i:02d}" + ("x" * i) for i in range(12)]

    def run(p):
        with dspy.context(callbacks=[cb]):
            lm(p)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 12
    assert sorted(int(line.split("LLM call ")[1].split(":")[0]) for line in lines) == list(range(1, 13))
    assert cb.prompt_tokens == sum(100 + len(p) for p in prompts)
