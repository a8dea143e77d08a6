"""The edit program: a small LM as a gated editor of a learned prior.

Instead of writing every weight (which a 1.5B model does worse than retrieval), the LM reads the ad, the
feature definitions, the prior's weight for each feature and, for similar past ads, the *right edits*
(how each past ad's trained weight differed from the prior's guess for it), and answers one label per
feature on a five-point scale: 1 much lower than the prior, 3 keep it, 5 much higher. Code turns labels
into weights, theta = prior + gamma * (label - 3) * unit, with `unit` the spread of the prior's errors on
retired ads and `gamma` fitted on held-out retired ads (`fit_gamma`). A gamma of 0 means the LM adds
nothing and the weights are the prior's.

Two ways to read the labels: `text` (a DSPy predictor writes a JSON object; any LM) and `logprobs` (a
grammar forces `name: D` lines and the label is the expected digit under the LM's token distribution; an
OpenAI-compatible server with log-probabilities, such as the embedded llama.cpp server).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dspy
import numpy as np

from llmhyper.errors import LLMHyperError
from llmhyper.hyper.program import format_ad
from llmhyper.llm.logprobs import LABELS, MIDDLE, ChatClient, expected_label, grammar_for, read_labels

MODES = ("logprobs", "text")


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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LLMHyperError(f"edit mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 1:
            raise LLMHyperError("batch_size must be at least 1")


# -- numbers ------------------------------------------------------------------------------------


def right_edits(trained: np.ndarray, prior: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The labels (1-5) that would have moved a prior towards trained weights, one per feature."""
    steps = np.clip(np.rint((np.asarray(trained) - np.asarray(prior)) / units), -2, 2)
    return (steps + MIDDLE).astype(int)


def edited_theta(prior: np.ndarray, edits: np.ndarray, units: np.ndarray, gamma: float) -> np.ndarray:
    """theta = prior + gamma * edit * unit (edits in [-2, 2]; NaN edits leave the prior as it is)."""
    edits = np.nan_to_num(np.asarray(edits, dtype=np.float64), nan=0.0)
    return np.asarray(prior, dtype=np.float64) + gamma * edits * units


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
        defs_txt = format_definitions(features)
        ad_txt = format_ad(ad, cfg.hide_titles)
        ex_txt = format_edit_examples(examples, cfg.hide_titles)
        edits: dict[str, float] = {}
        dists: dict[str, list[float]] = {}
        attempts: list[dict[str, Any]] = []
        tokens = {"prompt_tokens": 0, "completion_tokens": 0}
        for start in range(0, len(features), cfg.batch_size):  # the definitions stay whole: a shared prefix
            batch = features[start : start + cfg.batch_size]
            names = [f["name"] for f in batch]
            feat_txt = format_edit_features(batch, prior, examples)
            if cfg.mode == "logprobs":
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
