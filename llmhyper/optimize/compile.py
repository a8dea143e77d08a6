"""Compile: evolve the program's instructions with GEPA, scored on retired ads treated as cold.

A recipe (`optimizers/<name>.toml`, `optimize.recipe`) names the data set, the split (`optimize.split`), the
budget, the LMs (`optimize.lms`), the predictors to evolve and the program's settings. For every training or
validation ad the program runs as if the ad were new, and `optimize.metric` scores its weights and writes
the feedback GEPA's reflection LM reads. Outputs, for `out_dir = programs/` and a recipe `NAME.toml`:

    programs/NAME.json                 the compiled program (`LLMHyper().load(...)`, `generate --program`)
    programs/NAME.manifest.json        LMs, data, split ids, val score before/after, budget, time, tokens, git
    programs/NAME.evolution/           the evolution log in our own JSON format (`optimize.recorder`):
        config.json                    the resolved settings (a rerun with other settings is refused)
        candidates.json, pareto.json, iterations.jsonl, events.jsonl
        gepa/                          GEPA's own run dir (pickled state, used to resume) and the LM cache

Rerunning the same compile resumes: GEPA reloads its state from `gepa/` and the LM cache in `gepa/lm_cache/`
answers every call already made, so a killed compile continues where it stopped without paying again.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from llmhyper.ctr.prepare import Prepared, prepare
from llmhyper.data import CTRData, load_dataset
from llmhyper.errors import DataError
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.hyper.views import captions_for
from llmhyper.llm.models import LMHandle, lm_usage
from llmhyper.optimize.lms import build_lms, response_cache
from llmhyper.optimize.metric import CTRFeedbackMetric, rounded
from llmhyper.optimize.recipe import Recipe, check_recipe, data_settings, load_recipe, resolve_path
from llmhyper.optimize.recorder import EvolutionRecorder
from llmhyper.optimize.split import Split, make_examples, register_ads, select_split
from llmhyper.retrieval.encoders import get_encoder
from llmhyper.runs import RunDir, SettingsMismatch, settings_diff
from llmhyper.store import (
    file_sha256,
    git_commit,
    iso,
    jsonable,
    now,
    read_json,
    read_jsonl,
    versions,
    write_json_atomic,
)


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


@dataclass
class Plan:
    """What a compile would do (everything up to the first LLM call is checked to make it)."""

    name: str
    train_ads: list[str]
    val_ads: list[str]
    eligible_ads: int
    estimate: dict[str, Any]
    out: str


@dataclass
class _Setup:
    recipe: Recipe
    recipe_path: Path
    name: str
    data: CTRData
    encoder: Any
    prep: Prepared
    split: Split
    program: LLMHyper

    def plan(self, out: Path) -> Plan:
        return Plan(
            self.name,
            self.split.train,
            self.split.val,
            self.split.eligible,
            estimate(self.recipe, len(self.data.feature_names)),
            str(out),
        )


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


def build_program(recipe: Recipe, recipe_path: Path) -> LLMHyper:
    p = recipe.program
    program = LLMHyper(
        ProgramConfig(
            batch_size=p.batch_size,
            n_samples=p.samples,
            use_judge=p.judge,
            hide_titles=p.hide_titles,
            max_attempts=p.max_attempts,
        )
    )
    if p.base:
        base = resolve_path(p.base, recipe_path)
        if not base.is_file():
            raise DataError(f"program file not found: {base}", file=str(recipe_path), field="program.base")
        program.load(str(base))
    return program


def estimate(
    recipe: Recipe,
    n_features: int,
    seconds_per_call: tuple[float, float] = (24.0, 36.0),
    seconds_per_reflection: tuple[float, float] = (120.0, 300.0),
) -> dict[str, Any]:
    """A rough cost model for the embedded LM on 2 CPU cores (about 2-3 min per ad of 40 features in 4 batches
    + a judge call). One metric call is one program run on one ad; GEPA may overshoot the budget by up to one
    iteration (2 minibatches + one val evaluation)."""
    g, p = recipe.gepa, recipe.program
    per_iter = 2 * g.reflection_minibatch_size
    overshoot = per_iter + recipe.n_val
    iters = max(1, math.ceil((g.max_metric_calls - recipe.n_val) / (per_iter + 0.5 * recipe.n_val)))
    calls = math.ceil(n_features / p.batch_size) * p.samples + int(p.judge)
    lo = g.max_metric_calls * calls * seconds_per_call[0] + iters * seconds_per_reflection[0]
    hi = (g.max_metric_calls + overshoot) * calls * seconds_per_call[1] + (
        iters + 1
    ) * seconds_per_reflection[1]
    return {
        "metric_calls": g.max_metric_calls,
        "max_overshoot": overshoot,
        "iterations_about": iters,
        "task_lm_calls_per_metric_call": calls,
        "hours_on_2_cpu_cores_embedded": [round(lo / 3600, 1), round(hi / 3600, 1)],
    }


def resolved_settings(recipe: Recipe, split: Split, data: CTRData) -> dict[str, Any]:
    """What a resumed compile must share with the run it continues (the budget may grow)."""
    r = recipe.model_dump()
    r["gepa"].pop("max_metric_calls")
    r.pop("description", None)
    r.pop("estimated_hours", None)
    for sec in ("task_lm", "reflection_lm"):
        r[sec].pop("timeout", None)
        r[sec].pop("threads", None)
    return {
        "recipe": r,
        "data": data.name,
        "train_ads": split.train,
        "val_ads": split.val,
        "features": data.feature_names,
    }


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so a refusal names the setting (`recipe.program.batch_size`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _guard_settings(run: RunDir, settings: dict[str, Any], force: bool) -> bool:
    """Save the settings; True when the folder holds an earlier run (which this one continues)."""
    old = run.settings()
    if old is not None and not force:
        diff = list(settings_diff(_flat(old), _flat(settings)))
        if diff:
            raise SettingsMismatch(
                f"{run.path} holds a compile with other settings ({', '.join(diff[:6])}); "
                "use another --out, delete that folder, or pass --force to continue it "
                "anyway"
            )
    run.save_settings(settings)
    return old is not None


def _setup(recipe_path: str | Path, encoder, max_metric_calls: int | None, progress: bool) -> _Setup:
    """Everything up to the first LLM call: recipe, data, embeddings, split and program."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    if max_metric_calls is not None:
        recipe.gepa.max_metric_calls = int(max_metric_calls)
        check_recipe(recipe, str(recipe_path))
    data = load_dataset(data_settings(recipe, recipe_path))
    encoder = encoder or get_encoder(recipe.data.encoder)
    prep = prepare(data, encoder=encoder, k=recipe.data.k, seed=recipe.data.seed, progress=progress)
    split = select_split(recipe, prep, recipe_path)
    program = build_program(recipe, recipe_path)
    return _Setup(recipe, recipe_path, recipe.name or recipe_path.stem, data, encoder, prep, split, program)


