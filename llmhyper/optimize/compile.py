"""`llmhyper compile`: evolve the program's instructions with GEPA, scored on retired ads treated as cold.

A *recipe* (`optimizers/<name>.toml`, validated by `load_recipe` before any LLM call) names the data set, which
retired (warm) ads train the optimiser and which validate it, the budget, the task and reflection LMs, the
predictors to evolve and the program's settings. For every training or validation ad the program runs as if
the ad were new: it does not retrieve itself (`Prepared.neighbours_of` excludes it), writes the weights, and
`finish_ad` normalises and calibrates them. The metric (`CTRFeedbackMetric`) scores them by AUC on the ad's
held-out impressions (the data set's TEST users) and compares them with the weights the ad's own model learned
from real clicks, which gives GEPA a feedback text naming wrong signs and large errors with their values.

Outputs, for `--out programs/` and a recipe `optimizers/NAME.toml`:

    programs/NAME.json                 the compiled program (`LLMHyper().load(...)`, `generate --program`)
    programs/NAME.manifest.json        LMs, data, split ids, val score before/after, budget, time, tokens, git
    programs/NAME.evolution/           the evolution log in our own JSON format (see `llmhyper evolution`):
        config.json                    the resolved settings (a rerun with other settings is refused)
        candidates.json                every candidate: instructions per predictor, parents, per-ad val scores
        pareto.json                    the per-ad Pareto front
        iterations.jsonl               per iteration: parent, minibatch, reflective dataset with feedback,
                                       the reflection prompt and reply, scores before/after, outcome
        events.jsonl                   every GEPA callback event (compact), plus run start/end
        gepa/                          GEPA's own run dir (pickled state, used to resume) and the LM cache

Rerunning the same command resumes: GEPA reloads its state from `gepa/` and the LM cache in `gepa/lm_cache/`
answers every call already made, so a killed compile continues where it stopped without paying again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.store import file_sha256, git_commit, now, versions, write_json_atomic

PREDICTORS = ("predict_weights.predict", "judge")
SIGN_TOL = 0.05  # trained weights smaller than this do not count for sign agreement
QUOTE_CHARS = 400


# =====================================================================================================
# Recipes
# =====================================================================================================

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticOptions(_Section):
    n_users: int = Field(400, ge=20)
    n_warm: int = Field(60, ge=4)
    n_cold: int = Field(12, ge=0)


class DataSection(_Section):
    dataset: Literal["movielens-100k", "synthetic", "folder"]
    path: str | None = None  # the folder, for dataset = "folder"
    posters: str | None = None  # MovieLens poster folder ("auto": the team's shared folder)
    seed: int = 0  # user split and calibration sample
    k: int = Field(3, ge=1, le=20)  # neighbours retrieved per ad
    encoder: str = "minilm-effnet-conse"
    synthetic: SyntheticOptions | None = None


class SplitSection(_Section):
    n_train: int | None = Field(None, ge=1)
    n_val: int | None = Field(None, ge=1)
    train_ids: list[str] | None = None
    val_ids: list[str] | None = None
    seed: int | None = None  # seed of the selection (default: data.seed)
    min_test_clicks: int = Field(10, ge=1)  # an ad is eligible with this many clicks by test users ...
    min_test_nonclicks: int = Field(10, ge=1)  # ... and this many impressions without a click

    @field_validator("train_ids", "val_ids", mode="before")
    @classmethod
    def _ids_as_str(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) else x for x in v]
        return v

    @field_validator("train_ids", "val_ids")
    @classmethod
    def _no_duplicates(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("an id list must not be empty (leave it out to select by count)")
            dup = sorted({a for a in v if v.count(a) > 1})
            if dup:
                raise ValueError(f"duplicate ad ids {dup}")
        return v


class LMSection(_Section):
    spec: str = "embedded"  # "embedded" or a DSPy model string ("openai/gpt-4o", "hosted_vllm/...")
    api_base: str | None = None
    api_key_env: str | None = None  # name of the environment variable that holds the API key
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(320, ge=16)
    threads: int = Field(2, ge=1)  # CPU threads of the embedded LLM server
    n_ctx: int = Field(4096, ge=1024)  # context of the embedded LLM server
    cache: bool = True  # DSPy response cache in the evolution folder (what makes resume free)
    timeout: float = Field(900.0, gt=0)

    @field_validator("spec")
    @classmethod
    def _spec(cls, v: str) -> str:
        if v != "embedded" and "/" not in v:
            raise ValueError(f"'{v}' is not an LM: use 'embedded' or a DSPy model string like 'openai/gpt-4o'")
        return v


def _reflection_defaults() -> LMSection:
    return LMSection(temperature=1.0, max_tokens=1024, n_ctx=8192)


class GEPASection(_Section):
    max_metric_calls: int = Field(ge=1)  # one metric call = one program run on one ad
    reflection_minibatch_size: int = Field(3, ge=1)
    predictors: list[str] = Field(default_factory=lambda: ["predict_weights.predict"])
    component_selector: Literal["round_robin", "all"] = "round_robin"
    candidate_selection: Literal["pareto", "current_best"] = "pareto"
    use_merge: bool = False
    max_merge_invocations: int = Field(5, ge=0)
    num_threads: int = Field(1, ge=1)  # program runs at once (the embedded server serves one at a time)
    seed: int = 0

    @field_validator("predictors")
    @classmethod
    def _predictors(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"name at least one predictor to optimise: {list(PREDICTORS)}")
        bad = [p for p in v if p not in PREDICTORS]
        if bad:
            raise ValueError(f"unknown predictor(s) {bad}; the program has {list(PREDICTORS)}")
        if len(set(v)) != len(v):
            raise ValueError("a predictor is listed twice")
        return v


class ProgramSection(_Section):
    batch_size: int = Field(10, ge=1)  # features per LLM call
    samples: int = Field(1, ge=1)  # samples per batch, averaged
    judge: bool = True
    hide_titles: bool = False
    max_attempts: int = Field(3, ge=1)
    base: str | None = None  # a program JSON to start from (default: the signatures' instructions)


class Recipe(_Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    estimated_hours: float | None = None  # documentation only
    data: DataSection
    split: SplitSection
    task_lm: LMSection = Field(default_factory=LMSection)
    reflection_lm: LMSection = Field(default_factory=_reflection_defaults)
    gepa: GEPASection
    program: ProgramSection = Field(default_factory=ProgramSection)

    @property
    def n_val(self) -> int:
        return len(self.split.val_ids) if self.split.val_ids else int(self.split.n_val or 0)

    @property
    def n_train(self) -> int:
        return len(self.split.train_ids) if self.split.train_ids else int(self.split.n_train or 0)


def _check_recipe(r: Recipe, file: str) -> None:
    """Checks across fields (each names its field)."""
    def fail(fld: str, msg: str):
        raise DataError(msg, file=file, field=fld)

    d, s, g = r.data, r.split, r.gepa
    if d.dataset == "folder" and not d.path:
        fail("data.path", "dataset 'folder' needs path = \"<folder with ads/features/users/impressions>\"")
    if d.dataset != "folder" and d.path:
        fail("data.path", f"path is only for dataset 'folder' (dataset is '{d.dataset}')")
    if d.synthetic is not None and d.dataset != "synthetic":
        fail("data.synthetic", "synthetic options need dataset = \"synthetic\"")
    if d.posters is not None and d.dataset != "movielens-100k":
        fail("data.posters", "posters are only for dataset 'movielens-100k'")
    for part in ("train", "val"):
        n, ids = getattr(s, f"n_{part}"), getattr(s, f"{part}_ids")
        if n is None and ids is None:
            fail(f"split.n_{part}", f"say how many {part} ads to select (n_{part}) or list them ({part}_ids)")
        if n is not None and ids is not None and n != len(ids):
            fail(f"split.n_{part}", f"n_{part} = {n} but {part}_ids lists {len(ids)} ads (give one of the two)")
    if s.train_ids and s.val_ids:
        both = sorted(set(s.train_ids) & set(s.val_ids))
        if both:
            fail("split.val_ids", f"ads {both} are both train and val ads")
    if g.max_metric_calls <= r.n_val:
        fail("gepa.max_metric_calls", f"{g.max_metric_calls} metric calls leave nothing to optimise: evaluating "
                                      f"the starting program on the {r.n_val} val ads alone uses {r.n_val}")
    if g.reflection_minibatch_size > r.n_train:
        fail("gepa.reflection_minibatch_size",
             f"{g.reflection_minibatch_size} is more than the {r.n_train} train ads")
    if "judge" in g.predictors and not r.program.judge:
        fail("gepa.predictors", "the judge cannot be optimised when program.judge = false (it never runs)")
    for sec in ("task_lm", "reflection_lm"):
        lm: LMSection = getattr(r, sec)
        if lm.spec == "embedded" and lm.api_base:
            fail(f"{sec}.api_base", "api_base is only for remote models; the embedded model runs its own server")
        if lm.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", lm.api_key_env):
            fail(f"{sec}.api_key_env", f"'{lm.api_key_env}' is not an environment variable name")
    if r.task_lm.spec == r.reflection_lm.spec == "embedded" and r.task_lm.threads != r.reflection_lm.threads:
        fail("reflection_lm.threads", "task and reflection LM share one embedded server: use the same threads")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; raises DataError naming the file and the field (before any LLM call)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("recipe file not found", file=str(p))
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise DataError(f"not valid TOML: {exc}", file=str(p), row=int(m.group(1)) if m else None) from None
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file", file=str(p)) from None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        # a misspelt key also makes the real one "missing": name the misspelling first
        errs = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errs[0]
        fld = ".".join(str(x) for x in first["loc"]) or None
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see optimizers/README.md)"
        elif first["type"] == "missing":
            msg = "required setting is missing"
        if len(errs) > 1:
            others = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errs[1:4])
            msg += f" (and {len(errs) - 1} more: {others})"
        raise DataError(msg, file=str(p), field=fld) from None
    _check_recipe(recipe, str(p))
    return recipe


def resolve_path(value: str, recipe_path: Path) -> Path:
    """A path from a recipe: absolute, else relative to the working directory, else to the recipe's folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = recipe_path.parent / p
    return alt if alt.exists() else p


