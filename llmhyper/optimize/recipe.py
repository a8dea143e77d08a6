"""A compile recipe (`optimizers/<name>.toml`): the data, which retired ads train and validate, the budget,
the task and reflection LMs, the predictors to evolve and the program's settings. `load_recipe` validates
it before any LLM call; every error names the file and the field."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmhyper.data import DataSettings, SyntheticSettings
from llmhyper.errors import DataError

PREDICTORS = ("predict_weights.predict", "judge")


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
            raise ValueError(
                f"'{v}' is not an LM: use 'embedded' or a DSPy model string like 'openai/gpt-4o'"
            )
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


def check_recipe(r: Recipe, file: str) -> None:
    """Checks across fields (each names its field)."""

    def fail(fld: str, msg: str):
        raise DataError(msg, file=file, field=fld)

    d, s, g = r.data, r.split, r.gepa
    if d.dataset == "folder" and not d.path:
        fail("data.path", "dataset 'folder' needs path = \"<folder with ads/features/users/impressions>\"")
    if d.dataset != "folder" and d.path:
        fail("data.path", f"path is only for dataset 'folder' (dataset is '{d.dataset}')")
    if d.synthetic is not None and d.dataset != "synthetic":
        fail("data.synthetic", 'synthetic options need dataset = "synthetic"')
    if d.posters is not None and d.dataset != "movielens-100k":
        fail("data.posters", "posters are only for dataset 'movielens-100k'")
    for part in ("train", "val"):
        n, ids = getattr(s, f"n_{part}"), getattr(s, f"{part}_ids")
        if n is None and ids is None:
            fail(f"split.n_{part}", f"say how many {part} ads to select (n_{part}) or list them ({part}_ids)")
        if n is not None and ids is not None and n != len(ids):
            fail(
                f"split.n_{part}", f"n_{part} = {n} but {part}_ids lists {len(ids)} ads (give one of the two)"
            )
    if s.train_ids and s.val_ids:
        both = sorted(set(s.train_ids) & set(s.val_ids))
        if both:
            fail("split.val_ids", f"ads {both} are both train and val ads")
    if g.max_metric_calls <= r.n_val:
        fail(
            "gepa.max_metric_calls",
            f"{g.max_metric_calls} metric calls leave nothing to optimise: "
            f"evaluating the starting program on the {r.n_val} val ads alone uses "
            f"{r.n_val}",
        )
    if g.reflection_minibatch_size > r.n_train:
        fail(
            "gepa.reflection_minibatch_size",
            f"{g.reflection_minibatch_size} is more than the {r.n_train} train ads",
        )
    if "judge" in g.predictors and not r.program.judge:
        fail("gepa.predictors", "the judge cannot be optimised when program.judge = false (it never runs)")
    for sec in ("task_lm", "reflection_lm"):
        lm: LMSection = getattr(r, sec)
        if lm.spec == "embedded" and lm.api_base:
            fail(
                f"{sec}.api_base",
                "api_base is only for remote models; the embedded model runs its own server",
            )
        if lm.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", lm.api_key_env):
            fail(f"{sec}.api_key_env", f"'{lm.api_key_env}' is not an environment variable name")
    if r.task_lm.spec == r.reflection_lm.spec == "embedded" and r.task_lm.threads != r.reflection_lm.threads:
        fail(
            "reflection_lm.threads", "task and reflection LM share one embedded server: use the same threads"
        )


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
        raise _validation_error(exc, str(p)) from None
    check_recipe(recipe, str(p))
    return recipe


def _validation_error(exc: ValidationError, file: str) -> DataError:
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
    return DataError(msg, file=file, field=fld)


def resolve_path(value: str, recipe_path: Path) -> Path:
    """A path from a recipe: absolute, else relative to the working directory, else to the recipe's folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = recipe_path.parent / p
    return alt if alt.exists() else p


def data_settings(recipe: Recipe, recipe_path: Path) -> DataSettings:
    """The recipe's [data] section as the settings `llmhyper.data.load_dataset` takes."""
    d = recipe.data
    if d.dataset == "folder":
        folder = resolve_path(d.path or "", recipe_path)
        if not folder.is_dir():
            raise DataError(f"data folder not found: {folder}", file=str(recipe_path), field="data.path")
        return DataSettings(folder=folder, seed=d.seed)
    if d.dataset == "synthetic":
        opts = d.synthetic or SyntheticOptions()
        sizes = SyntheticSettings(n_users=opts.n_users, n_warm=opts.n_warm, n_cold=opts.n_cold)
        return DataSettings(dataset="synthetic", seed=d.seed, synthetic=sizes)
    posters = None if d.posters in (None, "auto") else str(resolve_path(d.posters, recipe_path))
    return DataSettings(dataset="movielens-100k", posters=posters, seed=d.seed)
