"""Scripted LM for the trust studies: the weight program's calls (as in `scripted_lm`) plus the stance judge
and the ad rewriter. Every answer is computed from the prompt; an unexpected prompt fails loudly."""

from __future__ import annotations

import json
import re

from dspy.lm15 import Message, Response, TextPart, Usage

from llmhyper.hyper.generate import generate
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from tests.scripted_lm import Handle, ScriptedEngine, UnexpectedPrompt, _text, batch_features, scripted_lm, section

TOPIC_WORDS = ("sports", "cooking", "travel", "tech", "fashion")


class TrustEngine(ScriptedEngine):
    """`stance_policy(reasoning, feature_names) -> {name: label}`; `rewrite_policy(ad_text, target, change) ->
    (title, text)`; `reasoning_policy(feature_names, user_text) -> str` replaces the weight calls'
    reasoning."""

    def __init__(
        self,
        weight_policy=None,
        judge_policy=None,
        stance_policy=None,
        rewrite_policy=None,
        reasoning_policy=None,
        **kw,
    ):
        super().__init__(weight_policy=weight_policy, judge_policy=judge_policy, **kw)
        self.stance_policy, self.rewrite_policy, self.reasoning_policy = (
            stance_policy,
            rewrite_policy,
            reasoning_policy,
        )
        self.stance_calls = self.rewrite_calls = 0
        self.weight_prompts: list[str] = []

    def complete(self, request) -> Response:
        system, user = _text(request)
        if "`stances` (dict[str, str])" in system:
            if self.stance_policy is None:
                raise UnexpectedPrompt("a stance-judge call, but no stance_policy was scripted")
            with self.lock:
                self.stance_calls += 1
            labels = self.stance_policy(section(user, "reasoning"), batch_features(user))
            text = f"[[ ## stances ## ]]\n{json.dumps(labels)}\n\n[[ ## completed ## ]]"
        elif "`rewritten_text` (str)" in system:
            if self.rewrite_policy is None:
                raise UnexpectedPrompt("a rewrite call, but no rewrite_policy was scripted")
            with self.lock:
                self.rewrite_calls += 1
            title, body = self.rewrite_policy(
                section(user, "ad"), section(user, "target"), section(user, "change")
            )
            text = (
                f"[[ ## rewritten_title ## ]]\n{title}\n\n[[ ## rewritten_text ## ]]\n{body}\n\n"
                "[[ ## completed ## ]]"
            )
        else:
            return super().complete(request)
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=len(system + user) // 4, output_tokens=30),
        )

    def _weights(self, user: str) -> str:
        self.weight_prompts.append(user)
        text = super()._weights(user)
        if self.reasoning_policy is not None:
            text = text.replace("Scripted.", self.reasoning_policy(batch_features(user), user), 1)
        return text


# -- policies on the synthetic world ---------------------------------------------------------------


def ad_description(user: str) -> str:
    """The new ad's description as the weight prompt shows it (its `ad` section)."""
    m = re.search(r"^Description: (.*)$", section(user, "ad"), re.M)
    return m.group(1) if m else ""


def reading_policy(per_mention: float = 0.4, other: float = 0.05):
    """interest_<t>: per_mention x (times the topic word appears in the ad's description); others: `other`.
    A hypernetwork that reads the ad, so rewrites move its weights."""

    def policy(feature: str, user: str) -> float:
        if feature.startswith("interest_"):
            return round(per_mention * ad_description(user).lower().count(feature[len("interest_") :]), 3)
        return other

    return policy


def constant_policy(value: float = 0.3):
    return lambda feature, user: value


def topic_of(target: str) -> str:
    name = target.split(":", 1)[0].strip()
    return name[len("interest_") :] if name.startswith("interest_") else name


def split_ad(ad_text: str) -> tuple[str, str]:
    title = re.search(r"^Title: (.*)$", ad_text, re.M)
    desc = re.search(r"^Description: (.*)$", ad_text, re.M)
    return (title.group(1) if title else ""), (desc.group(1) if desc else "")


def faithful_rewriter(ad_text: str, target: str, change: str) -> tuple[str, str]:
    """Does what it is asked: more mentions of the topic, none, or a neutral word instead."""
    title, desc = split_ad(ad_text)
    t = topic_of(target)
    if change.startswith("enhanced"):
        return title, f"{desc} Made for {t} fans."
    if change.startswith("diminished"):
        return title, desc.replace(t, "indoor") + " Not aimed at any one hobby."
    if change.startswith("neutralised"):
        return title, desc.replace(t, "everyday")
    raise UnexpectedPrompt(f"unknown change: {change}")


def contrarian_rewriter(ad_text: str, target: str, change: str) -> tuple[str, str]:
    """Does the opposite for enhanced/diminished (a broken editor): their direction accuracy must be 0."""
    swap = {"enhanced": "diminished", "diminished": "enhanced"}
    kind = change.split(":", 1)[0]
    return faithful_rewriter(ad_text, target, swap.get(kind, kind) + change[len(kind) :])


# -- policies and a scripted run shared by the trust and report tests ---------------------------------


def topic_reasoning(names, user):
    """Reasoning that names the ad's main topic (the first topic word in its description) and age."""
    desc = section(user, "ad").lower()
    topic = next(t for t in ("sports", "cooking", "travel", "tech", "fashion") if t in desc)
    return f"Fans of {topic} click more (interest_{topic}); age does not matter."


def stance_from_reasoning(lie: bool = False):
    def policy(reasoning, names):
        out = {}
        for n in names:
            if n.startswith("interest_") and n in reasoning:
                out[n] = "negative" if lie else "positive"
            elif n == "age":
                out[n] = "Neutral"  # case and synonyms are normalised
            else:
                out[n] = "not_mentioned"
        return out

    return policy


def main_topic_policy(feature, user):
    desc = section(user, "ad").lower()
    topic = next(t for t in ("sports", "cooking", "travel", "tech", "fashion") if t in desc)
    return 1.0 if feature == f"interest_{topic}" else 0.0


def make_run(prep, enc, engine, out, ad_ids, **cfg):
    program = LLMHyper(ProgramConfig(batch_size=4, **cfg))
    h = Handle(scripted_lm(engine))
    return generate(prep, enc, program, h, h, ad_ids, out, {"test": True}, progress=False)