def load_recipe_data(recipe: Recipe, recipe_path: Path):
    d = recipe.data
    if d.dataset == "folder":
        from llmhyper.data.contract import load_folder

        folder = resolve_path(d.path or "", recipe_path)
        if not folder.is_dir():
            raise DataError(f"data folder not found: {folder}", file=str(recipe_path), field="data.path")
        return load_folder(folder, seed=d.seed)
    if d.dataset == "synthetic":
        from llmhyper.data.synthetic import generate_synthetic

        opts = d.synthetic or SyntheticOptions()
        return generate_synthetic(n_users=opts.n_users, n_warm=opts.n_warm, n_cold=opts.n_cold, seed=d.seed).data
    from llmhyper.data import movielens

    posters = d.posters or "auto"
    if posters != "auto":
        posters = str(resolve_path(posters, recipe_path))
    return movielens.build(posters=posters, seed=d.seed)


# =====================================================================================================
# Which retired ads train and which validate
# =====================================================================================================

@dataclass
class Split:
    train: list[str]
    val: list[str]
    eligible: int  # retired ads with enough test-user clicks and non-clicks
    rule: str


def test_counts(prep, ad_id: str) -> tuple[int, int]:
    """(impressions, clicks) of an ad among the data set's test users."""
    data = prep.data
    j = data.ad_index[ad_id]
    shown = data.M[data.test_users, j]
    return int(shown.sum()), int(data.Y[data.test_users, j][shown].sum())


def eligible_ads(prep, min_clicks: int, min_nonclicks: int) -> list[str]:
    out = []
    for a in prep.retired.ad_ids:
        n, c = test_counts(prep, a)
        if c >= min_clicks and n - c >= min_nonclicks:
            out.append(a)
    return out


def select_split(recipe: Recipe, prep, recipe_path: str | Path) -> Split:
    """Explicit ids are checked (they must be retired ads with a trained model and enough test-user clicks);
    counts are drawn, seeded, from the other eligible ads: the val ads first, so a change of n_train keeps
    the val set."""
    s, file = recipe.split, str(recipe_path)
    data, retired = prep.data, set(prep.retired.ad_ids)
    ok = eligible_ads(prep, s.min_test_clicks, s.min_test_nonclicks)
    ok_set = set(ok)
    for part in ("train", "val"):
        for a in getattr(s, f"{part}_ids") or []:
            if a not in data.ad_index:
                raise DataError(f"unknown ad id '{a}'", file=file, field=f"split.{part}_ids")
            if a not in retired:
                raise DataError(f"ad '{a}' is not a retired ad with a trained model (only those can be scored "
                                "against trained weights)", file=file, field=f"split.{part}_ids")
            if a not in ok_set:
                n, c = test_counts(prep, a)
                raise DataError(f"ad '{a}' has {c} clicks in {n} test-user impressions; it needs at least "
                                f"{s.min_test_clicks} clicks and {s.min_test_nonclicks} non-clicks",
                                file=file, field=f"split.{part}_ids")
    taken = set(s.train_ids or []) | set(s.val_ids or [])
    pool = [a for a in ok if a not in taken]
    need = (0 if s.val_ids else recipe.n_val) + (0 if s.train_ids else recipe.n_train)
    if need > len(pool):
        raise DataError(f"only {len(pool)} more retired ads have >= {s.min_test_clicks} test clicks and >= "
                        f"{s.min_test_nonclicks} test non-clicks, but {need} are asked for",
                        file=file, field="split")
    rng = np.random.default_rng(recipe.data.seed if s.seed is None else s.seed)
    order = [pool[i] for i in rng.permutation(len(pool))]
    val = list(s.val_ids) if s.val_ids else order[:recipe.n_val]
    rest = order[recipe.n_val:] if not s.val_ids else order
    train = list(s.train_ids) if s.train_ids else rest[:recipe.n_train]
    rule = (f"retired ads with >= {s.min_test_clicks} clicks and >= {s.min_test_nonclicks} non-clicks among "
            f"test users; seeded draw (seed {recipe.data.seed if s.seed is None else s.seed}), val first")
    return Split(train, val, len(ok), rule)


