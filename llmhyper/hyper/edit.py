"""The edit program: a small LM as a gated editor of a learned prior.

Instead of writing every weight (which a 1.5B model does worse than retrieval), the LM reads the ad, the
feature definitions, the prior's weight for each feature and, for similar past ads, the *right edits*
(how each past ad's trained weight differed from the prior's guess for it), and answers one label per
feature on a five-point scale: 1 much lower than the prior, 3 keep it, 5 much higher. Code turns labels
into weights, theta = prior + gamma * (label - 3) * unit, with `unit` the spread of the prior's errors on
retired ads and `gamma` fitted on held-out retired ads (`fit_gamma`). A gamma of 0 means the LM adds
nothing and the weights are the prior's.

Two ways to read the labels: `text` (a DSPy predictor writes a JSON object; any LM) and `logprobs` (a
grammar forces the answer and the label is the expected digit under the LM's token distribution; an
OpenAI-compatible server with log-probabilities, such as the embedded llama.cpp server). In logprobs mode
two prompt layouts: `lines` (per feature `name: prior +0.12; past ads 4 3 3`, answered as `name: D` lines)
and `digits` (the features numbered once in the cached definitions, past ads' right answers and the answer
as digit strings: about a quarter of the tokens, so about 4x faster on a CPU; see BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dspy
import numpy as np

from llmhyper.errors import LLMHyperError
from llmhyper.hyper.program import format_ad
from llmhyper.llm.logprobs import (
    LABELS,
    MIDDLE,
    ChatClient,
    digits_grammar,
    expected_label,
    grammar_for,
    read_digit_labels,
    read_labels,
)

MODES = ("logprobs", "text")
LAYOUTS = ("lines", "digits")
DIGIT_GROUP = 10  # answers are written in groups of ten digits, so the LM can keep its place


class EditPriorWeights(dspy.Signature):
    """You improve a click-through-rate model of a new ad. The model is a logistic regression over
    standardised user features; a learned prior has already guessed each feature's weight from the ad's
    content. For every feature, say how the true weight differs from the prior's guess, on a scale of 1 to
    5: 1 = much lower than the prior, 2 = lower, 3 = the prior is right, 4 = higher, 5 = much higher. Most
    answers are 3; change a weight only when the ad's content gives a reason (its topic, genre or audience),
    and learn from the right answers given for the similar past ads."""

    # the definitions come first: they are the same for every ad, so the server's prompt cache keeps them
    definitions: str = dspy.InputField(desc="what each user feature means")
    ad: str = dspy.InputField(desc="the new ad")
    examples: str = dspy.InputField(desc="similar past ads")
    features: str = dspy.InputField(
        desc="per feature: the prior's weight, and the right answers for the past ads in their order"
    )
    # not `labels`: dspy.Example has a labels() method that would shadow the field
    answers: dict[str, int] = dspy.OutputField(
        desc="one label 1-5 per feature, keyed by the exact feature name"
    )


@dataclass
class EditConfig:
    mode: str = "logprobs"  # "logprobs" (needs a server with token log-probabilities) or "text"
    batch_size: int = 40  # features per call: one call per ad for MovieLens's 40 features
    top_logprobs: int = 10
    hide_titles: bool = False
    layout: str = "lines"  # "lines" or "digits" (the logprobs mode's prompt; the text mode has one)
    shots: int | None = None  # past ads shown (None: every retrieved neighbour; 0: the ad alone)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LLMHyperError(f"edit mode must be one of {MODES}, got {self.mode!r}")
        if self.layout not in LAYOUTS:
            raise LLMHyperError(f"edit layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.shots is not None and self.shots < 0:
            raise LLMHyperError("shots must be 0 or more")
        if self.batch_size < 1:
            raise LLMHyperError("batch_size must be at least 1")


# -- numbers ------------------------------------------------------------------------------------


def right_edits(trained: np.ndarray, prior: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The labels (1-5) that would have moved a prior towards trained weights, one per feature."""
    steps = np.clip(np.rint((np.asarray(trained) - np.asarray(prior)) / units), -2, 2)
    return (steps + MIDDLE).astype(int)


