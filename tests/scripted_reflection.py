"""Scripted task + reflection LM for compile tests (a DSPy 3.4 engine; no real LLM, no network).

Task calls (weights) answer from the prompt: each feature line carries the neighbours' trained weights
("Trained weights: Example 1 +0.42, ..."). Unless the instructions (system message) contain `RULE`, the
scripted model writes the NEGATIVE of Example 1's weight (every sign wrong); with `RULE` it copies it. The
reflection LM (the JSON prompt of GEPA's InstructionProposer, output `new_instruction`) appends `RULE` to the
current instruction when the feedback it is shown names wrong signs. So one reflection makes the task model
better and the validation score rises. Unknown prompts fail loudly."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from tests.scripted_lm import UnexpectedPrompt, _text, section

RULE = "Keep the sign of the most similar example's trained weight for every feature."


def feature_lines(user: str) -> list[tuple[str, float | None]]:
    out = []
    for line in section(user, "features").splitlines():
        m = re.match(r"^- ([A-Za-z_][\w'\-]*):", line)
        if not m:
            continue
        w = re.search(r"Example 1 ([+-]\d+\.\d+)", line)
        out.append((m.group(1), float(w.group(1)) if w else None))
    return out


class CompileEngine:
    """`kill_after=N`: the (N+1)-th call raises KeyboardInterrupt (a kill). `garbage=True`: weight answers
    never parse. `calls` counts answered calls by kind."""

    def __init__(self, kill_after: int | None = None, garbage: bool = False):
        self.kill_after, self.garbage = kill_after, garbage
        self.calls: Counter = Counter()
        self.lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def complete(self, request) -> Response:
        system, user = _text(request)
        with self.lock:
            if self.kill_after is not None and self.total >= self.kill_after:
                raise KeyboardInterrupt("scripted kill")
            if "new_instruction" in system:
                kind, text = "reflection", self._reflect(user)
            elif "inconsistent_features" in system:
                kind = "judge"
                text = ("[[ ## inconsistent_features ## ]]\n[]\n\n[[ ## improper_features ## ]]\n[]\n\n"
                        "[[ ## verdict ## ]]\nfine\n\n[[ ## completed ## ]]")
            elif "`weights` (dict[str, float])" in system and "[[ ## features ## ]]" in user:
                kind, text = "weights", self._weights(system, user)
            else:
                raise UnexpectedPrompt(f"no scripted answer for this prompt:\n{system[:300]}\n---\n{user[:300]}")
            self.calls[kind] += 1
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=len(system + user) // 4, output_tokens=40))

    def _weights(self, system: str, user: str) -> str:
        if self.garbage:
            return "I think the weights are about zero."
        feats = feature_lines(user)
        if not feats:
            raise UnexpectedPrompt(f"weight call without features:\n{user[:500]}")
        good = RULE in system
        weights = {f: (0.1 if w is None else (w if good else -w)) for f, w in feats}
        why = "Copying the closest ad's signs." if good else "Users unlike the similar ads' audience will click."
        return f"[[ ## reasoning ## ]]\n{why}\n\n[[ ## weights ## ]]\n{json.dumps(weights)}\n\n[[ ## completed ## ]]"

    @staticmethod
    def _reflect(user: str) -> str:
        current = section(user, "current_instruction").strip()
        if not current:
            raise UnexpectedPrompt(f"reflection call without current_instruction:\n{user[:500]}")
        if "Wrong sign" in user and RULE not in current:
            new = current + "\n" + RULE
        else:
            new = current + "\nBe concise."
        return json.dumps({"new_instruction": new})

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self):
        pass


class Handle:
    def __init__(self, lm, name: str):
        self.lm = lm
        self.description = {"spec": "scripted", "model": name}

    def close(self):
        pass


def scripted_pair(engine: CompileEngine) -> tuple[Handle, Handle]:
    """(task, reflection) handles over one engine; both cached, as in a real compile (resume needs it)."""
    task = dspy.LM("local/compile-task", engine=engine, temperature=0.0, max_tokens=400, cache=True, num_retries=0)
    refl = dspy.LM("local/compile-reflect", engine=engine, temperature=1.0, max_tokens=1000, cache=True,
                   num_retries=0)
    return Handle(task, "local/compile-task"), Handle(refl, "local/compile-reflect")