def register_ads(prep, ad_ids: list[str]) -> None:
    """Give retired ads (treated as cold) neighbours (never themselves) and a calibration alpha."""
    todo = [a for a in ad_ids if a not in prep.neighbours]
    if not todo:
        return
    missing = [a for a in todo if a not in prep.vectors]
    if missing:
        raise LLMHyperError(f"no embedding for ads {missing[:5]}")
    prep.neighbours.update(prep.neighbours_of(todo))
    prep.alphas.update({a: prep.alpha_for(prep.neighbours[a]) for a in todo})


def make_examples(prep, ad_ids: list[str], captions: dict[str, str]) -> list:
    """dspy.Examples: inputs ad/examples/features (as in `generate`), label ad_id."""
    import dspy

    from llmhyper.hyper.views import ad_view, demonstrations

    features = [f.model_dump() for f in prep.data.features]
    return [dspy.Example(ad=ad_view(prep, a, captions), examples=demonstrations(prep, a, captions),
                         features=features, ad_id=a).with_inputs("ad", "examples", "features")
            for a in ad_ids]


# =====================================================================================================
# The metric
# =====================================================================================================

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
        return {"ad_id": self.ad_id, "status": self.status, "score": _r(self.score), "auc": _r(self.auc),
                "sign_agreement": _r(self.sign_agreement), "cosine": _r(self.cosine),
                "n_impressions": self.n_impressions, "n_clicks": self.n_clicks,
                "parsed": f"{self.n_parsed}/{self.n_features}",
                "wrong_signs": [f for f, _, _ in self.wrong_signs], "error": self.error}


def _r(x: float | None, n: int = 4) -> float | None:
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
    impressions (test users), times the share of features the LLM answered (the rest come from the k-NN prior);
    0 when nothing parsed. feedback: for `predict_weights.predict` the features of the judged batch with wrong
    signs or the largest errors against the ad's trained weights, with values, and the reasoning quoted; for
    `judge` its false alarms and misses. Never raises: trouble scores 0 and says why.
    """

    def __init__(self, prep):
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
        from llmhyper.hyper.views import finish_ad
        from llmhyper.ctr.metrics import auc

        X, y, trained = self.truth(ad_id)
        n = len(self.names)
        raw = {k: float(v) for k, v in dict(getattr(pred, "weights", None) or {}).items() if k in self.names}
        failed = {str(k): str(v) for k, v in dict(getattr(pred, "failed_features", None) or {}).items()}
        for f in self.names:
            if f not in raw and f not in failed:
                failed[f] = "no weight in the answer"
        a = Assessment(ad_id, "failed", 0.0, n_impressions=len(y), n_clicks=int(y.sum()), n_features=n,
                       n_parsed=len(raw), failed=failed)
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
        checked = [(f, raw[f], float(t)) for f, t in zip(self.names, trained, strict=True)
                   if f in raw and abs(t) >= SIGN_TOL]
        a.n_sign_checked = len(checked)
        if checked:
            agree = [np.sign(v) == np.sign(t) for _, v, t in checked]
            a.sign_agreement = float(np.mean(agree))
            a.wrong_signs = sorted([c for c, ok in zip(checked, agree, strict=True) if not ok],
                                   key=lambda c: -abs(c[2]))
        wrong = {f for f, _, _ in a.wrong_signs}
        errs = [(f, raw[f], float(t)) for f, t in zip(self.names, trained, strict=True)
                if f in raw and f not in wrong]
        a.largest_errors = sorted(errs, key=lambda c: -abs(c[1] - c[2]))[:3]
        return a

    # -- GEPA entry point ------------------------------------------------------------------------------
    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        import dspy

        ad_id = str(getattr(gold, "ad_id", "") or gold.get("ad_id", ""))
        try:
            a = self.assess(ad_id, pred)
        except Exception as exc:  # a metric must never stop the optimiser
            a = Assessment(ad_id, "failed", 0.0, error=f"{type(exc).__name__}: {exc}")
            return dspy.Prediction(score=0.0, feedback=f"Score 0: the weights could not be scored ({a.error}).",
                                   assessment=a.summary())
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
        lines = [(f"Score {a.score:.3f} = AUC {auc_txt} of the calibrated weights on this ad's "
                  f"{a.n_impressions} held-out impressions ({a.n_clicks} clicks); 0.5 is random guessing, "
                  "1.0 a perfect ranking.")]
        if a.status == "partial":
            lines[0] += (f" Only {a.n_parsed} of {a.n_features} weights could be read, so the score is scaled by "
                         f"{a.n_parsed}/{a.n_features}.")
        if a.sign_agreement is not None:
            lines.append(f"Against the weights this ad's own model learned from real clicks: the sign is right for "
                         f"{round(a.sign_agreement * a.n_sign_checked)} of {a.n_sign_checked} features that "
                         f"matter (|trained| >= {SIGN_TOL}); cosine similarity {a.cosine:+.2f}.")
        return lines

    def _failure_lines(self, a: Assessment, names: list[str] | None = None) -> list[str]:
        failed = {f: r for f, r in a.failed.items() if names is None or f in names}
        if not failed:
            return []
        reasons = sorted(set(failed.values()))
        return [(f"No usable weight for {len(failed)} feature(s) ({', '.join(list(failed)[:8])}"
                 f"{', ...' if len(failed) > 8 else ''}): {'; '.join(_quote(r, 160) for r in reasons[:2])}. "
                 "Answer with `weights` as ONE JSON object that maps every feature name of the batch, spelled "
                 "exactly, to one plain number.")]

    def weights_feedback(self, a: Assessment, pred, pred_trace=None) -> str:
        if a.status == "failed":
            return " ".join([(f"Score 0: no weights could be read from the answers for any of the "
                              f"{a.n_features} features, so this ad got no model at all.")]
                            + self._failure_lines(a))
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
            wrong = [(f, weights.get(f), trained[f]) for f in names
                     if f in weights and abs(trained[f]) >= SIGN_TOL and np.sign(weights[f]) != np.sign(trained[f])]
            wrong.sort(key=lambda c: -abs(c[2]))
            rest = [(f, weights[f], trained[f]) for f in names if f in weights and f not in {w[0] for w in wrong}]
            errors = sorted(rest, key=lambda c: -abs(c[1] - c[2]))[:3]
            lines.append(f"In this batch of {len(names)} features:")
        else:
            wrong, errors = a.wrong_signs, a.largest_errors
        if wrong:
            lines.append("Wrong sign (your weight vs trained): " + "; ".join(
                f"{f} {_fmt(v)} vs {_fmt(t)}" for f, v, t in wrong[:6]) + ("; ..." if len(wrong) > 6 else "") + ".")
        else:
            lines.append("No feature that matters has the wrong sign.")
        if errors:
            lines.append("Largest errors (your weight vs trained): " + "; ".join(
                f"{f} {_fmt(v)} vs {_fmt(t)} (off by {abs(v - t):.2f})" for f, v, t in errors) + ".")
        lines += self._failure_lines(a, names)
        if reasoning is None:
            reasoning = self._reasoning_for(pred, wrong[0][0] if wrong else (errors[0][0] if errors else None))
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
        lines = [f"The weights you reviewed led to score {a.score:.3f} (AUC on held-out clicks; 0.5 is random)."]
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
                verdict = ("its sign was right, a false alarm that cost a regeneration" if right
                           else "wrong sign, a good catch")
                parts.append(f"{f} ({_fmt(first[f])}, trained {_fmt(trained[f])}: {verdict})")
            lines.append("You flagged as inconsistent: " + "; ".join(parts) + ".")
        else:
            lines.append("You flagged no feature as inconsistent.")
        missed = [f for f, v in first.items() if f in trained and abs(trained[f]) >= SIGN_TOL
                  and np.sign(v) != np.sign(trained[f]) and f not in flagged]
        if missed:
            lines.append("You missed weights with the wrong sign: " + "; ".join(
                f"{f} {_fmt(first[f])} vs trained {_fmt(trained[f])}" for f in missed[:6]) + ".")
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


# =====================================================================================================
# Components GEPA may rewrite
# =====================================================================================================

class OnlySelected:
    """GEPA component selector restricted to the recipe's predictors (round robin, or all at once)."""

    def __init__(self, names: list[str], mode: str = "round_robin"):
        self.names, self.mode = list(names), mode

    def __call__(self, state, trajectories, subsample_scores, candidate_idx, candidate) -> list[str]:
        names = [n for n in self.names if n in candidate]
        if self.mode == "all" or len(names) == 1:
            return names
        nxt = state.named_predictor_id_to_update_next_for_program_candidate
        k = nxt[candidate_idx] % len(names)
        nxt[candidate_idx] = (k + 1) % len(names)
        return [names[k]]


