"""Running the edit program over ads, resumably, and fitting its gate.

`edit_ads` runs the program on each ad (a cold ad, or a retired ad treated as cold during compile, whose
prior is out of fold and whose neighbours exclude itself) and keeps one record per ad in a `RunDir`: the
labels and their distributions, tokens, seconds. Because a record keeps the labels, the weights for any
gamma are recomputed from the records without calling the LM again (`edit_table`).

`compile_gate` is the compile of this shape: it runs each prompt variant on held-out retired ads (one run
folder per variant) and searches the gates over their labels (`edit_gate.search_gates`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from llmhyper.ctr.prepare import Prepared
from llmhyper.data.scaling import stamp_scaling
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.edit import EditProgram, Gate
from llmhyper.hyper.edit_gate import search_gates
from llmhyper.hyper.edit_inputs import (
    EditContext,
    edit_examples,
    edit_vector,
    edit_weights,
    finish_edit,
    held_out_neighbours,
)
from llmhyper.hyper.views import ad_view
from llmhyper.runs import RunDir
from llmhyper.store import now
from llmhyper.weights import WeightTable

METHOD = "llm_edit"


@dataclass(frozen=True)
class GateSettings:
    n_ads: int = 40  # held-out retired ads the program runs on
    seed: int = 0
    max_gamma: float = 2.0


def edit_ads(
    prep: Prepared,
    ctx: EditContext,
    program: EditProgram,
    ad_ids: list[str],
    run: RunDir,
    settings: dict[str, Any],
    captions: dict[str, str],
    neighbours: dict[str, list] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the program on every ad without a finished record; returns all finished records by ad id."""
    features = [f.model_dump() for f in prep.data.features]
    done = run.finished()
    todo = [a for a in ad_ids if a not in done]
    for i, ad_id in enumerate(todo, 1):
        t0 = time.time()
        nbs = (neighbours or prep.neighbours)[ad_id]
        record: dict[str, Any] = {
            "ad_id": ad_id,
            "title": prep.data.ad_by_id[ad_id].title,
            "neighbours": [{"id": n.ad_id, "similarity": round(float(n.similarity), 4)} for n in nbs],
        }
        try:
            pred = program(
                ad=ad_view(prep, ad_id, captions),
                examples=edit_examples(prep, ctx, ad_id, captions, nbs),
                features=features,
                prior=ctx.prior_weights(ad_id),
            )
        except LLMHyperError:
            raise
        except Exception as exc:  # one ad's trouble must not stop the run; it is retried on resume
            record.update({"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
        else:
            record.update(
                {
                    "status": "ok" if not pred.failed_features else "partial",
                    "edits": pred.edits,
                    "distributions": pred.distributions,
                    "failed_features": pred.failed_features,
                    "attempts": pred.attempts,
                    "calls": pred.calls,
                    "parse_failures": pred.parse_failures,
                    "tokens": pred.tokens,
                }
            )
        record["seconds"] = round(time.time() - t0, 2)
        run.write_record(ad_id, record, settings)
        if progress:
            cached = all(a.get("cached") for a in record.get("attempts", [])) and record.get("attempts")
            print(
                f"llmhyper: edit {i}/{len(todo)} {ad_id} {record['status']} {record['seconds']} s"
                f" ({record.get('tokens', {}).get('prompt_tokens', 0)} prompt tokens"
                f"{', cached' if cached else ''})",
                file=sys.stderr,
                flush=True,
            )
    return run.finished()


def edit_table(
    prep: Prepared,
    ctx: EditContext,
    records: dict[str, dict[str, Any]],
    ad_ids: list[str],
    gate: Gate | float,
    calibrate: bool,
    method: str = METHOD,
) -> WeightTable:
    """The servable artifact for the ads with a record: prior + gamma * edit * unit, with the prior's own
    intercept (`calibrate=False`) or through the normaliser (L2 norm + shift to the neighbours' alpha)."""
    ids = [a for a in ad_ids if a in records]
    thetas, bs = [], []
    for a in ids:
        if calibrate:
            rec = finish_edit(prep, ctx, a, records[a]["edits"], gate, prep.alphas[a])
            thetas.append([rec["normalized_weights"][f] for f in ctx.feature_names])
            bs.append(rec["delta"])
        else:
            theta, b = edit_weights(ctx, a, records[a]["edits"], gate)
            thetas.append(theta)
            bs.append(b)
    d = len(ctx.feature_names)
    table = WeightTable(
        method,
        ids,
        ctx.feature_names,
        np.array(thetas).reshape(len(ids), d),
        np.array(bs),
        meta={
            "gamma": gate.record() if isinstance(gate, Gate) else gate,
            "calibrated": calibrate,
            "prior": ctx.prior.meta.get("chosen_by"),
            "prior_inputs": ctx.prior.inputs,
            "prior_alpha": ctx.prior.alpha,
        },
    )
    return stamp_scaling(table, prep.data.scaling)  # so `serve` can take raw features


def validation_ads(prep: Prepared, settings: GateSettings) -> list[str]:
    """The first `n_ads` of a seeded order of the retired ads: a larger budget extends a smaller one, so a
    compile rerun with more ads reuses every label it already has."""
    pool = list(prep.retired.ad_ids)
    order = np.random.default_rng(settings.seed).permutation(len(pool))
    return [pool[i] for i in order[: min(settings.n_ads, len(pool))]]


def compile_gate(
    prep: Prepared,
    ctx: EditContext,
    programs: dict[str, EditProgram],
    runs: dict[str, RunDir],
    captions: dict[str, str],
    settings: GateSettings,
    run_settings: dict[str, dict[str, Any]],
    progress: bool = True,
) -> dict[str, Any]:
    """Run each prompt variant on the held-out retired ads (each into its run folder), then search the
    gates over their labels. Ads a variant could not label are left out of every candidate's score."""
    ids = validation_ads(prep, settings)
    nbs = held_out_neighbours(prep, ctx, ids)  # never itself, nor (when grouped) its own group
    records = {
        v: edit_ads(prep, ctx, p, ids, runs[v], run_settings[v], captions, nbs, progress)
        for v, p in programs.items()
    }
    ok = [a for a in ids if all(a in r for r in records.values())]
    labels = {v: {a: edit_vector(ctx, r[a]["edits"]) for a in ok} for v, r in records.items()}
    result = search_gates(prep, ctx, labels, ok, settings.max_gamma)
    recs = [r[a] for r in records.values() for a in ok]
    return {
        **result,
        "lm_calls": sum(int(r.get("calls", 0)) for r in recs),
        "parse_failures": sum(int(r.get("parse_failures", 0)) for r in recs),
        "prompt_tokens": sum(int(r.get("tokens", {}).get("prompt_tokens", 0)) for r in recs),
        "completion_tokens": sum(int(r.get("tokens", {}).get("completion_tokens", 0)) for r in recs),
        "seconds": round(sum(float(r.get("seconds", 0)) for r in recs), 1),
        "settings": asdict(settings),
        "finished": now(),
    }