def plan_compile(
    recipe_path: str | Path,
    out_dir: str | Path = "programs",
    *,
    encoder=None,
    max_metric_calls: int | None = None,
    progress: bool = True,
) -> Plan:
    """Check the recipe, data and split and say what a compile would do; no LLM call, nothing written."""
    return _setup(recipe_path, encoder, max_metric_calls, progress).plan(Path(out_dir))


def compile_recipe(
    recipe_path: str | Path,
    out_dir: str | Path = "programs",
    *,
    encoder=None,
    task_lm: LMHandle | None = None,
    reflection_lm: LMHandle | None = None,
    max_metric_calls: int | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> CompileResult:
    """Run (or resume) a compile. `task_lm` / `reflection_lm` (objects with `.lm` and `.description`, like
    `LMHandle`) replace the recipe's LMs, e.g. in tests; `threads` overrides the embedded server's."""
    t_start = time.time()
    s = _setup(recipe_path, encoder, max_metric_calls, progress)
    recipe, split, prep = s.recipe, s.split, s.prep
    out = Path(out_dir)
    evo = out / f"{s.name}.evolution"
    ads = split.train + split.val
    register_ads(prep, ads)
    shown = set(ads) | {n.ad_id for a in ads for n in prep.neighbours[a]}  # the ads and their neighbours
    captions = captions_for(prep, s.encoder, sorted(shown))
    trainset = make_examples(prep, split.train, captions)
    valset = make_examples(prep, split.val, captions)
    with RunDir(evo) as run:  # one compile per evolution folder at a time
        resumed = _guard_settings(run, resolved_settings(recipe, split, s.data), force)
        run_no = 1 + sum(1 for e in read_jsonl(evo / "events.jsonl") if e.get("event") == "run_start")
        own = task_lm is None
        if own:
            task_lm, reflection_lm = build_lms(recipe, threads)
        elif reflection_lm is None:
            reflection_lm = task_lm
        try:
            compiled, recorder, usage = _run_gepa(
                s, evo, run_no, resumed, task_lm, reflection_lm, trainset, valset, t_start
            )
        finally:
            if own:
                task_lm.close()
                if reflection_lm is not task_lm:
                    reflection_lm.close()
        return _finish(
            s, out, evo, compiled, recorder, usage, run_no, resumed, task_lm, reflection_lm, t_start
        )


def _run_gepa(
    s: _Setup, evo: Path, run_no: int, resumed: bool, task_lm, reflection_lm, trainset, valset, t_start: float
):
    """GEPA over the train and val examples, logged by an EvolutionRecorder; (compiled, recorder, usage)."""
    recipe, split, g = s.recipe, s.split, s.recipe.gepa
    log_dir = evo / "gepa"
    marks = (len(task_lm.lm.history), len(reflection_lm.lm.history))
    metric = CTRFeedbackMetric(s.prep)
    recorder = EvolutionRecorder(evo, split.train, split.val, reflection_lm.lm, run_no, g.predictors, metric)
    recorder.event(
        "run_start",
        resumed=resumed,
        recipe=str(s.recipe_path),
        recipe_sha256=file_sha256(s.recipe_path),
        max_metric_calls=g.max_metric_calls,
        train_ads=split.train,
        val_ads=split.val,
    )
    cached = recipe.task_lm.cache or recipe.reflection_lm.cache
    try:
        with response_cache(log_dir / "lm_cache") if cached else nullcontext():
            gepa = dspy.GEPA(
                metric=metric,
                max_metric_calls=g.max_metric_calls,
                reflection_lm=reflection_lm.lm,
                reflection_minibatch_size=g.reflection_minibatch_size,
                candidate_selection_strategy=g.candidate_selection,
                component_selector=OnlySelected(g.predictors, g.component_selector),
                use_merge=g.use_merge,
                max_merge_invocations=g.max_merge_invocations,
                num_threads=g.num_threads,
                failure_score=0.0,
                perfect_score=1.0,
                log_dir=str(log_dir),
                track_stats=True,
                seed=g.seed,
                gepa_kwargs={"callbacks": [recorder], "use_cloudpickle": True},
            )
            with dspy.context(lm=task_lm.lm):
                compiled = gepa.compile(s.program, trainset=trainset, valset=valset)
    except BaseException as exc:
        recorder.interrupted()
        recorder.event(
            "run_end",
            status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
            error=f"{type(exc).__name__}: {exc}",
            wall_seconds=round(time.time() - t_start, 1),
        )
        raise
    finally:
        reflection_lm.lm.kwargs.pop("rollout_id", None)  # set per iteration by the recorder
    usage = {
        "task_lm": lm_usage(task_lm.lm, since=marks[0]),
        "reflection_lm": lm_usage(reflection_lm.lm, since=marks[1])
        if reflection_lm.lm is not task_lm.lm
        else None,
    }
    return compiled, recorder, usage


def _finish(
    s: _Setup,
    out: Path,
    evo: Path,
    compiled,
    recorder: EvolutionRecorder,
    usage: dict[str, Any],
    run_no: int,
    resumed: bool,
    task_lm,
    reflection_lm,
    t_start: float,
) -> CompileResult:
    """Save the program and write the manifest (runs of earlier sessions kept)."""
    recipe, split, prep, name = s.recipe, s.split, s.prep, s.name
    dr = compiled.detailed_results
    best = int(dr.best_idx)
    recorder.write_candidates(best)
    program_path = out / f"{name}.json"
    out.mkdir(parents=True, exist_ok=True)
    compiled.save(str(program_path))
    wall = round(time.time() - t_start, 1)
    recorder.event(
        "run_end", status="complete", wall_seconds=wall, metric_calls=dr.total_metric_calls, **usage
    )
    manifest_path = out / f"{name}.manifest.json"
    old = read_json(manifest_path, "compile manifest") if manifest_path.exists() and resumed else {}
    runs = list(old.get("runs", [])) + [
        {
            "run": run_no,
            "started": iso(t_start),
            "ended": now(),
            "wall_seconds": wall,
            "resumed": resumed,
            "metric_calls_total_after": dr.total_metric_calls,
            **usage,
        }
    ]
    val_scores = {i: {split.val[k]: rounded(v) for k, v in dr.val_subscores[i].items()} for i in (0, best)}
    cfg = recipe.program
    card = {k: v for k, v in s.data.card.items() if not str(k).startswith("feature_")}
    manifest = {
        "name": name,
        "kind": "compiled (GEPA)",
        "program": str(program_path),
        "program_sha256": file_sha256(program_path),
        "predictors": ["predict_weights.predict", "judge"],
        "optimised_predictors": recipe.gepa.predictors,
        "recipe": {
            "path": str(s.recipe_path),
            "sha256": file_sha256(s.recipe_path),
            "settings": recipe.model_dump(),
        },
        "lms": {"task": jsonable(task_lm.description), "reflection": jsonable(reflection_lm.description)},
        "data": {"name": s.data.name, **card},
        "encoder": prep.encoder_name,
        "k": prep.k,
        "split": {
            "train_ads": split.train,
            "val_ads": split.val,
            "eligible_ads": split.eligible,
            "rule": split.rule,
        },
        "metric": "AUC of the calibrated weights on each val ad's test-user impressions, times the share of "
        "features answered (0 when nothing parsed); mean over val ads",
        "val_score_before": rounded(dr.val_aggregate_scores[0]),
        "val_score_after": rounded(dr.val_aggregate_scores[best]),
        "val_scores_before": val_scores[0],
        "val_scores_after": val_scores[best],
        "best_candidate": best,
        "candidates": len(dr.candidates),
        "budget": {
            "max_metric_calls": recipe.gepa.max_metric_calls,
            "metric_calls_used": dr.total_metric_calls,
            "full_val_evaluations": dr.num_full_val_evals,
        },
        "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
        "tokens": _sum_tokens(runs),
        "runs": runs,
        "interrupted_runs": _interrupted_runs(evo / "events.jsonl"),
        "generate_flags": (
            f"--batch-size {cfg.batch_size} --samples {cfg.samples}"
            + ("" if cfg.judge else " --no-judge")
            + (" --hide-titles" if cfg.hide_titles else "")
        ),
        "evolution": str(evo),
        "gepa_log_dir": str(evo / "gepa"),
        "created": old.get("created", now()),
        "updated": now(),
        "git": git_commit(),
        "versions": versions(),
    }
    write_json_atomic(manifest_path, manifest)
    return CompileResult(
        name,
        program_path,
        manifest_path,
        evo,
        manifest["val_score_before"],
        manifest["val_score_after"],
        best,
        int(dr.total_metric_calls or 0),
        manifest,
    )


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
    for e in read_jsonl(events):
        if e.get("event") == "run_start":
            runs[e["run"]] = {"run": e["run"], "started": e["time"], "status": "killed (no run_end)"}
        elif e.get("event") == "run_end" and e.get("run") in runs:
            if e.get("status") == "complete":
                runs.pop(e["run"])
            else:
                runs[e["run"]].update(
                    status=e.get("status"),
                    ended=e["time"],
                    wall_seconds=e.get("wall_seconds"),
                    error=e.get("error"),
                )
    return [runs[k] for k in sorted(runs)]
