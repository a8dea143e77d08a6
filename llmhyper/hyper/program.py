"""The LLM-HYPER prompt program: few-shot demonstrations -> batched chain-of-thought weight prediction ->
averaged samples -> LLM judge -> regeneration of what the judge rejects.

Retrieval happens before the program (its neighbours are inputs), because it does not depend on prompts:
GEPA can then evolve the instructions without re-running faiss. Everything numeric after the LLM (clamping
here; normalisation and calibration in `normalize`) is code, never left to the model.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dspy
import numpy as np

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.hyper.signatures import JudgeWeights, PredictFeatureWeights, PredictFeatureWeightsWithImage
from llmhyper.paths import PROGRAMS
from llmhyper.store import read_json

DEFAULT_PROGRAM = PROGRAMS / "zero_shot.json"  # the paper's prompt, not compiled


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
    vision: bool = (
        False  # the LM sees images: the ad's image goes into the prompt (the paper's multimodal input)
    )

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("n_samples", 1), ("max_attempts", 1), ("max_regenerations", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LLMHyperError(f"program setting {name} must be a whole number >= {low}, got {value!r}")
        for name in ("weight_bound", "sample_temperature"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (name == "weight_bound" and value == 0)
            ):
                raise LLMHyperError(f"program setting {name} must be a finite number > 0, got {value!r}")


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


def ad_image(ad: dict[str, Any]) -> Any:
    """The ad's image as a `dspy.Image` for a vision LM (None without one: the caption stands in)."""
    return dspy.Image.from_path(str(ad["image"])) if ad.get("image") else None


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
        trained = ", ".join(
            f"Example {i} {ex['weights'][f['name']]:+.2f}"
            for i, ex in enumerate(examples, 1)
            if f["name"] in ex["weights"]
        )
        lines.append(
            f"- {f['name']}: {f['description']}." + (f" Trained weights: {trained}." if trained else "")
        )
    lines.append("Write exactly these keys: " + ", ".join(f["name"] for f in batch) + ".")
    return "\n".join(lines)


# -- checking one answer ----------------------------------------------------------------------