def edited_theta(
    prior: np.ndarray, edits: np.ndarray, units: np.ndarray, gamma: float | np.ndarray, bias: Any = 0.0
) -> np.ndarray:
    """theta = prior + gamma * (edit - bias) * unit (edits in [-2, 2]; NaN edits leave the prior as it is).
    `gamma` and `bias` may be one number or one per feature."""
    edits = np.asarray(edits, dtype=np.float64) - np.asarray(bias, dtype=np.float64)
    edits = np.nan_to_num(edits, nan=0.0)
    return np.asarray(prior, dtype=np.float64) + np.asarray(gamma, dtype=np.float64) * edits * units


def fit_gamma(
    prior: np.ndarray, edits: np.ndarray, units: np.ndarray, trained: np.ndarray, max_gamma: float = 2.0
) -> float:
    """Least-squares gamma for trained ~ prior + gamma * edit * unit over held-out ads (rows) and features,
    clipped to [0, max_gamma]: an LM whose edits point the wrong way, or nowhere, gets 0."""
    step = np.nan_to_num(np.asarray(edits, dtype=np.float64), nan=0.0) * units
    resid = np.asarray(trained, dtype=np.float64) - np.asarray(prior, dtype=np.float64)
    denom = float((step * step).sum())
    if denom <= 1e-12 * max(step.size, 1):  # no edits (up to rounding): nothing to gate
        return 0.0
    return float(np.clip((step * resid).sum() / denom, 0.0, max_gamma))


@dataclass
class Gate:
    gamma: np.ndarray  # per feature
    bias: np.ndarray  # per feature, in label steps

    @classmethod
    def scalar(cls, gamma: float, d: int) -> Gate:
        return cls(np.full(d, float(gamma)), np.zeros(d))

    @classmethod
    def from_manifest(cls, man: dict[str, Any], d: int) -> Gate:
        """The manifest's gate (older manifests hold one gamma and no bias)."""
        g = man.get("gate")
        if not g:
            return cls.scalar(float(man["gamma"]), d)
        gamma, bias = np.asarray(g["gamma"], dtype=np.float64), np.asarray(g["bias"], dtype=np.float64)
        if (
            gamma.shape != (d,)
            or bias.shape != (d,)
            or not (np.isfinite(gamma).all() and np.isfinite(bias).all())
        ):
            raise LLMHyperError(f"the program's gate does not hold {d} finite gammas and biases")
        return cls(gamma, bias)

    @property
    def is_zero(self) -> bool:
        return bool(np.all(self.gamma == 0.0))

    def record(self) -> dict[str, list[float]]:
        return {"gamma": self.gamma.round(6).tolist(), "bias": self.bias.round(6).tolist()}

    def theta(self, prior: np.ndarray, edits: np.ndarray, units: np.ndarray) -> np.ndarray:
        return edited_theta(prior, edits, units, self.gamma, self.bias)


def feature_groups(names: list[str]) -> list[str]:
    """A group per name prefix (before the first `_`) that two or more features share; the rest: 'other'."""
    prefixes = [n.split("_", 1)[0] if "_" in n else "" for n in names]
    counts = {p: prefixes.count(p) for p in prefixes}
    return [p if p and counts[p] >= 2 else "other" for p in prefixes]


def fit_gate(
    prior: np.ndarray,
    edits: np.ndarray,
    units: np.ndarray,
    trained: np.ndarray,
    groups: list[str],
    debias: bool,
    per_group: bool,
    max_gamma: float = 2.0,
) -> Gate:
    """Least-squares gamma(s) on ads x features (rows: fit ads), after removing the mean label if asked."""
    edits = np.asarray(edits, dtype=np.float64)
    d = edits.shape[1]
    answered = ~np.isnan(edits)  # the mean over the ads that answered (a missing label is not a 3)
    mean = np.where(answered, edits, 0.0).sum(axis=0) / np.maximum(answered.sum(axis=0), 1)
    bias = mean if debias else np.zeros(d)
    centred = edits - bias
    gamma = np.zeros(d)
    for g in sorted(set(groups)) if per_group else [None]:
        cols = np.array([g is None or x == g for x in groups])
        gamma[cols] = fit_gamma(prior[:, cols], centred[:, cols], units[cols], trained[:, cols], max_gamma)
    return Gate(gamma, bias)


# -- prompt text --------------------------------------------------------------------------------


def format_edit_examples(examples: list[dict[str, Any]], hide_titles: bool = False) -> str:
    if not examples:
        return "(no similar past ads)"
    out = []
    for i, ex in enumerate(examples, 1):
        body = "\n".join("  " + line for line in format_ad(ex, hide_titles).splitlines())
        out.append(f"Example {i} (similarity {ex['similarity']:.2f})\n{body}")
    return "\n".join(out)