# =====================================================================================================
# The evolution log (own JSON format, written from GEPA callbacks)
# =====================================================================================================

def jsonable(value: Any, depth: int = 0) -> Any:
    if depth > 25:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    if hasattr(value, "toDict") and callable(value.toDict):  # dspy.Prediction / Example
        try:
            return jsonable(value.toDict(), depth + 1)
        except Exception:
            pass
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return jsonable(dump(), depth + 1)
        except Exception:
            pass
    if hasattr(value, "completion_text"):  # FailedPrediction
        return {"failed_parse": str(value.completion_text)}
    return repr(value)


class EvolutionRecorder:
    """A GEPA callback (duck-typed `gepa.core.callbacks.GEPACallback`) that writes the evolution folder.

    Data ids are GEPA's positions in the train / val lists; they are written as ad ids.
    """

    def __init__(self, folder: Path, train_ids: list[str], val_ids: list[str], reflection_lm=None,
                 run_no: int = 1, predictors: list[str] | None = None, metric: CTRFeedbackMetric | None = None):
        self.metric = metric
        self._pruned = False
        self._last_written: tuple[int, bool] | None = None  # (iteration, finished normally)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        self.reflection_lm = reflection_lm
        self.run_no = run_no
        self.predictors = predictors or []
        self.metric_calls = 0
        self.iteration: dict[str, Any] | None = None
        self._mark = 0
        self.candidates: dict[int, dict[str, Any]] = {}
        path = self.folder / "candidates.json"
        if path.exists():  # a resumed run keeps what earlier runs found
            try:
                for c in json.loads(path.read_text()).get("candidates", []):
                    self.candidates[int(c["id"])] = c
            except (ValueError, KeyError, TypeError):
                pass

    # -- files -----------------------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        rec = {"time": now(), "run": self.run_no, "event": kind, **jsonable(fields)}
        with open(self.folder / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _ads(self, ids, train: bool = True) -> list[str]:
        pool = self.train_ids if train else self.val_ids
        out = []
        for i in ids or []:
            try:
                out.append(pool[int(i)])
            except (ValueError, IndexError, TypeError):
                out.append(str(i))
        return out

    def _val_scores(self, scores: dict) -> dict[str, float | None]:
        return {self._ads([k], train=False)[0]: _r(v) for k, v in dict(scores).items()}

    def write_candidates(self, best: int | None = None) -> None:
        cands = [self.candidates[i] for i in sorted(self.candidates)]
        if best is None and cands:
            best = max(cands, key=lambda c: (c.get("val_score") or -1.0, -c["id"]))["id"]
        write_json_atomic(self.folder / "candidates.json", {
            "format": "llmhyper-evolution/1", "predictors": self.predictors, "val_ads": self.val_ids,
            "train_ads": self.train_ids, "best": best, "candidates": cands})
        per_ad = {}
        for ad in self.val_ids:
            scored = [(c["val_scores"].get(ad), c["id"]) for c in cands
                      if c.get("val_scores", {}).get(ad) is not None]
            if scored:
                top = max(s for s, _ in scored)
                per_ad[ad] = {"best_score": top, "candidates": sorted(i for s, i in scored if s == top)}
        front = sorted({i for v in per_ad.values() for i in v["candidates"]})
        agg = float(np.mean([v["best_score"] for v in per_ad.values()])) if per_ad else None
        write_json_atomic(self.folder / "pareto.json", {
            "format": "llmhyper-evolution/1", "val_ads": self.val_ids, "per_ad": per_ad, "front": front,
            "front_aggregate": _r(agg)})

    # -- GEPA callbacks --------------------------------------------------------------------------------
    def on_optimization_start(self, ev) -> None:
        self.event("optimization_start", trainset_size=ev.get("trainset_size"), valset_size=ev.get("valset_size"),
                   config=ev.get("config"))

    def _rewrite_iterations(self, keep) -> None:
        path = self.folder / "iterations.jsonl"
        if not path.exists():
            return
        recs = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:  # cut short by a kill
                continue
        kept = [r for r in (keep(r) for r in recs) if r is not None]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)

    def interrupted(self) -> None:
        """Called when the run dies: an iteration cut short is marked as such (a resumed run replays it)."""
        last = self._last_written
        if last is not None and not last[1]:
            self._rewrite_iterations(lambda r: {**r, "outcome": "interrupted"}
                                     if r.get("iteration") == last[0] and r.get("run") == self.run_no else r)

    def on_iteration_start(self, ev) -> None:
        it = int(ev["iteration"])
        state = ev.get("state")
        if not self._pruned:  # records of iterations GEPA's saved state does not hold will be replayed
            self._pruned = True
            dropped = [r.get("iteration") for r in _jsonl_safe(self.folder / "iterations.jsonl")
                       if int(r.get("iteration", 0)) >= it]
            if dropped:
                self._rewrite_iterations(lambda r: None if int(r.get("iteration", 0)) >= it else r)
                self.event("iterations_replayed", iterations=dropped)
        self.metric_calls = int(getattr(state, "total_num_evals", self.metric_calls))
        self.iteration = {"iteration": it, "run": self.run_no, "started": now(),
                          "metric_calls_at_start": self.metric_calls}
        # a fresh reflection sample per iteration; the same one when a resumed run replays the iteration
        lm = self.reflection_lm
        if lm is not None and (lm.kwargs.get("temperature") or 0) > 0:
            lm.kwargs["rollout_id"] = it
        self.event("iteration_start", iteration=it)

    def on_candidate_selected(self, ev) -> None:
        if self.iteration is not None:
            self.iteration["parent"] = ev.get("candidate_idx")
            self.iteration["parent_val_score"] = _r(ev.get("score"))
        self.event("candidate_selected", iteration=ev.get("iteration"), candidate=ev.get("candidate_idx"),
                   score=ev.get("score"))

    def on_minibatch_sampled(self, ev) -> None:
        ads = self._ads(ev.get("minibatch_ids"))
        if self.iteration is not None:
            self.iteration["minibatch"] = ads
        self.event("minibatch_sampled", iteration=ev.get("iteration"), ads=ads)

    def on_evaluation_start(self, ev) -> None:
        self.event("evaluation_start", iteration=ev.get("iteration"), candidate=ev.get("candidate_idx"),
                   batch_size=ev.get("batch_size"), parents=ev.get("parent_ids"))

    def on_evaluation_end(self, ev) -> None:
        scores = [_r(s) for s in ev.get("scores") or []]
        if self.iteration is not None:
            who = "parent" if ev.get("candidate_idx") is not None else "new"
            self.iteration[f"{who}_scores"] = scores
            self.iteration[f"{who}_outputs"] = _outputs_summary(ev.get("outputs"))
            if self.metric is not None:  # the metric's numbers for the minibatch ads, as just computed
                self.iteration[f"{who}_assessments"] = [
                    self.metric.last[a].summary() if a in self.metric.last else None
                    for a in self.iteration.get("minibatch", [])]
        self.event("evaluation_end", iteration=ev.get("iteration"), candidate=ev.get("candidate_idx"),
                   scores=scores)

    def on_evaluation_skipped(self, ev) -> None:
        if self.iteration is not None:
            self.iteration["outcome"] = "skipped"
            self.iteration["reason"] = ev.get("reason")
        self.event("evaluation_skipped", iteration=ev.get("iteration"), candidate=ev.get("candidate_idx"),
                   reason=ev.get("reason"), scores=ev.get("scores"))

    def on_reflective_dataset_built(self, ev) -> None:
        dataset = jsonable(ev.get("dataset") or {})
        if self.iteration is not None:
            self.iteration["components"] = list(ev.get("components") or [])
            self.iteration["reflective_dataset"] = dataset
            self.iteration["feedback"] = {k: [r.get("Feedback") for r in v if isinstance(r, dict)]
                                          for k, v in dataset.items()}
        self.event("reflective_dataset_built", iteration=ev.get("iteration"), candidate=ev.get("candidate_idx"),
                   components=ev.get("components"), records={k: len(v) for k, v in dataset.items()})

    def on_proposal_start(self, ev) -> None:
        self._mark = len(getattr(self.reflection_lm, "history", []) or [])
        self.event("proposal_start", iteration=ev.get("iteration"), components=ev.get("components"))

    def on_proposal_end(self, ev) -> None:
        calls = []
        for h in list(getattr(self.reflection_lm, "history", []) or [])[self._mark:]:
            calls.append(jsonable({"messages": h.get("messages"), "outputs": h.get("outputs"),
                                   "usage": h.get("usage"), "model": h.get("model"),
                                   "timestamp": h.get("timestamp")}))
        proposal = {"new_instructions": jsonable(ev.get("new_instructions")),
                    "prompts": jsonable(ev.get("prompts")), "raw_lm_outputs": jsonable(ev.get("raw_lm_outputs")),
                    "reflection_calls": calls}
        if self.iteration is not None:
            self.iteration["proposal"] = proposal
        self.event("proposal_end", iteration=ev.get("iteration"),
                   components=sorted((ev.get("new_instructions") or {}).keys()), reflection_calls=len(calls))

    def on_candidate_accepted(self, ev) -> None:
        if self.iteration is not None:
            self.iteration.setdefault("outcome", "accepted")
            self.iteration["new_candidate"] = ev.get("new_candidate_idx")
        idx = ev.get("new_candidate_idx")
        if idx in self.candidates and self.iteration is not None:
            self.candidates[idx]["iteration"] = self.iteration["iteration"]
        self.event("candidate_accepted", iteration=ev.get("iteration"), candidate=idx,
                   subsample_score=ev.get("new_score"), parents=ev.get("parent_ids"))

    def on_candidate_rejected(self, ev) -> None:
        if self.iteration is not None:
            self.iteration["outcome"] = "rejected"
            self.iteration["reason"] = ev.get("reason")
        self.event("candidate_rejected", iteration=ev.get("iteration"), old=ev.get("old_score"),
                   new=ev.get("new_score"), reason=ev.get("reason"))

    def on_merge_attempted(self, ev) -> None:
        if self.iteration is not None:
            self.iteration["merge_of"] = list(ev.get("parent_ids") or [])
        self.event("merge_attempted", iteration=ev.get("iteration"), parents=ev.get("parent_ids"))

    def on_merge_accepted(self, ev) -> None:
        if self.iteration is not None:
            self.iteration["outcome"] = "merged"
            self.iteration["new_candidate"] = ev.get("new_candidate_idx")
        idx = ev.get("new_candidate_idx")
        if idx in self.candidates:
            self.candidates[idx]["origin"] = "merge"
        self.event("merge_accepted", iteration=ev.get("iteration"), candidate=idx, parents=ev.get("parent_ids"))

    def on_merge_rejected(self, ev) -> None:
        if self.iteration is not None:
            self.iteration["outcome"] = "merge_rejected"
            self.iteration["reason"] = ev.get("reason")
        self.event("merge_rejected", iteration=ev.get("iteration"), parents=ev.get("parent_ids"),
                   reason=ev.get("reason"))

    def on_pareto_front_updated(self, ev) -> None:
        self.event("pareto_front_updated", iteration=ev.get("iteration"), front=ev.get("new_front"),
                   displaced=ev.get("displaced_candidates"))

    def on_valset_evaluated(self, ev) -> None:
        idx = int(ev["candidate_idx"])
        parents = [p for p in (ev.get("parent_ids") or []) if p is not None]
        old = self.candidates.get(idx, {})
        evaluated = int(ev.get("num_examples_evaluated") or 0)
        rec = {"id": idx, "parents": parents, "instructions": dict(ev.get("candidate") or {}),
               "val_scores": self._val_scores(ev.get("scores_by_val_id") or {}),
               "val_score": _r(ev.get("average_score")),
               "origin": old.get("origin") or ("seed" if idx == 0 else "reflection"),
               "iteration": old.get("iteration", 0 if idx == 0 else ev.get("iteration")),
               "discovered_at_metric_calls": old.get("discovered_at_metric_calls",
                                                     0 if idx == 0 else max(0, self.metric_calls - evaluated)),
               "changed": _changed(ev.get("candidate") or {},
                                   self.candidates.get(parents[0], {}).get("instructions") if parents else None)}
        if self.iteration is not None and idx != 0:
            self.iteration["new_candidate"] = idx
            self.iteration["val_score"] = rec["val_score"]
            rec["iteration"] = self.iteration["iteration"]
        self.candidates[idx] = rec
        self.write_candidates()
        self.event("valset_evaluated", iteration=ev.get("iteration"), candidate=idx, parents=parents,
                   score=ev.get("average_score"), scores=rec["val_scores"], is_best=ev.get("is_best_program"))

    def on_budget_updated(self, ev) -> None:
        self.metric_calls = int(ev.get("metric_calls_used") or self.metric_calls)
        self.event("budget_updated", iteration=ev.get("iteration"), used=ev.get("metric_calls_used"),
                   delta=ev.get("metric_calls_delta"), remaining=ev.get("metric_calls_remaining"))

    def on_state_saved(self, ev) -> None:
        self.event("state_saved", iteration=ev.get("iteration"))

    def on_error(self, ev) -> None:
        exc = ev.get("exception")
        if self.iteration is not None:
            self.iteration["error"] = f"{type(exc).__name__}: {exc}"
        self.event("error", iteration=ev.get("iteration"), error=f"{type(exc).__name__}: {exc}",
                   will_continue=ev.get("will_continue"))

    def on_iteration_end(self, ev) -> None:
        if self.iteration is None:
            return
        rec = self.iteration
        rec["ended"] = now()
        rec["accepted"] = bool(ev.get("proposal_accepted"))
        finished = "outcome" in rec or rec["accepted"]
        rec.setdefault("outcome", "accepted" if rec["accepted"] else "no_proposal")
        state = ev.get("state")
        rec["metric_calls_at_end"] = getattr(state, "total_num_evals", self.metric_calls)
        with open(self.folder / "iterations.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(rec)) + "\n")
        self._last_written = (int(rec["iteration"]), finished)
        self.event("iteration_end", iteration=rec["iteration"], outcome=rec["outcome"])
        self.iteration = None

    def on_optimization_end(self, ev) -> None:
        state = ev.get("final_state")
        if state is not None:
            self.sync_from_state(state)
        self.event("optimization_end", best=ev.get("best_candidate_idx"), iterations=ev.get("total_iterations"),
                   metric_calls=ev.get("total_metric_calls"))

    def sync_from_state(self, state, best: int | None = None) -> None:
        """Make candidates.json agree with GEPA's final state (which also knows earlier runs' candidates)."""
        for idx, cand in enumerate(state.program_candidates):
            old = self.candidates.get(idx, {})
            parents = [p for p in state.parent_program_for_candidate[idx] if p is not None]
            scores = state.prog_candidate_val_subscores[idx]
            vals = [v for v in scores.values() if v is not None]
            self.candidates[idx] = {
                "id": idx, "parents": parents, "instructions": dict(cand),
                "val_scores": self._val_scores(scores),
                "val_score": _r(float(np.mean(vals))) if vals else None,
                "origin": old.get("origin") or ("seed" if idx == 0 else
                                                ("merge" if len(parents) > 1 else "reflection")),
                "iteration": old.get("iteration", 0 if idx == 0 else None),
                "discovered_at_metric_calls": int(state.num_metric_calls_by_discovery[idx]),
                "changed": _changed(cand, state.program_candidates[parents[0]] if parents else None)}
        self.write_candidates(best)


def _jsonl_safe(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _changed(cand: dict, parent: dict | None) -> list[str]:
    if not parent:
        return []
    return sorted(k for k in cand if cand.get(k) != parent.get(k))


def _outputs_summary(outputs) -> list[Any]:
    out = []
    for o in outputs or []:
        try:
            out.append({"weights": jsonable(dict(o.get("weights") or {})),
                        "failed_features": sorted(dict(o.get("failed_features") or {})),
                        "flags": jsonable(o.get("flags") or []), "parse_failures": o.get("parse_failures")})
        except Exception:
            out.append(None)
    return out


# =====================================================================================================
# Compile
# =====================================================================================================

@dataclass
class CompileResult:
    name: str
    program_path: Path
    manifest_path: Path
    evolution_dir: Path
    val_before: float | None
    val_after: float | None
    best_candidate: int
    metric_calls: int
    manifest: dict[str, Any]


def resolved_settings(recipe: Recipe, split: Split, data) -> dict[str, Any]:
    """What a resumed compile must share with the run it continues (the budget may grow)."""
    r = recipe.model_dump()
    r["gepa"].pop("max_metric_calls")
    r.pop("description", None)
    r.pop("estimated_hours", None)
    for sec in ("task_lm", "reflection_lm"):
        r[sec].pop("timeout", None)
        r[sec].pop("threads", None)
    return {"recipe": r, "data": data.name, "train_ads": split.train, "val_ads": split.val,
            "features": data.feature_names}


def check_resume(evo: Path, settings: dict[str, Any], force: bool) -> bool:
    """True when the folder holds an earlier run (which this one continues)."""
    path = evo / "config.json"
    resumed = path.exists()
    if resumed:
        old = json.loads(path.read_text())
        diff = _diff_keys(old, settings)
        if diff and not force:
            raise LLMHyperError(f"{evo} holds a compile with other settings ({', '.join(diff[:6])}); use another "
                                "--out, delete that folder, or pass --force to continue it anyway")
    write_json_atomic(path, settings)
    return resumed


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _api_key(lm: LMSection) -> str | None:
    if not lm.api_key_env:
        return None
    key = os.environ.get(lm.api_key_env)
    if not key:
        raise LLMHyperError(f"the environment variable {lm.api_key_env} (api_key_env) is not set")
    return key


def build_lms(recipe: Recipe, threads: int | None = None):
    """(task handle, reflection handle). Two embedded LMs share one server (one model in memory)."""
    import dspy

    from llmhyper.llm.models import EMBEDDED_MODEL, LMHandle, build_lm

    t, r = recipe.task_lm, recipe.reflection_lm
    both_embedded = t.spec == r.spec == "embedded"
    task = build_lm(t.spec, api_base=t.api_base, api_key=_api_key(t), temperature=t.temperature,
                    max_tokens=t.max_tokens, n_threads=threads or t.threads, cache=t.cache,
                    n_ctx=max(t.n_ctx, r.n_ctx) if both_embedded else t.n_ctx, timeout=t.timeout)
    try:
        if both_embedded:
            lm = dspy.LM(f"hosted_vllm/{EMBEDDED_MODEL.name}", api_base=task.server.base_url,
                         api_key=task.server.api_key, temperature=r.temperature, max_tokens=r.max_tokens,
                         cache=r.cache, timeout=r.timeout, num_retries=1)
            desc = {**task.description, "temperature": r.temperature, "max_tokens": r.max_tokens, "cache": r.cache,
                    "shares_server_with": "task_lm"}
            refl = LMHandle(lm=lm, description=desc)
        else:
            refl = build_lm(r.spec, api_base=r.api_base, api_key=_api_key(r), temperature=r.temperature,
                            max_tokens=r.max_tokens, n_threads=threads or r.threads, cache=r.cache, n_ctx=r.n_ctx,
                            timeout=r.timeout)
    except BaseException:
        task.close()
        raise
    return task, refl


def build_program(recipe: Recipe, recipe_path: Path):
    from llmhyper.hyper.program import LLMHyper, ProgramConfig

    p = recipe.program
    program = LLMHyper(ProgramConfig(batch_size=p.batch_size, n_samples=p.samples, use_judge=p.judge,
                                     hide_titles=p.hide_titles, max_attempts=p.max_attempts))
    if p.base:
        base = resolve_path(p.base, recipe_path)
        if not base.is_file():
            raise DataError(f"program file not found: {base}", file=str(recipe_path), field="program.base")
        program.load(str(base))
    return program


def estimate(recipe: Recipe, n_features: int, seconds_per_call: tuple[float, float] = (24.0, 36.0),
             seconds_per_reflection: tuple[float, float] = (120.0, 300.0)) -> dict[str, Any]:
    """A rough cost model for the embedded LM on 2 CPU cores (about 2-3 min per ad of 40 features in 4 batches
    + a judge call). One metric call is one program run on one ad; GEPA may overshoot the budget by up to one
    iteration (2 minibatches + one val evaluation)."""
    g, p = recipe.gepa, recipe.program
    per_iter = 2 * g.reflection_minibatch_size
    overshoot = per_iter + recipe.n_val
    iters = max(1, math.ceil((g.max_metric_calls - recipe.n_val) / (per_iter + 0.5 * recipe.n_val)))
    calls = math.ceil(n_features / p.batch_size) * p.samples + int(p.judge)
    lo = g.max_metric_calls * calls * seconds_per_call[0] + iters * seconds_per_reflection[0]
    hi = ((g.max_metric_calls + overshoot) * calls * seconds_per_call[1]
          + (iters + 1) * seconds_per_reflection[1])
    return {"metric_calls": g.max_metric_calls, "max_overshoot": overshoot, "iterations_about": iters,
            "task_lm_calls_per_metric_call": calls, "hours_on_2_cpu_cores_embedded": [round(lo / 3600, 1),
                                                                                    round(hi / 3600, 1)]}


def compile_recipe(recipe_path: str | Path, out_dir: str | Path = "programs", *, encoder=None, task_lm=None,
                   reflection_lm=None, max_metric_calls: int | None = None, threads: int | None = None,
                   force: bool = False, progress: bool = True, dry_run: bool = False) -> CompileResult | dict:
    """Run (or resume) a compile. `task_lm` / `reflection_lm` (objects with `.lm` and `.description`, like
    `llmhyper.llm.models.LMHandle`) replace the recipe's LMs, e.g. in tests. With `dry_run`, everything up to the
    first LLM call is checked and the plan returned."""
    import dspy

    from llmhyper.retrieval.encoders import get_encoder
    from llmhyper.hyper.views import captions_for
    from llmhyper.llm.models import lm_usage
    from llmhyper.ctr.prepare import prepare

    t_start = time.time()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    if max_metric_calls is not None:
        recipe.gepa.max_metric_calls = int(max_metric_calls)
        _check_recipe(recipe, str(recipe_path))
    name = recipe.name or recipe_path.stem
    out = Path(out_dir)
    evo = out / f"{name}.evolution"
    log_dir = evo / "gepa"

    data = load_recipe_data(recipe, recipe_path)
    encoder = encoder or get_encoder(recipe.data.encoder)
    prep = prepare(data, encoder=encoder, k=recipe.data.k, seed=recipe.data.seed, progress=progress)
    split = select_split(recipe, prep, recipe_path)
    program = build_program(recipe, recipe_path)
    plan = {"name": name, "train_ads": split.train, "val_ads": split.val, "eligible_ads": split.eligible,
            "estimate": estimate(recipe, len(data.feature_names)), "out": str(out)}
    if dry_run:
        return plan

    ads = split.train + split.val
    register_ads(prep, ads)
    needed = sorted(set(ads) | {n.ad_id for a in ads for n in prep.neighbours[a]})
    captions = captions_for(prep, encoder, needed)
    trainset = make_examples(prep, split.train, captions)
    valset = make_examples(prep, split.val, captions)
    settings = resolved_settings(recipe, split, data)
    evo.mkdir(parents=True, exist_ok=True)
    resumed = check_resume(evo, settings, force)
    run_no = 1 + sum(1 for line in _read_lines(evo / "events.jsonl") if '"event": "run_start"' in line)

    own = task_lm is None
    if own:
        task_lm, reflection_lm = build_lms(recipe, threads)
    elif reflection_lm is None:
        reflection_lm = task_lm
    marks = (len(task_lm.lm.history), len(reflection_lm.lm.history))
    metric = CTRFeedbackMetric(prep)
    recorder = EvolutionRecorder(evo, split.train, split.val, reflection_lm.lm, run_no, recipe.gepa.predictors,
                                 metric)
    recorder.event("run_start", resumed=resumed, recipe=str(recipe_path), recipe_sha256=file_sha256(recipe_path),
                   max_metric_calls=recipe.gepa.max_metric_calls, train_ads=split.train, val_ads=split.val)
    old_cache = dspy.cache
    try:
        if recipe.task_lm.cache or recipe.reflection_lm.cache:
            dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True,
                                 disk_cache_dir=str(log_dir / "lm_cache"))
        g = recipe.gepa
        gepa = dspy.GEPA(
            metric=metric, max_metric_calls=g.max_metric_calls, reflection_lm=reflection_lm.lm,
            reflection_minibatch_size=g.reflection_minibatch_size,
            candidate_selection_strategy=g.candidate_selection,
            component_selector=OnlySelected(g.predictors, g.component_selector), use_merge=g.use_merge,
            max_merge_invocations=g.max_merge_invocations, num_threads=g.num_threads, failure_score=0.0,
            perfect_score=1.0, log_dir=str(log_dir), track_stats=True, seed=g.seed,
            gepa_kwargs={"callbacks": [recorder], "use_cloudpickle": True})
        with dspy.context(lm=task_lm.lm):
            compiled = gepa.compile(program, trainset=trainset, valset=valset)
    except BaseException as exc:
        recorder.interrupted()
        recorder.event("run_end", status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                       error=f"{type(exc).__name__}: {exc}", wall_seconds=round(time.time() - t_start, 1))
        raise
    finally:
        dspy.cache = old_cache
        reflection_lm.lm.kwargs.pop("rollout_id", None)  # set per iteration by the recorder
        if own:
            task_lm.close()
            if reflection_lm is not task_lm:
                reflection_lm.close()

    dr = compiled.detailed_results
    best = int(dr.best_idx)
    recorder.write_candidates(best)
    out.mkdir(parents=True, exist_ok=True)
    program_path = out / f"{name}.json"
    compiled.save(str(program_path))
    wall = round(time.time() - t_start, 1)
    task_usage = lm_usage(task_lm.lm, since=marks[0])
    refl_usage = lm_usage(reflection_lm.lm, since=marks[1]) if reflection_lm.lm is not task_lm.lm else None
    recorder.event("run_end", status="complete", wall_seconds=wall, metric_calls=dr.total_metric_calls,
                   task_lm=task_usage, reflection_lm=refl_usage)
    manifest_path = out / f"{name}.manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() and resumed else {}
    runs = list(old.get("runs", [])) + [{"run": run_no, "started": _iso(t_start), "ended": now(),
                                        "wall_seconds": wall, "resumed": resumed,
                                        "metric_calls_total_after": dr.total_metric_calls,
                                        "task_lm": task_usage, "reflection_lm": refl_usage}]
    val_scores = {i: {split.val[k]: _r(v) for k, v in dr.val_subscores[i].items()} for i in (0, best)}
    cfg = recipe.program
    manifest = {
        "name": name, "kind": "compiled (GEPA)", "program": str(program_path),
        "program_sha256": file_sha256(program_path), "predictors": ["predict_weights.predict", "judge"],
        "optimised_predictors": recipe.gepa.predictors,
        "recipe": {"path": str(recipe_path), "sha256": file_sha256(recipe_path), "settings": recipe.model_dump()},
        "lms": {"task": jsonable(task_lm.description), "reflection": jsonable(reflection_lm.description)},
        "data": {"name": data.name, **{k: v for k, v in data.card.items() if not str(k).startswith("feature_")}},
        "encoder": prep.encoder_name, "k": prep.k,
        "split": {"train_ads": split.train, "val_ads": split.val, "eligible_ads": split.eligible,
                  "rule": split.rule},
        "metric": "AUC of the calibrated weights on each val ad's test-user impressions, times the share of "
                  "features answered (0 when nothing parsed); mean over val ads",
        "val_score_before": _r(dr.val_aggregate_scores[0]), "val_score_after": _r(dr.val_aggregate_scores[best]),
        "val_scores_before": val_scores[0], "val_scores_after": val_scores[best],
        "best_candidate": best, "candidates": len(dr.candidates),
        "budget": {"max_metric_calls": recipe.gepa.max_metric_calls, "metric_calls_used": dr.total_metric_calls,
                   "full_val_evaluations": dr.num_full_val_evals},
        "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
        "tokens": _sum_tokens(runs), "runs": runs, "interrupted_runs": _interrupted_runs(evo / "events.jsonl"),
        "generate_flags": f"--batch-size {cfg.batch_size} --samples {cfg.samples}"
                          + ("" if cfg.judge else " --no-judge") + (" --hide-titles" if cfg.hide_titles else ""),
        "evolution": str(evo), "gepa_log_dir": str(log_dir),
        "created": old.get("created", now()), "updated": now(), "git": git_commit(), "versions": versions()}
    write_json_atomic(manifest_path, manifest)
    return CompileResult(name, program_path, manifest_path, evo, manifest["val_score_before"],
                         manifest["val_score_after"], best, int(dr.total_metric_calls or 0), manifest)


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _sum_tokens(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in runs:
        for who in ("task_lm", "reflection_lm"):
            for k, v in (r.get(who) or {}).items():
                out.setdefault(who, {}).setdefault(k, 0)
                out[who][k] += int(v or 0)
    return out


def _interrupted_runs(events: Path) -> list[dict[str, Any]]:
    """Runs that did not finish (killed, crashed), from events.jsonl: their time is not in `wall_seconds`."""
    runs: dict[int, dict[str, Any]] = {}
    for e in _jsonl_safe(events):
        if e.get("event") == "run_start":
            runs[e["run"]] = {"run": e["run"], "started": e["time"], "status": "killed (no run_end)"}
        elif e.get("event") == "run_end" and e.get("run") in runs:
            if e.get("status") == "complete":
                runs.pop(e["run"])
            else:
                runs[e["run"]].update(status=e.get("status"), ended=e["time"], wall_seconds=e.get("wall_seconds"),
                                      error=e.get("error"))
    return [runs[k] for k in sorted(runs)]


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


# =====================================================================================================
# Command line
# =====================================================================================================

def add_compile_parser(sub, add_data_args=None) -> None:
    p = sub.add_parser("compile", help="evolve the program's instructions with GEPA (resumable)",
                       description="Run the GEPA recipe optimizers/NAME.toml; writes OUT/NAME.json, "
                                   "OUT/NAME.manifest.json and OUT/NAME.evolution/. Rerun to resume.")
    p.add_argument("recipe", help="a recipe, e.g. optimizers/ml100k_small.toml")
    p.add_argument("--out", default="programs", help="folder for the program, manifest and evolution log")
    p.add_argument("--max-metric-calls", type=int, help="override the recipe's budget (e.g. to extend a run)")
    p.add_argument("--threads", type=int, help="CPU threads of the embedded LLM server (default: the recipe's)")
    p.add_argument("--force", action="store_true", help="continue an evolution folder made with other settings")
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe, data and split and print the plan and cost estimate; no LLM call")
    p.set_defaults(func=cmd_compile)


def cmd_compile(args: argparse.Namespace) -> int:
    res = compile_recipe(args.recipe, args.out, max_metric_calls=args.max_metric_calls, threads=args.threads,
                         force=args.force, dry_run=args.dry_run)
    if isinstance(res, dict):
        print(json.dumps(res, indent=2))
        return 0
    print(f"val score {res.val_before} -> {res.val_after} (best candidate {res.best_candidate}, "
          f"{res.metric_calls} metric calls)", file=sys.stderr)
    print(f"program:   {res.program_path}   (use: llmhyper generate --program {res.program_path} "
          f"{res.manifest['generate_flags']})")
    print(f"manifest:  {res.manifest_path}")
    print(f"evolution: {res.evolution_dir}   (review: llmhyper evolution {res.program_path.with_suffix('')})")
    return 0
