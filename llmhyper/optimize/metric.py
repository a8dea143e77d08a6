"""The GEPA metric: how well the weights the program wrote for a retired ad (treated as cold) rank the ad's
held-out impressions, and a feedback text for the reflection LM.

One metric call is one program run on one ad. The score is the AUC of the calibrated weights (`finish_ad`) on
the ad's impressions by the data set's TEST users; the feedback compares the weights with those the ad's own
model learned from real clicks, naming wrong signs and large errors with their values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import dspy
import numpy as np

from llmhyper.ctr.metrics import auc
from llmhyper.ctr.prepare import Prepared
from llmhyper.hyper.views import finish_ad

SIGN_TOL = 0.05  # trained weights smaller than this do not count for sign agreement
QUOTE_CHARS = 400


@dataclass
class Assessment:
    """How one generated weight vector compares with the ad's held-out clicks and its trained weights."""

    ad_id: str
    status: str  # ok | partial | failed
    score: float
    auc: float | None = None
    n_impressions: int = 0
    n_clicks: int = 0
    n_features: int = 0
    n_parsed: int = 0
    sign_agreement: float | None = None  # share of features with |trained| >= SIGN_TOL whose sign matches
    n_sign_checked: int = 0
    cosine: float | None = None  # raw (prior-filled) weights vs trained weights
    wrong_signs: list[tuple[str, float, float]] = field(default_factory=list)  # (feature, yours, trained)
    largest_errors: list[tuple[str, float, float]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "ad_id": self.ad_id,
            "status": self.status,
            "score": rounded(self.score),
            "auc": rounded(self.auc),
            "sign_agreement": rounded(self.sign_agreement),
            "cosine": rounded(self.cosine),
            "n_impressions": self.n_impressions,
            "n_clicks": self.n_clicks,
            "parsed": f"{self.n_parsed}/{self.n_features}",
            "wrong_signs": [f for f, _, _ in self.wrong_signs],
            "error": self.error,
        }