def format_definitions(features: list[dict[str, str]]) -> str:
    return "\n".join(f"- {f['name']}: {f['description']}" for f in features)


def format_edit_features(
    batch: list[dict[str, str]], prior: dict[str, float], examples: list[dict[str, Any]]
) -> str:
    """One short line per feature: `- name: prior +0.12; past ads 4 3 3`."""
    lines = []
    for f in batch:
        name = f["name"]
        right = " ".join(str(ex["edits"][name]) for ex in examples if name in ex.get("edits", {}))
        lines.append(f"- {name}: prior {prior[name]:+.2f}" + (f"; past ads {right}" if right else ""))
    return "\n".join(lines)


def format_numbered_definitions(features: list[dict[str, str]]) -> str:
    """The definitions numbered in answer order (the same for every ad, so the server caches them)."""
    return "\n".join(f"{i}. {f['name']}: {f['description']}" for i, f in enumerate(features, 1))


def digit_string(labels: list[int | str]) -> str:
    """`3334333333 3343...`: labels in groups of ten, the form the digits layout reads and writes."""
    s = "".join(str(x) for x in labels)
    return " ".join(s[i : i + DIGIT_GROUP] for i in range(0, len(s), DIGIT_GROUP))


def digit_messages(
    instructions: str,
    defs_txt: str,
    ad_txt: str,
    examples: list[dict[str, Any]],
    names: list[str],
    hide: bool,
) -> list[dict]:
    """The digits layout: definitions first (cached prefix), then the ad and the past ads' right answers."""
    past = []
    for i, ex in enumerate(examples, 1):
        body = "; ".join(format_ad(ex, hide).splitlines())
        right = digit_string([ex["edits"].get(n, MIDDLE) for n in names])
        past.append(f"Past ad {i} (similarity {ex['similarity']:.2f}): {body}\nRight answers: {right}")
    user = (
        f"Features, numbered in answer order:\n{defs_txt}\n\n"
        "Answer with one digit 1-5 per feature in the order above, in groups of ten.\n\n"
        + ("\n".join(past) + "\n\n" if past else "")
        + f"New ad: {'; '.join(ad_txt.splitlines())}\nRight answers:"
    )
    return [{"role": "system", "content": instructions}, {"role": "user", "content": user}]


def chat_messages(
    instructions: str, defs_txt: str, ad_txt: str, ex_txt: str, feat_txt: str, names: list[str]
) -> list[dict]:
    user = (
        f"Feature definitions:\n{defs_txt}\n\nNew ad:\n{ad_txt}\n\nSimilar past ads:\n{ex_txt}\n\n"
        f"Prior weights and the right answers for the past ads:\n{feat_txt}\n\n"
        "Answer with one line per feature, in the order above, as `name: label`."
    )
    return [{"role": "system", "content": instructions}, {"role": "user", "content": user}]


# -- the program --------------------------------------------------------------------------------


