"""The evolution log: a GEPA callback that writes our own JSON format into `programs/NAME.evolution/`.

    candidates.json    every candidate: instructions per predictor, parents, per-ad val scores
    pareto.json        the per-ad Pareto front
    iterations.jsonl   per iteration: parent, minibatch, reflective dataset with feedback, the reflection
                       prompt and reply, scores before/after, outcome
    events.jsonl       every GEPA callback event (compact), plus run start/end

GEPA calls `on_<event>(event)` for each of its events. Most only copy a few fields into events.jsonl and the
current iteration's record; the tables `LOGGED` and `RECORDED` say which, and one `handle` writes them. The
events that need more (a new iteration, scores, the proposal, a scored candidate) have a hook `_on_<event>`.
Data ids are GEPA's positions in the train / val lists; they are written as ad ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import DataError
from llmhyper.optimize.metric import CTRFeedbackMetric, rounded
from llmhyper.store import (
    append_jsonl,
    jsonable,
    now,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)

FORMAT = "llmhyper-evolution/1"
Getter = str | Callable[[dict[str, Any]], Any]  # a GEPA event field, or a function of the event


def _error(ev: dict[str, Any]) -> str:
    exc = ev.get("exception")
    return f"{type(exc).__name__}: {exc}"


# GEPA event -> what its events.jsonl line keeps besides `iteration` (our name: GEPA's field or a function)
LOGGED: dict[str, dict[str, Getter]] = {
    "optimization_start": {
        "trainset_size": "trainset_size",
        "valset_size": "valset_size",
        "config": "config",
    },
    "iteration_start": {},
    "candidate_selected": {"candidate": "candidate_idx", "score": "score"},
    "minibatch_sampled": {},
    "evaluation_start": {"candidate": "candidate_idx", "batch_size": "batch_size", "parents": "parent_ids"},
    "evaluation_end": {"candidate": "candidate_idx"},
    "evaluation_skipped": {"candidate": "candidate_idx", "reason": "reason", "scores": "scores"},
    "reflective_dataset_built": {"candidate": "candidate_idx", "components": "components"},
    "proposal_start": {"components": "components"},
    "proposal_end": {},
    "candidate_accepted": {
        "candidate": "new_candidate_idx",
        "subsample_score": "new_score",
        "parents": "parent_ids",
    },
    "candidate_rejected": {"old": "old_score", "new": "new_score", "reason": "reason"},
    "merge_attempted": {"parents": "parent_ids"},
    "merge_accepted": {"candidate": "new_candidate_idx", "parents": "parent_ids"},
    "merge_rejected": {"parents": "parent_ids", "reason": "reason"},
    "pareto_front_updated": {"front": "new_front", "displaced": "displaced_candidates"},
    "valset_evaluated": {},
    "budget_updated": {
        "used": "metric_calls_used",
        "delta": "metric_calls_delta",
        "remaining": "metric_calls_remaining",
    },
    "state_saved": {},
    "error": {"error": _error, "will_continue": "will_continue"},
    "iteration_end": {},
    "optimization_end": {
        "best": "best_candidate_idx",
        "iterations": "total_iterations",
        "metric_calls": "total_metric_calls",
    },
}

# GEPA event -> what it sets on the current iteration's record
RECORDED: dict[str, dict[str, Getter]] = {
    "candidate_selected": {
        "parent": "candidate_idx",
        "parent_val_score": lambda ev: rounded(ev.get("score")),
    },
    "evaluation_skipped": {"outcome": lambda ev: "skipped", "reason": "reason"},
    "candidate_accepted": {"new_candidate": "new_candidate_idx"},
    "candidate_rejected": {"outcome": lambda ev: "rejected", "reason": "reason"},
    "merge_attempted": {"merge_of": lambda ev: list(ev.get("parent_ids") or [])},
    "merge_accepted": {"outcome": lambda ev: "merged", "new_candidate": "new_candidate_idx"},
    "merge_rejected": {"outcome": lambda ev: "merge_rejected", "reason": "reason"},
    "error": {"error": _error},
}


def _get(ev: dict[str, Any], how: Getter) -> Any:
    return how(ev) if callable(how) else ev.get(how)


class EvolutionRecorder:
    """A GEPA callback (duck-typed `gepa.core.callbacks.GEPACallback`) that writes the evolution folder."""

    def __init__(
        self,
        folder: Path,
        train_ids: list[str],
        val_ids: list[str],
        reflection_lm=None,
        run_no: int = 1,
        predictors: list[str] | None = None,
        metric: CTRFeedbackMetric | None = None,
    ):
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
                for c in read_json(path, "candidates file").get("candidates", []):
                    self.candidates[int(c["id"])] = c
            except (DataError, AttributeError, ValueError, KeyError, TypeError):
                pass

    # -- files -----------------------------------------------------------------------------------------
    @property
    def iterations_path(self) -> Path:
        return self.folder / "iterations.jsonl"

    def event(self, kind: str, **fields: Any) -> None:
        record = {"time": now(), "run": self.run_no, "event": kind, **fields}
        append_jsonl(self.folder / "events.jsonl", [record])

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
        return {self._ads([k], train=False)[0]: rounded(v) for k, v in dict(scores).items()}

    def write_candidates(self, best: int | None = None) -> None:
        cands = [self.candidates[i] for i in sorted(self.candidates)]
        if best is None and cands:
            best = max(cands, key=lambda c: (c.get("val_score") or -1.0, -c["id"]))["id"]
        write_json_atomic(
            self.folder / "candidates.json",
            {
                "format": FORMAT,
                "predictors": self.predictors,
                "val_ads": self.val_ids,
                "train_ads": self.train_ids,
                "best": best,
                "candidates": cands,
            },
        )
        per_ad = {}
        for ad in self.val_ids:
            scored = [
                (c["val_scores"].get(ad), c["id"])
                for c in cands
                if c.get("val_scores", {}).get(ad) is not None
            ]
            if scored:
                top = max(s for s, _ in scored)
                per_ad[ad] = {"best_score": top, "candidates": sorted(i for s, i in scored if s == top)}
        front = sorted({i for v in per_ad.values() for i in v["candidates"]})
        agg = float(np.mean([v["best_score"] for v in per_ad.values()])) if per_ad else None
        write_json_atomic(
            self.folder / "pareto.json",
            {
                "format": FORMAT,
                "val_ads": self.val_ids,
                "per_ad": per_ad,
                "front": front,
                "front_aggregate": rounded(agg),
            },
        )

    def _rewrite_iterations(self, keep: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        if not self.iterations_path.exists():
            return
        kept = [r for r in (keep(r) for r in read_jsonl(self.iterations_path)) if r is not None]
        write_text_atomic(self.iterations_path, "".join(f"{_dumps(r)}\n" for r in kept))

    def interrupted(self) -> None:
        """Called when the run dies: an iteration cut short is marked as such (a resumed run replays it)."""
        last = self._last_written
        if last is not None and not last[1]:
            self._rewrite_iterations(
                lambda r: (
                    {**r, "outcome": "interrupted"}
                    if r.get("iteration") == last[0] and r.get("run") == self.run_no
                    else r
                )
            )

    # -- GEPA callbacks --------------------------------------------------------------------------------
    def handle(self, kind: str, ev: dict[str, Any]) -> None:
        """One GEPA event: the table's fields to the iteration record, the hook (if any), one log line."""
        logged = {"iteration": ev.get("iteration")} if "iteration" in ev else {}
        logged.update({ours: _get(ev, how) for ours, how in LOGGED[kind].items()})
        if self.iteration is not None:
            self.iteration.update({ours: _get(ev, how) for ours, how in RECORDED.get(kind, {}).items()})
        hook = getattr(self, f"_on_{kind}", None)
        if hook is not None:
            extra = hook(ev)
            if extra is None:  # the hook found nothing to log
                return
            logged.update(extra)
        self.event(kind, **logged)

    def _on_iteration_start(self, ev) -> dict[str, Any]:
        it = int(ev["iteration"])
        state = ev.get("state")
        if not self._pruned:  # records of iterations GEPA's saved state does not hold will be replayed
            self._pruned = True
            dropped = [
                r.get("iteration")
                for r in read_jsonl(self.iterations_path)
                if int(r.get("iteration", 0)) >= it
            ]
            if dropped:
                self._rewrite_iterations(lambda r: None if int(r.get("iteration", 0)) >= it else r)
                self.event("iterations_replayed", iterations=dropped)
        self.metric_calls = int(getattr(state, "total_num_evals", self.metric_calls))
        self.iteration = {
            "iteration": it,
            "run": self.run_no,
            "started": now(),
            "metric_calls_at_start": self.metric_calls,
        }
        # a fresh reflection sample per iteration; the same one when a resumed run replays the iteration
        lm = self.reflection_lm
        if lm is not None and (lm.kwargs.get("temperature") or 0) > 0:
            lm.kwargs["rollout_id"] = it
        return {"iteration": it}

    def _on_minibatch_sampled(self, ev) -> dict[str, Any]:
        ads = self._ads(ev.get("minibatch_ids"))
        if self.iteration is not None:
            self.iteration["minibatch"] = ads
        return {"ads": ads}

    def _on_evaluation_end(self, ev) -> dict[str, Any]:
        scores = [rounded(s) for s in ev.get("scores") or []]
        if self.iteration is not None:
            who = "parent" if ev.get("candidate_idx") is not None else "new"
            self.iteration[f"{who}_scores"] = scores
            self.iteration[f"{who}_outputs"] = _outputs_summary(ev.get("outputs"))
            if self.metric is not None:  # the metric's numbers for the minibatch ads, as just computed
                self.iteration[f"{who}_assessments"] = [
                    self.metric.last[a].summary() if a in self.metric.last else None
                    for a in self.iteration.get("minibatch", [])
                ]
        return {"scores": scores}

    def _on_reflective_dataset_built(self, ev) -> dict[str, Any]:
        dataset = jsonable(ev.get("dataset") or {})
        if self.iteration is not None:
            self.iteration["components"] = list(ev.get("components") or [])
            self.iteration["reflective_dataset"] = dataset
            self.iteration["feedback"] = {
                k: [r.get("Feedback") for r in v if isinstance(r, dict)] for k, v in dataset.items()
            }
        return {"records": {k: len(v) for k, v in dataset.items()}}

    def _on_proposal_start(self, ev) -> dict[str, Any]:
        self._mark = len(getattr(self.reflection_lm, "history", []) or [])
        return {}

    def _on_proposal_end(self, ev) -> dict[str, Any]:
        calls = [
            jsonable({k: h.get(k) for k in ("messages", "outputs", "usage", "model", "timestamp")})
            for h in list(getattr(self.reflection_lm, "history", []) or [])[self._mark :]
        ]
        if self.iteration is not None:
            self.iteration["proposal"] = {
                "new_instructions": jsonable(ev.get("new_instructions")),
                "prompts": jsonable(ev.get("prompts")),
                "raw_lm_outputs": jsonable(ev.get("raw_lm_outputs")),
                "reflection_calls": calls,
            }
        return {
            "components": sorted((ev.get("new_instructions") or {}).keys()),
            "reflection_calls": len(calls),
        }

    def _on_candidate_accepted(self, ev) -> dict[str, Any]:
        idx = ev.get("new_candidate_idx")
        if self.iteration is not None:
            self.iteration.setdefault("outcome", "accepted")
            if idx in self.candidates:
                self.candidates[idx]["iteration"] = self.iteration["iteration"]
        return {}

    def _on_merge_accepted(self, ev) -> dict[str, Any]:
        idx = ev.get("new_candidate_idx")
        if idx in self.candidates:
            self.candidates[idx]["origin"] = "merge"
        return {}

    def _on_valset_evaluated(self, ev) -> dict[str, Any]:
        idx = int(ev["candidate_idx"])
        parents = [p for p in (ev.get("parent_ids") or []) if p is not None]
        old = self.candidates.get(idx, {})
        evaluated = int(ev.get("num_examples_evaluated") or 0)
        parent = self.candidates.get(parents[0], {}).get("instructions") if parents else None
        found_at = 0 if idx == 0 else max(0, self.metric_calls - evaluated)
        rec = {
            "id": idx,
            "parents": parents,
            "instructions": dict(ev.get("candidate") or {}),
            "val_scores": self._val_scores(ev.get("scores_by_val_id") or {}),
            "val_score": rounded(ev.get("average_score")),
            "origin": old.get("origin") or ("seed" if idx == 0 else "reflection"),
            "iteration": old.get("iteration", 0 if idx == 0 else ev.get("iteration")),
            "discovered_at_metric_calls": old.get("discovered_at_metric_calls", found_at),
            "changed": _changed(ev.get("candidate") or {}, parent),
        }
        if self.iteration is not None and idx != 0:
            self.iteration["new_candidate"] = idx
            self.iteration["val_score"] = rec["val_score"]
            rec["iteration"] = self.iteration["iteration"]
        self.candidates[idx] = rec
        self.write_candidates()
        return {
            "candidate": idx,
            "parents": parents,
            "score": ev.get("average_score"),
            "scores": rec["val_scores"],
            "is_best": ev.get("is_best_program"),
        }

    def _on_budget_updated(self, ev) -> dict[str, Any]:
        self.metric_calls = int(ev.get("metric_calls_used") or self.metric_calls)
        return {}

    def _on_iteration_end(self, ev) -> dict[str, Any] | None:
        rec = self.iteration
        if rec is None:
            return None
        rec["ended"] = now()
        rec["accepted"] = bool(ev.get("proposal_accepted"))
        finished = "outcome" in rec or rec["accepted"]
        rec.setdefault("outcome", "accepted" if rec["accepted"] else "no_proposal")
        rec["metric_calls_at_end"] = getattr(ev.get("state"), "total_num_evals", self.metric_calls)
        append_jsonl(self.iterations_path, [rec])
        self._last_written = (int(rec["iteration"]), finished)
        self.iteration = None
        return {"iteration": rec["iteration"], "outcome": rec["outcome"]}

    def _on_optimization_end(self, ev) -> dict[str, Any]:
        state = ev.get("final_state")
        if state is not None:
            self.sync_from_state(state)
        return {}

    def sync_from_state(self, state, best: int | None = None) -> None:
        """Make candidates.json agree with GEPA's final state (which also knows earlier runs' candidates)."""
        for idx, cand in enumerate(state.program_candidates):
            old = self.candidates.get(idx, {})
            parents = [p for p in state.parent_program_for_candidate[idx] if p is not None]
            scores = state.prog_candidate_val_subscores[idx]
            vals = [v for v in scores.values() if v is not None]
            self.candidates[idx] = {
                "id": idx,
                "parents": parents,
                "instructions": dict(cand),
                "val_scores": self._val_scores(scores),
                "val_score": rounded(float(np.mean(vals))) if vals else None,
                "origin": old.get("origin")
                or ("seed" if idx == 0 else ("merge" if len(parents) > 1 else "reflection")),
                "iteration": old.get("iteration", 0 if idx == 0 else None),
                "discovered_at_metric_calls": int(state.num_metric_calls_by_discovery[idx]),
                "changed": _changed(cand, state.program_candidates[parents[0]] if parents else None),
            }
        self.write_candidates(best)


def _handler(kind: str) -> Callable[[EvolutionRecorder, dict[str, Any]], None]:
    def on_event(self: EvolutionRecorder, ev: dict[str, Any]) -> None:
        self.handle(kind, ev)

    on_event.__name__ = on_event.__qualname__ = f"on_{kind}"
    return on_event


for _kind in LOGGED:  # the GEPACallback methods: on_optimization_start, on_iteration_start, ...
    setattr(EvolutionRecorder, f"on_{_kind}", _handler(_kind))


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(jsonable(record))


def _changed(cand: dict, parent: dict | None) -> list[str]:
    if not parent:
        return []
    return sorted(k for k in cand if cand.get(k) != parent.get(k))


def _outputs_summary(outputs) -> list[Any]:
    out = []
    for o in outputs or []:
        try:
            out.append(
                {
                    "weights": jsonable(dict(o.get("weights") or {})),
                    "failed_features": sorted(dict(o.get("failed_features") or {})),
                    "flags": jsonable(o.get("flags") or []),
                    "parse_failures": o.get("parse_failures"),
                }
            )
        except Exception:
            out.append(None)
    return out