def rounded(x: float | None, n: int = 4) -> float | None:
    """A score as stored in the logs and the manifest: 4 decimals, None for missing or NaN."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), n)


def _fmt(x: float) -> str:
    return f"{x:+.2f}"


def _quote(text: str, n: int = QUOTE_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def _batch_names(features_text: str) -> list[str]:
    return re.findall(r"^- ([A-Za-z_][\w'\-]*):", str(features_text or ""), re.MULTILINE)


class CTRFeedbackMetric:
    """GEPA metric: (gold, pred, trace, pred_name, pred_trace) -> dspy.Prediction(score, feedback).

    score: AUC in [0, 1] (0.5 = random) of the calibrated weights (`finish_ad`) on the ad's held-out
    impressions (test users), times the share of features the LLM answered (the rest come from the k-NN
    prior); 0 when nothing parsed. feedback: for `predict_weights.predict` the features of the judged batch
    with wrong signs or the largest errors against the ad's trained weights, with values, and the reasoning
    quoted; for `judge` its false alarms and misses. Never raises: trouble scores 0 and says why.
    """

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.names = prep.data.feature_names
        self._truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.last: dict[str, Assessment] = {}

    # -- numbers --------------------------------------------------------------------------------------
    def truth(self, ad_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X of the test users shown the ad, their clicks, the ad's trained weights)."""
        if ad_id not in self._truth:
            data, pool = self.prep.data, self.prep.retired
            j = data.ad_index[ad_id]
            users = data.test_users[data.M[data.test_users, j]]
            y = data.Y[users, j].astype(np.float64)
            trained = pool.aligned(self.names).theta[pool.index_of([ad_id])[0]]
            self._truth[ad_id] = (data.X[users], y, trained)
        return self._truth[ad_id]

    def assess(self, ad_id: str, pred) -> Assessment:
        X, y, trained = self.truth(ad_id)
        n = len(self.names)
        raw = {k: float(v) for k, v in dict(getattr(pred, "weights", None) or {}).items() if k in self.names}
        failed = {str(k): str(v) for k, v in dict(getattr(pred, "failed_features", None) or {}).items()}
        for f in self.names:
            if f not in raw and f not in failed:
                failed[f] = "no weight in the answer"
        a = Assessment(
            ad_id,
            "failed",
            0.0,
            n_impressions=len(y),
            n_clicks=int(y.sum()),
            n_features=n,
            n_parsed=len(raw),
            failed=failed,
        )
        if not raw:
            return a
        fin = finish_ad(self.prep, ad_id, _WeightsOnly(raw), self.names)
        theta = np.array([fin["normalized_weights"][f] for f in self.names])
        value = auc(y, X @ theta + fin["delta"])
        a.auc = None if math.isnan(value) else value
        a.status = "ok" if len(raw) == n else "partial"
        a.score = (0.5 if a.auc is None else a.auc) * (len(raw) / n)
        full = np.array([raw.get(f, fin["filled_from_knn_prior"].get(f, 0.0)) for f in self.names])
        denom = float(np.linalg.norm(full) * np.linalg.norm(trained))
        a.cosine = float(full @ trained / denom) if denom > 0 else 0.0
        checked = [
            (f, raw[f], float(t))
            for f, t in zip(self.names, trained, strict=True)
            if f in raw and abs(t) >= SIGN_TOL
        ]
        a.n_sign_checked = len(checked)
        if checked:
            agree = [np.sign(v) == np.sign(t) for _, v, t in checked]
            a.sign_agreement = float(np.mean(agree))
            a.wrong_signs = sorted(
                [c for c, ok in zip(checked, agree, strict=True) if not ok], key=lambda c: -abs(c[2])
            )
        wrong = {f for f, _, _ in a.wrong_signs}
        errs = [
            (f, raw[f], float(t))
            for f, t in zip(self.names, trained, strict=True)
            if f in raw and f not in wrong
        ]
        a.largest_errors = sorted(errs, key=lambda c: -abs(c[1] - c[2]))[:3]
        return a

    # -- GEPA entry point ------------------------------------------------------------------------------
    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        ad_id = str(getattr(gold, "ad_id", "") or gold.get("ad_id", ""))
        try:
            a = self.assess(ad_id, pred)
        except Exception as exc:  # a metric must never stop the optimiser
            a = Assessment(ad_id, "failed", 0.0, error=f"{type(exc).__name__}: {exc}")
            return dspy.Prediction(
                score=0.0,
                assessment=a.summary(),
                feedback=f"Score 0: the weights could not be scored ({a.error}).",
            )
        self.last[ad_id] = a
        try:
            if pred_name == "judge":
                feedback = self.judge_feedback(a, pred)
            else:
                feedback = self.weights_feedback(a, pred, pred_trace)
        except Exception as exc:  # pragma: no cover - feedback is best effort, the score stands
            feedback = f"Score {a.score:.3f} (feedback unavailable: {type(exc).__name__}: {exc})"
        return dspy.Prediction(score=float(a.score), feedback=feedback, assessment=a.summary())

    # -- feedback texts --------------------------------------------------------------------------------
    def _head(self, a: Assessment) -> list[str]:
        auc_txt = f"{a.auc:.3f}" if a.auc is not None else "n/a"
        lines = [
            (
                f"Score {a.score:.3f} = AUC {auc_txt} of the calibrated weights on this ad's "
                f"{a.n_impressions} held-out impressions ({a.n_clicks} clicks); 0.5 is random guessing, "
                "1.0 a perfect ranking."
            )
        ]
        if a.status == "partial":
            lines[0] += (
                f" Only {a.n_parsed} of {a.n_features} weights could be read, so the score is "
                f"scaled by {a.n_parsed}/{a.n_features}."
            )
        if a.sign_agreement is not None:
            lines.append(
                f"Against the weights this ad's own model learned from real clicks: the sign is "
                f"right for {round(a.sign_agreement * a.n_sign_checked)} of {a.n_sign_checked} "
                f"features that matter (|trained| >= {SIGN_TOL}); cosine similarity "
                f"{a.cosine:+.2f}."
            )
        return lines

    def _failure_lines(self, a: Assessment, names: list[str] | None = None) -> list[str]:
        failed = {f: r for f, r in a.failed.items() if names is None or f in names}
        if not failed:
            return []
        reasons = sorted(set(failed.values()))
        return [
            (
                f"No usable weight for {len(failed)} feature(s) ({', '.join(list(failed)[:8])}"
                f"{', ...' if len(failed) > 8 else ''}): {'; '.join(_quote(r, 160) for r in reasons[:2])}. "
                "Answer with `weights` as ONE JSON object that maps every feature name of the batch, "
                "spelled exactly, to one plain number."
            )
        ]

    def weights_feedback(self, a: Assessment, pred, pred_trace=None) -> str:
        if a.status == "failed":
            return " ".join(
                [
                    (
                        f"Score 0: no weights could be read from the answers for any of the "
                        f"{a.n_features} features, so this ad got no model at all."
                    )
                ]
                + self._failure_lines(a)
            )
        _, _, trained_vec = self.truth(a.ad_id)
        trained = dict(zip(self.names, trained_vec.tolist(), strict=True))
        names, weights, reasoning = None, None, None
        if pred_trace:  # feedback for the one call GEPA shows the reflection LM
            try:
                _, inputs, outputs = pred_trace[0]
                names = _batch_names(inputs.get("features", "")) or None
                weights = {k: float(v) for k, v in dict(outputs.get("weights") or {}).items()}
                reasoning = outputs.get("reasoning")
            except Exception:
                names, weights, reasoning = None, None, None
        lines = self._head(a)
        if names:
            wrong = [
                (f, weights.get(f), trained[f])
                for f in names
                if f in weights and abs(trained[f]) >= SIGN_TOL and np.sign(weights[f]) != np.sign(trained[f])
            ]
            wrong.sort(key=lambda c: -abs(c[2]))
            flipped = {w[0] for w in wrong}
            rest = [(f, weights[f], trained[f]) for f in names if f in weights and f not in flipped]
            errors = sorted(rest, key=lambda c: -abs(c[1] - c[2]))[:3]
            lines.append(f"In this batch of {len(names)} features:")
        else:
            wrong, errors = a.wrong_signs, a.largest_errors
        if wrong:
            shown = "; ".join(f"{f} {_fmt(v)} vs {_fmt(t)}" for f, v, t in wrong[:6])
            lines.append(f"Wrong sign (your weight vs trained): {shown}{'; ...' if len(wrong) > 6 else ''}.")
        else:
            lines.append("No feature that matters has the wrong sign.")
        if errors:
            lines.append(
                "Largest errors (your weight vs trained): "
                + "; ".join(f"{f} {_fmt(v)} vs {_fmt(t)} (off by {abs(v - t):.2f})" for f, v, t in errors)
                + "."
            )
        lines += self._failure_lines(a, names)
        if reasoning is None:
            worst = wrong[0][0] if wrong else (errors[0][0] if errors else None)
            reasoning = self._reasoning_for(pred, worst)
        if reasoning:
            lines.append(f'The reasoning that led there: "{_quote(reasoning)}"')
        return "\n".join(lines)

    @staticmethod
    def _reasoning_for(pred, feature: str | None) -> str:
        batches = list(getattr(pred, "batches", None) or [])
        texts = list(getattr(pred, "reasoning", None) or [])
        for i, b in enumerate(batches):
            if feature is not None and feature in b.get("features", []) and i < len(texts):
                return texts[i]
        return next((t for t in texts if t), "")

    def judge_feedback(self, a: Assessment, pred) -> str:
        _, _, trained_vec = self.truth(a.ad_id)
        trained = dict(zip(self.names, trained_vec.tolist(), strict=True))
        rounds = [r for r in (getattr(pred, "judge", None) or []) if isinstance(r, dict)]
        lines = [
            f"The weights you reviewed led to score {a.score:.3f} (AUC on held-out clicks; 0.5 is random)."
        ]
        if not rounds or not rounds[0].get("ok"):
            reason = rounds[0].get("reason") if rounds else "the judge did not run"
            return " ".join(lines + [f"Your review could not be read ({reason}). Answer every output field."])
        first = self._first_weights(pred)
        flagged = list(rounds[0].get("inconsistent_features") or [])
        if flagged:
            parts = []
            for f in flagged:
                if f not in first or f not in trained:
                    continue
                right = abs(trained[f]) < SIGN_TOL or np.sign(first[f]) == np.sign(trained[f])
                verdict = (
                    "its sign was right, a false alarm that cost a regeneration"
                    if right
                    else "wrong sign, a good catch"
                )
                parts.append(f"{f} ({_fmt(first[f])}, trained {_fmt(trained[f])}: {verdict})")
            lines.append("You flagged as inconsistent: " + "; ".join(parts) + ".")
        else:
            lines.append("You flagged no feature as inconsistent.")
        missed = [
            f
            for f, v in first.items()
            if f in trained
            and abs(trained[f]) >= SIGN_TOL
            and np.sign(v) != np.sign(trained[f])
            and f not in flagged
        ]
        if missed:
            lines.append(
                "You missed weights with the wrong sign: "
                + "; ".join(f"{f} {_fmt(first[f])} vs trained {_fmt(trained[f])}" for f in missed[:6])
                + "."
            )
        improper = rounds[0].get("improper_features") or []
        if improper:
            lines.append(f"You called these pairings improper: {', '.join(improper)}.")
        return "\n".join(lines)

    @staticmethod
    def _first_weights(pred) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in getattr(pred, "batches", None) or []:
            first = next((s for s in b.get("samples", []) if s.get("weights")), None)
            if first:
                out.update({k: float(v) for k, v in first["weights"].items()})
        return out or {k: float(v) for k, v in dict(getattr(pred, "weights", None) or {}).items()}


class _WeightsOnly:
    def __init__(self, weights: dict[str, float]):
        self.weights = weights
