"""The LLM-HYPER prompt program: few-shot demonstrations -> batched chain-of-thought weight prediction ->
averaged samples -> LLM judge -> regeneration of what the judge rejects.

Retrieval happens before the program (its neighbours are inputs), because it does not depend on prompts:
GEPA can then evolve the instructions without re-running faiss. Everything numeric after the LLM (clamping
here; normalisation and calibration in `normalize`) is code, never left to the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import dspy
import numpy as np

from llmhyper.hyper.signatures import JudgeWeights, PredictFeatureWeights


@dataclass
class ProgramConfig:
    batch_size: int = 10  # features per LLM call (the paper: 5-10)
    n_samples: int = 1  # samples per batch, averaged
    max_attempts: int = 3  # per batch and sample: first try + retries on unparseable output
    use_judge: bool = True
    max_regenerations: int = 1  # rounds of regenerating batches the judge rejects
    weight_bound: float = 3.0  # |w| above this is clamped (a schema cannot bound numbers)
    sample_temperature: float = 0.7  # for samples after the first and for retries
    hide_titles: bool = False  # show the LLM genres/date/poster only (ablation: no memorised fame)


class WeightParseError(ValueError):
    """The LLM's answer parsed, but is not one finite number per requested feature."""


# -- prompt text ------------------------------------------------------------------------------

def format_ad(ad: dict[str, Any], hide_title: bool = False) -> str:
    lines = [] if hide_title else [f"Title: {ad['title']}"]
    if ad.get("text"):
        lines.append(f"Description: {ad['text']}")
    if ad.get("caption"):
        lines.append(f"Image: {ad['caption']}")
    return "\n".join(lines) or "(no content)"


def format_examples(examples: list[dict[str, Any]], hide_titles: bool = False) -> str:
    if not examples:
        return "(no similar past ads)"
    out = []
    for i, ex in enumerate(examples, 1):
        head = f"Example {i} (similarity {ex['similarity']:.2f}, observed click rate {ex['ctr']:.3f})"
        out.append(head + "\n" + "\n".join("  " + line for line in format_ad(ex, hide_titles).splitlines()))
    return "\n".join(out)


def format_features(batch: list[dict[str, str]], examples: list[dict[str, Any]]) -> str:
    lines = []
    for f in batch:
        trained = ", ".join(f"Example {i} {ex['weights'][f['name']]:+.2f}"
                            for i, ex in enumerate(examples, 1) if f["name"] in ex["weights"])
        lines.append(f"- {f['name']}: {f['description']}." + (f" Trained weights: {trained}." if trained else ""))
    lines.append("Write exactly these keys: " + ", ".join(f["name"] for f in batch) + ".")
    return "\n".join(lines)


# -- checking one answer ----------------------------------------------------------------------

def check_weights(raw: Any, names: list[str], bound: float,
                  partial: bool = False) -> tuple[dict[str, float], list[str]]:
    """One finite number per name (keys matched exactly, else ignoring case and punctuation); values
    beyond +-bound are clamped and reported. Missing names raise WeightParseError, unless `partial`
    and at least one name was answered (the caller then asks again for the rest)."""
    if not isinstance(raw, dict):
        raise WeightParseError(f"weights is a {type(raw).__name__}, not a mapping")

    def key(s: str) -> str:
        return "".join(ch for ch in str(s).lower() if ch.isalnum())

    loose = {key(k): v for k, v in raw.items()}
    out, clamped, missing = {}, [], []
    for name in names:
        v = raw.get(name, loose.get(key(name)))
        if v is None:
            missing.append(name)
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise WeightParseError(f"weight for '{name}' is not a number: {v!r}") from None
        if not math.isfinite(x):
            raise WeightParseError(f"weight for '{name}' is not finite: {v!r}")
        if abs(x) > bound:
            clamped.append(f"{name}: {x:g} -> {math.copysign(bound, x):g}")
            x = math.copysign(bound, x)
        out[name] = x
    if missing and not (partial and out):
        raise WeightParseError(f"no weight for {len(missing)} of {len(names)} features: {missing}")
    return out, clamped


