"""A scripted in-process LM (a DSPy 3.4 engine): answers are computed from the prompt, so whole programs
run deterministically. An unexpected prompt fails loudly instead of getting a made-up answer."""

from __future__ import annotations

import json
import re
import threading

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events


class UnexpectedPrompt(AssertionError):
    pass


def _text(request) -> tuple[str, str]:
    system = (
        request.system
        if isinstance(request.system, str)
        else "".join(getattr(p, "text", "") or "" for p in (request.system or ()))
    )
    user = "\n".join(m.text or "" for m in request.messages if m.role == "user")
    return system, user


def section(user: str, name: str) -> str:
    m = re.search(rf"\[\[ ## {name} ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", user, re.S)
    return m.group(1) if m else ""


def batch_features(user: str) -> list[str]:
    return re.findall(r"^- ([A-Za-z_][\w'\-]*):", section(user, "features"), re.M)


class ScriptedEngine:
    """`weight_policy(feature, user_text) -> float | str` answers weight calls; `judge_policy(user_text)`
    returns (inconsistent, improper) lists. `fail_first` makes the first N weight calls unparseable and
    `interrupt_after` raises KeyboardInterrupt on that weight call (a kill)."""

    def __init__(
        self, weight_policy=None, judge_policy=None, fail_first: int = 0, interrupt_after: int | None = None
    ):
        self.weight_policy = weight_policy or (lambda f, u: 0.1)
        self.judge_policy = judge_policy or (lambda u: ([], []))
        self.fail_first, self.interrupt_after = fail_first, interrupt_after
        self.weight_calls = self.judge_calls = 0
        self.lock = threading.Lock()

    def complete(self, request) -> Response:
        system, user = _text(request)
        with self.lock:
            if "inconsistent_features" in system:
                self.judge_calls += 1
                bad, improper = self.judge_policy(user)
                text = (
                    f"[[ ## inconsistent_features ## ]]\n{json.dumps(bad)}\n\n[[ ## improper_features ## ]]\n"
                    f"{json.dumps(improper)}\n\n[[ ## completed ## ]]"
                )
            elif "`weights` (dict[str, float])" in system and "[[ ## features ## ]]" in user:
                text = self._weights(user)
            else:
                raise UnexpectedPrompt(
                    f"no scripted answer for this prompt:\n{system[:300]}\n---\n{user[:300]}"
                )
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=len(system + user) // 4, output_tokens=40),
        )

    def _weights(self, user: str) -> str:
        self.weight_calls += 1
        if self.interrupt_after is not None and self.weight_calls > self.interrupt_after:
            raise KeyboardInterrupt("scripted kill")
        if self.weight_calls <= self.fail_first:
            return "I think the weights are about zero."  # no fields: unparseable
        names = batch_features(user)
        if not names:
            raise UnexpectedPrompt(f"weight call without features:\n{user[:500]}")
        weights = {
            n: v for n in names if (v := self.weight_policy(n, user)) is not None
        }  # None: key left out
        return (
            f"[[ ## reasoning ## ]]\nScripted.\n\n[[ ## weights ## ]]\n{json.dumps(weights)}\n\n"
            f"[[ ## completed ## ]]"
        )

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self):
        pass


def scripted_lm(engine: ScriptedEngine) -> dspy.LM:
    return dspy.LM(
        "local/scripted", engine=engine, temperature=0.0, max_tokens=400, cache=False, num_retries=0
    )


class Handle:
    """Stands in for llmhyper.llm.build.LMHandle."""

    def __init__(self, lm):
        self.lm = lm
        self.description = {"spec": "scripted", "model": "local/scripted"}

    def close(self):
        pass
