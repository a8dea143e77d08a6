"""The gate of the edit program and the search that chooses it.

A gate turns the LM's labels into weights: theta = prior + gamma * (edit - bias) * unit, with `gamma`
one number or one per feature group (`share_*`, `like_*`, the rest) and `bias` zero or the mean label per
feature on the fit ads (a small LM answers some positions higher than others whatever the ad: the bias
removes that). The compile's search is reflection-free: each prompt variant (how many past ads the LM
sees) is run once on held-out retired ads, and every read-out of its labels is scored from those records
without another LM call. Three disjoint thirds of the validation ads: gates are fitted on the first,
chosen on the second, and the chosen one is reported on the third, so the figure is not the one chosen on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmhyper.ctr.metrics import pooled_auc
from llmhyper.ctr.prepare import Prepared
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.edit import Gate, feature_groups, fit_gate
from llmhyper.hyper.edit_inputs import EditContext

READOUTS = (
    {"debias": False, "per_group": False},
    {"debias": True, "per_group": False},
    {"debias": False, "per_group": True},
    {"debias": True, "per_group": True},
)


def gated_auc(
    prep: Prepared, ctx: EditContext, edits: dict[str, np.ndarray], ids: list[str], gate: Gate
) -> float:
    """Pooled AUC over train users x `ids` (retired ads held out) of the prior edited through `gate`."""
    data = prep.data
    users = data.train_users
    _, Y, M = data.block(users, ids)
    th = np.stack([gate.theta(ctx.theta[a], edits[a], ctx.units) for a in ids])
    b = np.array([ctx.intercept[a] for a in ids])
    return float(pooled_auc(Y, data.X[users] @ th.T + b, mask=M))


def split_thirds(ids: list[str]) -> tuple[list[str], list[str], list[str]]:
    """fit, select, report: every third ad, so a larger budget keeps each third's earlier members."""
    return ids[0::3], ids[1::3], ids[2::3]


def search_gates(
    prep: Prepared,
    ctx: EditContext,
    labels: dict[str, dict[str, np.ndarray]],
    ids: list[str],
    max_gamma: float = 2.0,
) -> dict[str, Any]:
    """Score every (prompt variant, read-out) on the validation thirds; returns the table and the choice.

    `labels[variant][ad_id]` is the edit vector the variant's LM call gave that ad (NaN where it gave none).
    The prior alone (gamma 0) is a candidate too: it wins unless a gate beats it on the select third."""
    fit, select, report = split_thirds(ids)
    if min(len(fit), len(select), len(report)) < 2:
        raise LLMHyperError(f"{len(ids)} validation ads are too few for fit/select/report thirds (need 6)")
    d = len(ctx.feature_names)
    groups = feature_groups(ctx.feature_names)
    rows = prep.retired.index_of(fit)
    prior, trained = np.stack([ctx.theta[a] for a in fit]), prep.retired.theta[rows]
    zero = Gate.scalar(0.0, d)
    any_labels = next(iter(labels.values()))
    prior_scores = {
        "select": gated_auc(prep, ctx, any_labels, select, zero),
        "report": gated_auc(prep, ctx, any_labels, report, zero),
    }
    table = [{"variant": "prior", "readout": "gamma 0", "select_auc": prior_scores["select"], "gate": zero}]
    for variant, edits in labels.items():
        for ro in READOUTS:
            e = np.stack([edits[a] for a in fit])
            gate = fit_gate(prior, e, ctx.units, trained, groups, ro["debias"], ro["per_group"], max_gamma)
            name = ("debiased" if ro["debias"] else "raw") + (", gamma per group" if ro["per_group"] else "")
            score = gated_auc(prep, ctx, edits, select, gate)
            table.append({"variant": variant, "readout": name, **ro, "select_auc": score, "gate": gate})
    best = max(table, key=lambda r: (r["select_auc"], r["variant"] == "prior"))  # ties: the prior
    labels_best = labels.get(best["variant"], any_labels)
    after = gated_auc(prep, ctx, labels_best, report, best["gate"])
    return {
        "chosen": best,
        "validation_auc_prior": prior_scores["report"],
        "validation_auc_edited": after,
        "select_auc_prior": prior_scores["select"],
        "fit_ads": fit,
        "select_ads": select,
        "report_ads": report,
        "candidates": [
            {
                "variant": r["variant"],
                "readout": r["readout"],
                "select_auc": round(r["select_auc"], 6),
                "mean_gamma": round(float(r["gate"].gamma.mean()), 4),
            }
            for r in table
        ],
        # one metric call = one candidate scored on one validation ad (fit + select; the chosen on report)
        "metric_calls": (len(table) - 1) * len(fit + select) + len(select) + 2 * len(report),
    }