# -- the program ------------------------------------------------------------------------------

class LLMHyper(dspy.Module):
    """One ad in, one weight per feature out (with spread, reasoning, judge verdict and failures)."""

    def __init__(self, config: ProgramConfig | None = None):
        super().__init__()
        self.config = config or ProgramConfig()
        # a short rationale: long ones from small models loop and get cut at max_tokens
        self.predict_weights = dspy.ChainOfThought(PredictFeatureWeights, rationale_field=dspy.OutputField(
            desc="at most two short sentences: who will click this ad, and which of these features matter"))
        self.judge = dspy.Predict(JudgeWeights)

    def batches(self, features: list[dict[str, str]]) -> list[list[dict[str, str]]]:
        b = self.config.batch_size
        return [features[i:i + b] for i in range(0, len(features), b)]

    def _sample_batch(self, ad_txt: str, ex_txt: str, batch: list[dict[str, str]], examples: list[dict[str, Any]],
                      tag: str) -> dict[str, Any]:
        """One sample of one batch; an unparseable answer is retried, and an answer that covers only some
        features is kept while the next attempt asks for the rest. Never raises for LLM trouble."""
        cfg = self.config
        attempts: list[dict[str, Any]] = []
        weights: dict[str, float] = {}
        reasoning: list[str] = []
        for attempt in range(cfg.max_attempts):
            pending = [f for f in batch if f["name"] not in weights]
            names = [f["name"] for f in pending]
            rollout = f"{tag}-a{attempt}"
            # the very first call is greedy (temperature 0, cached); samples and retries must differ
            config = ({} if rollout == "s0-a0" else
                      {"rollout_id": rollout, "temperature": cfg.sample_temperature})
            try:
                pred = self.predict_weights(ad=ad_txt, examples=ex_txt, features=format_features(pending, examples),
                                            config=config)
                got, clamped = check_weights(pred.weights, names, cfg.weight_bound, partial=True)
            except (dspy.utils.exceptions.AdapterParseError, WeightParseError) as exc:
                attempts.append({"ok": False, "asked": len(names), "reason": f"{type(exc).__name__}: {_short(exc)}"})
                continue
            weights.update(got)
            reasoning.append(str(pred.reasoning).strip())
            missing = [n for n in names if n not in got]
            attempts.append({"ok": not missing, "asked": len(names), "clamped": clamped,
                             **({"reason": f"no weight for {missing}"} if missing else {})})
            if not missing:
                return {"ok": True, "weights": weights, "reasoning": " ".join(reasoning), "attempts": attempts}
        last = attempts[-1]["reason"] if attempts else "no attempt"
        return {"ok": False, "weights": weights, "reasoning": " ".join(reasoning), "attempts": attempts,
                "reason": last}

    def _run_batch(self, ad_txt: str, ex_txt: str, batch: list[dict[str, str]], examples: list[dict[str, Any]],
                   round_tag: str) -> dict[str, Any]:
        samples = [self._sample_batch(ad_txt, ex_txt, batch, examples, f"{round_tag}s{s}" if round_tag else f"s{s}")
                   for s in range(self.config.n_samples)]
        return {"features": [f["name"] for f in batch], "samples": samples}

    def forward(self, ad: dict[str, Any], examples: list[dict[str, Any]],
                features: list[dict[str, str]]) -> dspy.Prediction:
        # one LM call per attempt: our own retry (a new rollout) replaces DSPy's JSON-adapter fallback call,
        # so every failed call is counted and logged with its reason
        if dspy.settings.adapter is None:
            with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
                return self._forward(ad, examples, features)
        return self._forward(ad, examples, features)

    def _forward(self, ad: dict[str, Any], examples: list[dict[str, Any]],
                 features: list[dict[str, str]]) -> dspy.Prediction:
        cfg = self.config
        ad_txt = format_ad(ad, cfg.hide_titles)
        ex_txt = format_examples(examples, cfg.hide_titles)
        batches = [self._run_batch(ad_txt, ex_txt, b, examples, "") for b in self.batches(features)]
        judge_rounds: list[dict[str, Any]] = []
        flags: list[str] = []
        if cfg.use_judge:
            for round_no in range(cfg.max_regenerations + 1):
                verdict = self._judge(ad_txt, features, batches)
                judge_rounds.append(verdict)
                flags = sorted(set(flags) | set(verdict.get("improper_features", [])))
                bad = set(verdict.get("inconsistent_features", []))
                if not bad or round_no == cfg.max_regenerations:
                    break
                for i, b in enumerate(batches):  # regenerate only the batches holding rejected features
                    if bad & set(b["features"]):
                        fresh = self._run_batch(ad_txt, ex_txt, [f for f in features if f["name"] in b["features"]],
                                                examples, f"r{round_no + 1}")
                        fresh["regenerated_for"] = sorted(bad & set(b["features"]))
                        batches[i] = fresh
        return self._summarise(features, batches, judge_rounds, flags)

    def _judge(self, ad_txt: str, features: list[dict[str, str]], batches: list[dict[str, Any]]) -> dict[str, Any]:
        reasoning, weights = [], {}
        for b in batches:
            first = next((s for s in b["samples"] if s.get("weights")), None)
            if first:
                reasoning.append(first["reasoning"])
                weights.update({k: round(v, 3) for k, v in first["weights"].items()})
        if not weights:
            return {"ok": False, "reason": "no weights to judge"}
        names = {f["name"] for f in features}
        # short definitions keep the judge's prompt (which shares no prefix with the weight calls) small
        feat_txt = "\n".join(f"- {f['name']}: {_first_clause(f['description'])}" for f in features
                             if f["name"] in weights)
        try:
            v = self.judge(ad=ad_txt, features=feat_txt, reasoning="\n".join(reasoning), weights=weights)
        except dspy.utils.exceptions.AdapterParseError as exc:
            return {"ok": False, "reason": f"AdapterParseError: {_short(exc)}"}
        return {"ok": True,
                "inconsistent_features": sorted({str(x) for x in (v.inconsistent_features or [])} & names),
                "improper_features": sorted({str(x) for x in (v.improper_features or [])} & names),
                "unknown_names": sorted({str(x) for x in (v.inconsistent_features or []) + (v.improper_features or [])}
                                        - names)}

    def _summarise(self, features, batches, judge_rounds, flags) -> dspy.Prediction:
        weights, spread, n_ok, failed = {}, {}, {}, {}
        for b in batches:
            for name in b["features"]:
                vals = [s["weights"][name] for s in b["samples"] if name in s.get("weights", {})]
                if vals:
                    weights[name] = float(np.mean(vals))
                    spread[name] = float(np.std(vals))
                    n_ok[name] = len(vals)
                else:
                    failed[name] = next((s.get("reason") for s in b["samples"] if not s["ok"]), "no sample")
        attempts = [a for b in batches for s in b["samples"] for a in s["attempts"]]
        return dspy.Prediction(
            weights=weights, spread=spread, n_samples_ok=n_ok, failed_features=failed,
            reasoning=[next((s["reasoning"] for s in b["samples"] if s.get("reasoning")), "") for b in batches],
            batches=batches, judge=judge_rounds, flags=flags,
            calls=len(attempts), parse_failures=sum(not a["ok"] for a in attempts),
            config=asdict(self.config))


def _first_clause(text: str, n: int = 60) -> str:
    head = text.split(" (")[0].split("; ")[0]
    return head if len(head) <= n else head[:n].rsplit(" ", 1)[0] + "..."


def _short(exc: Exception, n: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + "..."