def check_weights(
    raw: Any, names: list[str], bound: float, partial: bool = False
) -> tuple[dict[str, float], list[str]]:
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

    def __init__(self, config: ProgramConfig | None = None, judge_lm: Any = None):
        """`judge_lm`: the LM of the judge calls (None: the LM of the context, like the weight calls)."""
        super().__init__()
        self.config = config or ProgramConfig()
        self.judge_lm = judge_lm
        # a short rationale: long ones from small models loop and get cut at max_tokens
        self.predict_weights = dspy.ChainOfThought(
            PredictFeatureWeightsWithImage if self.config.vision else PredictFeatureWeights,
            rationale_field=dspy.OutputField(
                desc="at most two short sentences: who will click this ad, and which of these features matter"
            ),
        )
        self.judge = dspy.Predict(JudgeWeights)

    def __deepcopy__(self, memo: dict) -> LLMHyper:
        # copies of the program (GEPA makes many) share the judge LM, whose history the run's usage counts
        if self.judge_lm is not None:
            memo[id(self.judge_lm)] = self.judge_lm
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def batches(self, features: list[dict[str, str]]) -> list[list[dict[str, str]]]:
        b = self.config.batch_size
        return [features[i : i + b] for i in range(0, len(features), b)]

    def _sample_batch(
        self,
        ad_txt: str,
        ex_txt: str,
        batch: list[dict[str, str]],
        examples: list[dict[str, Any]],
        tag: str,
        image: Any = None,
    ) -> dict[str, Any]:
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
            config = (
                {} if rollout == "s0-a0" else {"rollout_id": rollout, "temperature": cfg.sample_temperature}
            )
            try:
                seen = {"image": image} if self.config.vision else {}
                pred = self.predict_weights(
                    ad=ad_txt,
                    examples=ex_txt,
                    features=format_features(pending, examples),
                    config=config,
                    **seen,
                )
                got, clamped = check_weights(pred.weights, names, cfg.weight_bound, partial=True)
            except (dspy.utils.exceptions.AdapterParseError, WeightParseError) as exc:
                attempts.append(
                    {"ok": False, "asked": len(names), "reason": f"{type(exc).__name__}: {_short(exc)}"}
                )
                continue
            weights.update(got)
            reasoning.append(str(pred.reasoning).strip())
            missing = [n for n in names if n not in got]
            attempts.append(
                {
                    "ok": not missing,
                    "asked": len(names),
                    "clamped": clamped,
                    **({"reason": f"no weight for {missing}"} if missing else {}),
                }
            )
            if not missing:
                return {
                    "ok": True,
                    "weights": weights,
                    "reasoning": " ".join(reasoning),
                    "attempts": attempts,
                }
        last = attempts[-1]["reason"] if attempts else "no attempt"
        return {
            "ok": False,
            "weights": weights,
            "reasoning": " ".join(reasoning),
            "attempts": attempts,
            "reason": last,
        }

    def _run_batch(
        self,
        ad_txt: str,
        ex_txt: str,
        batch: list[dict[str, str]],
        examples: list[dict[str, Any]],
        round_tag: str,
        image: Any = None,
    ) -> dict[str, Any]:
        samples = [
            self._sample_batch(
                ad_txt, ex_txt, batch, examples, f"{round_tag}s{s}" if round_tag else f"s{s}", image
            )
            for s in range(self.config.n_samples)
        ]
        return {"features": [f["name"] for f in batch], "samples": samples}

    def forward(
        self, ad: dict[str, Any], examples: list[dict[str, Any]], features: list[dict[str, str]]
    ) -> dspy.Prediction:
        # one LM call per attempt: our own retry (a new rollout) replaces DSPy's JSON-adapter fallback call,
        # so every failed call is counted and logged with its reason
        if dspy.settings.adapter is None:
            with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
                return self._forward(ad, examples, features)
        return self._forward(ad, examples, features)

    def _forward(
        self, ad: dict[str, Any], examples: list[dict[str, Any]], features: list[dict[str, str]]
    ) -> dspy.Prediction:
        cfg = self.config
        ad_txt = format_ad(ad, cfg.hide_titles)
        ex_txt = format_examples(examples, cfg.hide_titles)
        image = ad_image(ad) if cfg.vision else None
        batches = [self._run_batch(ad_txt, ex_txt, b, examples, "", image) for b in self.batches(features)]
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
                        fresh = self._run_batch(
                            ad_txt,
                            ex_txt,
                            [f for f in features if f["name"] in b["features"]],
                            examples,
                            f"r{round_no + 1}",
                            image,
                        )
                        fresh["regenerated_for"] = sorted(bad & set(b["features"]))
                        batches[i] = fresh
        return self._summarise(features, batches, judge_rounds, flags)

    def _judge(
        self, ad_txt: str, features: list[dict[str, str]], batches: list[dict[str, Any]]
    ) -> dict[str, Any]:
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
        feat_txt = "\n".join(
            f"- {f['name']}: {_first_clause(f['description'])}" for f in features if f["name"] in weights
        )
        try:
            with dspy.context(lm=self.judge_lm) if self.judge_lm is not None else nullcontext():
                v = self.judge(ad=ad_txt, features=feat_txt, reasoning="\n".join(reasoning), weights=weights)
        except dspy.utils.exceptions.AdapterParseError as exc:
            return {"ok": False, "reason": f"AdapterParseError: {_short(exc)}"}
        return {
            "ok": True,
            "inconsistent_features": sorted({str(x) for x in (v.inconsistent_features or [])} & names),
            "improper_features": sorted({str(x) for x in (v.improper_features or [])} & names),
            "unknown_names": sorted(
                {str(x) for x in (v.inconsistent_features or []) + (v.improper_features or [])} - names
            ),
        }

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
            weights=weights,
            spread=spread,
            n_samples_ok=n_ok,
            failed_features=failed,
            reasoning=[
                next((s["reasoning"] for s in b["samples"] if s.get("reasoning")), "") for b in batches
            ],
            batches=batches,
            judge=judge_rounds,
            flags=flags,
            calls=len(attempts),
            parse_failures=sum(not a["ok"] for a in attempts),
            config=asdict(self.config),
        )