class EditProgram(dspy.Module):
    """One ad in, one edit label per feature out (expected value in [-2, 2]), with the calls it took."""

    def __init__(self, config: EditConfig | None = None, client: ChatClient | None = None):
        super().__init__()
        self.config = config or EditConfig()
        if self.config.mode == "logprobs" and client is None:
            raise LLMHyperError(
                "the logprobs mode needs an OpenAI-compatible server client (or use mode 'text')"
            )
        self.client = client
        self.edit = dspy.Predict(EditPriorWeights)
        self.gate: dict[str, Any] | None = None  # set by compile: gamma and bias, saved with the program

    @property
    def instructions(self) -> str:
        return self.edit.signature.instructions  # what compile may evolve, in both modes

    def forward(
        self,
        ad: dict[str, Any],
        examples: list[dict[str, Any]],
        features: list[dict[str, str]],
        prior: dict[str, float],
    ) -> dspy.Prediction:
        cfg = self.config
        if cfg.shots is not None:
            examples = examples[: cfg.shots]
        digits = cfg.layout == "digits" and cfg.mode == "logprobs"
        defs_txt = format_numbered_definitions(features) if digits else format_definitions(features)
        ad_txt = format_ad(ad, cfg.hide_titles)
        ex_txt = format_edit_examples(examples, cfg.hide_titles)
        edits: dict[str, float] = {}
        dists: dict[str, list[float]] = {}
        attempts: list[dict[str, Any]] = []
        tokens = {"prompt_tokens": 0, "completion_tokens": 0}
        # the digits layout answers every feature in one call: its numbering is the definitions' order
        step = len(features) if digits else cfg.batch_size
        for start in range(0, len(features), step):  # the definitions stay whole: a shared prefix
            batch = features[start : start + step]
            names = [f["name"] for f in batch]
            feat_txt = "" if digits else format_edit_features(batch, prior, examples)
            if cfg.mode == "logprobs":
                if digits:
                    msgs = digit_messages(
                        self.instructions, defs_txt, ad_txt, examples, names, cfg.hide_titles
                    )
                    got, info = self._digit_batch(msgs, names)
                else:
                    got, info = self._logprob_batch(defs_txt, ad_txt, ex_txt, feat_txt, names)
                dists.update(got)
                edits.update({n: expected_label(d) for n, d in got.items()})
                usage = info.pop("usage", {}) or {}
                for k in tokens:
                    tokens[k] += int(usage.get(k, 0) or 0)
            else:
                got, info = self._text_batch(defs_txt, ad_txt, ex_txt, feat_txt, names)
                edits.update(got)
            attempts.append(info)
        failed = [f["name"] for f in features if f["name"] not in edits]
        return dspy.Prediction(
            edits=edits,
            distributions=dists,
            failed_features=failed,
            attempts=attempts,
            calls=len(attempts),
            parse_failures=sum(not a["ok"] for a in attempts),
            tokens=tokens,
            config=asdict(cfg),
        )

    def _logprob_batch(
        self, defs_txt, ad_txt, ex_txt, feat_txt, names
    ) -> tuple[dict[str, list[float]], dict]:
        body = {
            "messages": chat_messages(self.instructions, defs_txt, ad_txt, ex_txt, feat_txt, names),
            "max_tokens": 16 * len(names) + 8,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.config.top_logprobs,
            "grammar": grammar_for(names),
        }
        reply, cached = self.client.complete(body)
        got = read_labels(reply, names)
        missing = [n for n in names if n not in got]
        info = {"ok": not missing, "asked": len(names), "cached": cached, "usage": reply.get("usage", {})}
        if missing:
            info["reason"] = f"no label for {missing}"
        return got, info

    def _digit_batch(self, messages: list[dict], names: list[str]) -> tuple[dict[str, list[float]], dict]:
        n = len(names)
        body = {
            "messages": messages,
            "max_tokens": 2 * n + 8,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.config.top_logprobs,
            "grammar": digits_grammar(n, DIGIT_GROUP),
        }
        reply, cached = self.client.complete(body)
        got = read_digit_labels(reply, names)
        missing = [x for x in names if x not in got]
        info = {"ok": not missing, "asked": n, "cached": cached, "usage": reply.get("usage", {})}
        if missing:
            info["reason"] = f"no label for {missing}"
        return got, info

    def dump_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # the configuration is part of the program: a compile that changes it writes a different file
        state = {**super().dump_state(*args, **kwargs), "config": asdict(self.config)}
        return {**state, "gate": self.gate} if self.gate is not None else state

    def load_state(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        state = dict(state)
        state.pop("config", None)  # the manifest's configuration is the one in force
        self.gate = state.pop("gate", None)
        return super().load_state(state, *args, **kwargs)

    def _text_batch(
        self, defs_txt, ad_txt, ex_txt, feat_txt, names
    ) -> tuple[dict[str, float], dict[str, Any]]:
        try:
            pred = self.edit(definitions=defs_txt, ad=ad_txt, examples=ex_txt, features=feat_txt)
        except dspy.utils.exceptions.AdapterParseError as exc:
            return {}, {"ok": False, "asked": len(names), "reason": f"AdapterParseError: {str(exc)[:200]}"}
        raw = pred.answers if isinstance(pred.answers, dict) else {}
        got = {}
        for n in names:
            v = raw.get(n)
            if isinstance(v, (int, float)) and str(int(v)) in LABELS and float(v) == int(v):
                got[n] = float(int(v) - MIDDLE)
        missing = [n for n in names if n not in got]
        return got, {
            "ok": not missing,
            "asked": len(names),
            **({"reason": f"no label for {missing}"} if missing else {}),
        }