# -- program files ----------------------------------------------------------------------------


def load_program(
    path: str | Path | None, config: ProgramConfig | None = None, judge_lm: Any = None
) -> LLMHyper:
    """A program with the state saved in `path` (None: the signatures' own instructions). A file that is
    not such a state (missing, a folder, cut short, empty, a list, wrong or missing keys, a non-string
    instruction, an LM inside) is a one-line DataError, raised before anything is run."""
    program = LLMHyper(config, judge_lm=judge_lm)
    if path is None:
        return program
    path = Path(path)
    if path.is_dir():
        raise DataError("a program JSON file is expected, found a folder", file=str(path))
    if not path.is_file():
        raise DataError("program file not found", file=str(path))
    state = read_json(path, "program")
    _check_program_state(program, state, str(path))
    try:
        program.load_state(state)
    except Exception as exc:  # dspy raises many kinds for a state that does not fit
        raise DataError(
            f"not a state of this program ({type(exc).__name__}: {_short(exc, 120)})", file=str(path)
        ) from None
    return program


_PREDICTOR_KEYS = {"traces", "train", "demos", "signature", "lm", "fields"}


def _check_program_state(program: LLMHyper, state: Any, file: str) -> None:
    predictors = dict(program.named_predictors())
    if not isinstance(state, dict):
        raise DataError(
            f"expected a JSON object with the predictors {sorted(predictors)}, found a "
            f"{type(state).__name__}",
            file=file,
        )
    unknown = sorted(set(state) - set(predictors) - {"metadata"})
    missing = sorted(set(predictors) - set(state))
    if missing or unknown:
        raise DataError(f"not an LLM-HYPER program: missing {missing}, unknown {unknown}", file=file)
    for name, predictor in predictors.items():
        part = state[name]
        if not isinstance(part, dict):
            raise DataError("expected an object", file=file, field=name)
        extra = sorted(set(part) - _PREDICTOR_KEYS)
        if extra:  # dspy would set them as attributes of the predictor
            raise DataError(f"unknown keys {extra}", file=file, field=name)
        sig = part.get("signature")
        if not isinstance(sig, dict) or not isinstance(sig.get("instructions"), str):
            raise DataError(
                "the instructions must be a string", file=file, field=f"{name}.signature.instructions"
            )
        fields = sig.get("fields")
        n_fields = len(predictor.signature.fields)
        if not isinstance(fields, list) or len(fields) != n_fields:
            raise DataError(
                f"expected a list of {n_fields} fields", file=file, field=f"{name}.signature.fields"
            )
        for i, f in enumerate(fields):
            if not (
                isinstance(f, dict)
                and isinstance(f.get("prefix"), str)
                and isinstance(f.get("description"), str)
            ):
                raise DataError(
                    "each field needs a string prefix and description",
                    file=file,
                    field=f"{name}.signature.fields[{i}]",
                )
        for key in ("demos", "traces", "train"):
            if not isinstance(part.get(key, []), list):
                raise DataError("expected a list", file=file, field=f"{name}.{key}")
        if part.get("lm") is not None:
            raise DataError(
                "a program must not carry an LM (the run's --lm decides)", file=file, field=f"{name}.lm"
            )
        if "lm" not in part:
            part["lm"] = None  # dspy reads it
    meta = state.get("metadata", {})
    if not isinstance(meta, dict):
        raise DataError("expected an object", file=file, field="metadata")


def _first_clause(text: str, n: int = 60) -> str:
    head = text.split(" (")[0].split("; ")[0]
    return head if len(head) <= n else head[:n].rsplit(" ", 1)[0] + "..."


def _short(exc: Exception, n: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + "..."
