"""`llmhyper report`: one self-contained HTML page (inline CSS and SVG, no script, no remote resource) and a
Markdown twin with the same tables, for one or more generate runs and the trust studies about them:

- metrics with 95% intervals (bars), from `llmhyper evaluate --json` output or computed here for LR_warm and
  the runs (test users x the ads every run covers);
- generated vs trained weights: a heatmap of ads x features for LR_warm (each row L2-normalised, as the
  generated weights are) and for each run, side by side, with the per-ad cosine between them;
- a calibration curve (reliability diagram) of predicted vs observed CTR on the test users;
- the explainability, counterfactual-robustness and ablation tables (`llmhyper trust ...` folders).
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import LLMHyperError
from llmhyper.ctr.normalize import l2_normalize_rows

METRIC_KEYS = ("ad_auc", "auc", "ndcg10")
METRIC_NAMES = {
    "ad_auc": "ad-AUC",
    "auc": "AUC",
    "ndcg10": "NDCG@10",
    "ndcg5": "NDCG@5",
    "logloss": "log loss",
    "ece": "ECE",
    "calib_ratio": "pred/obs CTR",
}
PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


# =====================================================================================================
# gathering
# =====================================================================================================


def run_name(run: Path, taken: set[str]) -> str:
    name = "llm_hyper" if "llm_hyper" not in taken else f"llm_hyper:{run.name}"
    i = 2
    while name in taken:
        name, i = f"llm_hyper:{run.name}#{i}", i + 1
    return name


def calibration_bins(Y: np.ndarray, P: np.ndarray, M: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-count bins of the predicted CTR: mean prediction, observed click rate, count."""
    y, p = Y[M].astype(np.float64), P[M].astype(np.float64)
    if not p.size:
        return []
    order = np.argsort(p, kind="stable")
    out = []
    for chunk in np.array_split(order, min(n_bins, p.size)):
        if chunk.size:
            out.append({"pred": float(p[chunk].mean()), "obs": float(y[chunk].mean()), "n": int(chunk.size)})
    return out


def gather(
    data,
    runs: list[str | Path],
    *,
    eval_result: dict[str, Any] | None = None,
    explain: dict[str, Any] | None = None,
    robustness: dict[str, Any] | None = None,
    ablation: dict[str, Any] | None = None,
    lr_warm=None,
    max_ads: int = 60,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the page shows, as plain data (JSON-able)."""
    from llmhyper.ctr.metrics import METRICS, bootstrap_interval, ece
    from llmhyper.ctr.warm import train_warm
    from llmhyper.weights import WeightTable

    if not runs:
        raise LLMHyperError("give at least one run (--runs)")
    names = data.feature_names
    tables: dict[str, Any] = {}
    run_info = []
    for r in runs:
        r = Path(r)
        if not (r / "weights").exists():
            raise LLMHyperError(f"{r} is not a generate run (no weights/ folder)")
        name = run_name(r, set(tables))
        tables[name] = WeightTable.load(r / "weights").aligned(names)
        manifest = json.loads((r / "manifest.json").read_text()) if (r / "manifest.json").exists() else {}
        run_info.append(
            {
                "name": name,
                "path": str(r),
                "lm": (manifest.get("lm") or {}).get("model") or (manifest.get("config") or {}).get("lm"),
                "totals": manifest.get("totals", {}),
                "config": manifest.get("config", {}),
            }
        )
    covered = set.intersection(*(set(t.ad_ids) for t in tables.values()))
    ads = [a for a in data.cold_ads if a in covered]
    if not ads:
        raise LLMHyperError("the runs have no cold ad in common")
    if lr_warm is None:
        lr_warm = train_warm(data, ads, method="lr_warm", min_pos=1, min_neg=1, progress=False)
    lr_warm = lr_warm.aligned(names)
    ads_lr = [a for a in ads if a in set(lr_warm.ad_ids)]
    methods = {"lr_warm": lr_warm.subset(ads_lr), **{n: t.subset(ads) for n, t in tables.items()}}

    # heatmap: the first max_ads ads that every panel has
    shown = ads_lr[:max_ads]
    lr_all = l2_normalize_rows(methods["lr_warm"].theta)  # rows in ads_lr order, so shown = the first rows
    panels = [{"name": "lr_warm (trained, row-normalised)", "matrix": lr_all[: len(shown)].round(4).tolist()}]
    first = next(iter(tables))
    cosines = {}
    for n, t in tables.items():
        m = l2_normalize_rows(t.subset(ads_lr).theta)
        panels.append({"name": f"{n} (generated, normalised)", "matrix": m[: len(shown)].round(4).tolist()})
        # the cosine table covers every ad, not just the rows the heatmap shows
        cosines[n] = (m * lr_all).sum(axis=1).round(4).tolist()
    heatmap = {
        "ads": shown,
        "titles": [data.ad_by_id[a].title for a in shown],
        "features": list(names),
        "panels": panels,
        "cosine_vs_lr_warm": cosines,
        "n_ads_total": len(ads_lr),
    }

    # calibration and metrics on the test users
    users = data.test_users
    calibration, computed = {}, {}
    for n, t in methods.items():
        _, Y, M = data.block(users, t.ad_ids)
        P = t.predict(data.X[users])
        calibration[n] = {
            "bins": calibration_bins(Y, P, M),
            "ece": float(ece(Y, P, M)),
            "mean_pred": float(P[M].mean()),
            "mean_obs": float(Y[M].mean()),
            "ads": len(t.ad_ids),
        }
        if eval_result is None:
            computed[n] = {}
            for key in METRIC_KEYS:
                v, lo, hi = bootstrap_interval(METRICS[key], Y, P, mask=M, n_boot=n_boot, seed=seed)
                computed[n][key] = {"value": v, "lo": lo, "hi": hi}
    if eval_result is not None:
        metrics = {
            "source": "evaluate JSON",
            "n_ads": eval_result.get("n_ads"),
            "n_test_users": eval_result.get("n_test_users"),
            "n_boot": eval_result.get("n_boot"),
            "methods": {
                n: {k: row[k] for k in METRIC_KEYS if k in row} for n, row in eval_result["methods"].items()
            },
            "vs_bar": {
                n: row[k] for n, row in eval_result["methods"].items() for k in row if k.startswith("vs_")
            },
            "bar": next(
                (k[3:] for row in eval_result["methods"].values() for k in row if k.startswith("vs_")), None
            ),
        }
    else:
        metrics = {
            "source": "computed by the report (LR_warm and the runs only)",
            "n_ads": len(ads),
            "n_test_users": int(len(users)),
            "n_boot": n_boot,
            "methods": computed,
            "vs_bar": {},
        }
    return {
        "dataset": data.name,
        "runs": run_info,
        "first_run": first,
        "n_ads": len(ads),
        "metrics": metrics,
        "heatmap": heatmap,
        "calibration": calibration,
        "explain": explain,
        "robustness": robustness,
        "ablation": ablation,
    }


# =====================================================================================================
# SVG pieces (inline, no xmlns needed in HTML5)
# =====================================================================================================


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def diverging(v: float) -> str:
    """-1 blue, 0 white, +1 red."""
    v = max(-1.0, min(1.0, float(v))) if math.isfinite(v) else 0.0
    end = (178, 24, 43) if v > 0 else (33, 102, 172)
    a = abs(v)
    rgb = [round(255 + (c - 255) * a) for c in end]
    return "#%02x%02x%02x" % tuple(rgb)


def heatmap_svg(
    panel: dict[str, Any],
    features: list[str],
    labels: list[str],
    vmax: float,
    cell: int = 10,
    row_labels: bool = True,
) -> str:
    m = np.asarray(panel["matrix"], dtype=np.float64)
    left = 170 if row_labels else 6
    top = 120
    w = left + cell * len(features) + 6
    h = top + cell * len(labels) + 6
    parts = [
        f'<svg class="heatmap" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{_e(panel["name"])}">',
        f"<title>{_e(panel['name'])}</title>",
    ]
    for j, f in enumerate(features):
        x = left + j * cell + cell * 0.7
        parts.append(
            f'<text class="col" x="{x:.1f}" y="{top - 4}" transform="rotate(-60 {x:.1f} {top - 4})">'
            f"{_e(f)}</text>"
        )
    for i, lab in enumerate(labels):
        y = top + i * cell
        if row_labels:
            parts.append(
                f'<text class="row" x="{left - 4}" y="{y + cell - 2}" text-anchor="end">{_e(lab[:28])}</text>'
            )
        for j, f in enumerate(features):
            v = m[i, j] / vmax if vmax > 0 else 0.0
            parts.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{diverging(v)}"><title>{_e(lab[:40])} / {_e(f)}: {m[i, j]:+.3f}</title></rect>'
            )
    parts.append("</svg>")
    return "".join(parts)


def colour_bar_svg(vmax: float) -> str:
    stops = "".join(
        f'<rect x="{20 + i * 4}" y="4" width="4" height="12" fill="{diverging(-1 + i / 25)}"/>'
        for i in range(51)
    )
    return (
        f'<svg class="colourbar" width="260" height="34" role="img" aria-label="colour scale">{stops}'
        f'<text x="20" y="30">{-vmax:+.2f}</text><text x="118" y="30">0</text>'
        f'<text x="205" y="30">{vmax:+.2f}</text></svg>'
    )


def calibration_svg(calibration: dict[str, Any], size: int = 360) -> str:
    pad = 46
    top = max([b[k] for c in calibration.values() for b in c["bins"] for k in ("pred", "obs")] + [0.05])
    top = min(1.0, math.ceil(top * 10) / 10)
    sc = lambda v: (size - 2 * pad) * v / top  # noqa: E731
    X = lambda v: pad + sc(v)  # noqa: E731
    Y = lambda v: size - pad - sc(v)  # noqa: E731
    parts = [
        f'<svg class="calibration" width="{size + 170}" height="{size}" viewBox="0 0 {size + 170} {size}" '
        f'role="img" aria-label="calibration curve"><title>calibration curve</title>',
        f'<rect x="{pad}" y="{pad}" width="{size - 2 * pad}" height="{size - 2 * pad}" class="frame"/>',
        f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(top)}" y2="{Y(top)}" class="diag"/>',
    ]
    for t in np.linspace(0, top, 6):
        parts.append(f'<text x="{X(t):.1f}" y="{size - pad + 14}" text-anchor="middle">{t:.2f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:.2f}</text>')
    parts.append(f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle">mean predicted CTR (bin)</text>')
    parts.append(
        f'<text x="12" y="{size / 2}" transform="rotate(-90 12 {size / 2})" text-anchor="middle">'
        "observed click rate</text>"
    )
    for i, (name, c) in enumerate(calibration.items()):
        col = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{X(b['pred']):.1f},{Y(b['obs']):.1f}" for b in c["bins"])
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="2" class="curve">'
            f"<title>{_e(name)}</title></polyline>"
        )
        for b in c["bins"]:
            parts.append(
                f'<circle cx="{X(b["pred"]):.1f}" cy="{Y(b["obs"]):.1f}" r="3" fill="{col}">'
                f"<title>{_e(name)}: predicted {b['pred']:.3f}, observed {b['obs']:.3f} "
                f"(n={b['n']})</title></circle>"
            )
        ly = pad + 16 * i
        parts.append(
            f'<line x1="{size + 4}" y1="{ly}" x2="{size + 24}" y2="{ly}" stroke="{col}" stroke-width="3"/>'
            f'<text x="{size + 28}" y="{ly + 4}">{_e(name[:22])} (ECE {c["ece"]:.3f})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(metric: str, rows: list[tuple[str, float, float | None, float | None]], width: int = 520) -> str:
    """Horizontal bars with 95% interval whiskers, one per method."""
    left, right, bar_h, gap = 150, 60, 16, 6
    vals = [v for _, v, lo, hi in rows for v in (v, lo, hi) if v is not None and math.isfinite(v)]
    lo_ax = max(0.0, math.floor((min(vals) - 0.02) * 20) / 20) if vals else 0.0
    hi_ax = min(1.0, math.ceil((max(vals) + 0.02) * 20) / 20) if vals else 1.0
    if hi_ax <= lo_ax:
        hi_ax = lo_ax + 0.1
    span = width - left - right
    X = lambda v: left + span * (v - lo_ax) / (hi_ax - lo_ax)  # noqa: E731
    h = 30 + len(rows) * (bar_h + gap) + 20
    parts = [
        f'<svg class="bars" width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" '
        f'aria-label="{_e(METRIC_NAMES.get(metric, metric))}"><title>{_e(METRIC_NAMES.get(metric, metric))}'
        f'</title><text x="4" y="16" class="head">{_e(METRIC_NAMES.get(metric, metric))}</text>'
    ]
    for i, (name, v, lo, hi) in enumerate(rows):
        y = 26 + i * (bar_h + gap)
        col = "#b2182b" if name.startswith("llm_hyper") else ("#2166ac" if name == "knn_cal" else "#999999")
        parts.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" text-anchor="end">{_e(name[:24])}</text>')
        parts.append(
            f'<rect x="{left}" y="{y}" width="{max(0.0, X(v) - left):.1f}" height="{bar_h}" fill="{col}">'
            f"<title>{_e(name)}: {v:.3f}"
            + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")
            + "</title></rect>"
        )
        if lo is not None and hi is not None:
            ym = y + bar_h / 2
            parts.append(
                f'<line x1="{X(lo):.1f}" y1="{ym}" x2="{X(hi):.1f}" y2="{ym}" class="whisker"/>'
                f'<line x1="{X(lo):.1f}" y1="{y + 3}" x2="{X(lo):.1f}" y2="{y + bar_h - 3}" class="whisker"/>'
                f'<line x1="{X(hi):.1f}" y1="{y + 3}" x2="{X(hi):.1f}" y2="{y + bar_h - 3}" class="whisker"/>'
            )
        parts.append(f'<text x="{width - right + 4}" y="{y + bar_h - 4}">{v:.3f}</text>')
    ya = 26 + len(rows) * (bar_h + gap) + 12
    parts.append(
        f'<text x="{left}" y="{ya}" text-anchor="middle">{lo_ax:.2f}</text>'
        f'<text x="{left + span}" y="{ya}" text-anchor="middle">{hi_ax:.2f}</text></svg>'
    )
    return "".join(parts)


# =====================================================================================================
# tables (shared by HTML and Markdown)
# =====================================================================================================


def _ci(c: dict[str, Any] | None) -> str:
    if not c or c.get("value") is None:
        return "—"
    return f"{c['value']:.3f}" + (f" [{c['lo']:.3f}, {c['hi']:.3f}]" if c.get("lo") is not None else "")


def metric_rows(rep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    m = rep["metrics"]
    bar_keys = sorted({k for v in m["vs_bar"].values() for k in v}) if m["vs_bar"] else []
    head = ["method"] + [METRIC_NAMES[k] for k in METRIC_KEYS]
    if bar_keys:
        head += [f"Δ{METRIC_NAMES.get(k, k)} vs {m.get('bar') or 'bar'} (p)" for k in bar_keys]
    rows = []
    for name, row in m["methods"].items():
        cells = [name] + [_ci(row.get(k)) for k in METRIC_KEYS]
        if bar_keys:
            d = m["vs_bar"].get(name, {})
            cells += [
                (
                    f"{d[k]['diff']:+.3f} [{d[k]['lo']:+.3f}, {d[k]['hi']:+.3f}] (p={d[k]['p_value']:.3f})"
                    if k in d
                    else "—"
                )
                for k in bar_keys
            ]
        rows.append(cells)
    return head, rows


def calibration_rows(rep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "ads", "mean predicted CTR", "observed CTR", "ECE", "bins (predicted → observed)"]
    rows = [
        [
            n,
            str(c["ads"]),
            f"{c['mean_pred']:.3f}",
            f"{c['mean_obs']:.3f}",
            f"{c['ece']:.3f}",
            "; ".join(f"{b['pred']:.3f}→{b['obs']:.3f}" for b in c["bins"]),
        ]
        for n, c in rep["calibration"].items()
    ]
    return head, rows


def heatmap_rows(rep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    hm = rep["heatmap"]
    head = ["run", "ads", "mean cosine vs lr_warm", "median", "share > 0"]
    rows = []
    for n, cos in hm["cosine_vs_lr_warm"].items():
        c = np.asarray(cos)
        rows.append([n, str(len(c)), f"{c.mean():.3f}", f"{np.median(c):.3f}", f"{(c > 0).mean():.2f}"])
    return head, rows


def run_rows(rep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["name", "run", "LM", "ads ok / partial / failed", "weight calls", "parse failures", "seconds"]
    rows = []
    for r in rep["runs"]:
        t = r["totals"]
        rows.append(
            [
                r["name"],
                r["path"],
                str(r["lm"] or "—"),
                f"{t.get('ads_ok', '—')} / {t.get('ads_partial', '—')} / {t.get('ads_failed', '—')}",
                str(t.get("weight_calls", "—")),
                str(t.get("parse_failures", "—")),
                str(t.get("seconds", "—")),
            ]
        )
    return head, rows


def _study_tables(rep: dict[str, Any]) -> dict[str, list[tuple[list[str], list[list[str]]]] | None]:
    from llmhyper.trust.ablation import ablation_rows
    from llmhyper.trust.explain import explain_rows
    from llmhyper.trust.robustness import robustness_rows

    out: dict[str, Any] = {"explain": None, "robustness": None, "ablation": None}
    if rep.get("explain"):
        out["explain"] = [explain_rows(rep["explain"])]
    if rep.get("robustness"):
        tabs = [robustness_rows(rep["robustness"])]
        ex = [p for p in rep["robustness"].get("pairs", []) if (p.get("rewrite") or {}).get("ok")][:8]
        if ex:
            tabs.append(
                (
                    [
                        "ad",
                        "feature",
                        "type",
                        "rewritten title",
                        "rewritten description",
                        "w → w'",
                        "right way",
                    ],
                    [
                        [
                            p["ad_id"],
                            p["feature"],
                            p["type"],
                            p["rewrite"]["title"],
                            p["rewrite"]["text"],
                            _pair(p),
                            {True: "yes", False: "no", None: "—"}[p.get("correct")],
                        ]
                        for p in ex
                    ],
                )
            )
        out["robustness"] = tabs
    if rep.get("ablation"):
        out["ablation"] = [ablation_rows(rep["ablation"])]
    return out


def _pair(p: dict[str, Any]) -> str:
    f = lambda x: "—" if x is None else f"{x:+.3f}"  # noqa: E731
    return f"{f(p.get('before'))} → {f(p.get('after'))}"


HOWTO = {
    "explain": "llmhyper trust explain --run RUN --out EXPLAIN",
    "robustness": "llmhyper trust robustness --base-run RUN --out ROBUSTNESS",
    "ablation": "llmhyper trust ablate --base-run RUN --reuse full=RUN --out ABLATION",
}


# =====================================================================================================
# rendering
# =====================================================================================================

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.panels{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.panel h3{font-size:14px;margin:4px 0}
svg text{font-size:10px;fill:#333}svg text.head{font-size:13px;font-weight:600}
svg.heatmap text.col{font-size:8px}svg.heatmap text.row{font-size:9px}
.frame{fill:none;stroke:#999}.diag{stroke:#aaa;stroke-dasharray:4 3}.whisker{stroke:#222;stroke-width:1.3}
.note{color:#555;font-size:13px}.missing{color:#8a6d3b;background:#fcf8e3;padding:6px 10px;font-size:13px}
code{background:#f3f3f3;padding:1px 4px}
"""


def html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def render_html(rep: dict[str, Any]) -> str:
    hm = rep["heatmap"]
    mats = [np.abs(np.asarray(p["matrix"])) for p in hm["panels"]]
    vmax = (
        float(np.percentile(np.concatenate([m.ravel() for m in mats]), 98)) if mats and mats[0].size else 1.0
    )
    vmax = vmax if vmax > 0 else 1.0
    labels = [f"{a} {t}" for a, t in zip(hm["ads"], hm["titles"], strict=True)]
    panels = "".join(
        f'<div class="panel"><h3>{_e(p["name"])}</h3>'
        f"{heatmap_svg(p, hm['features'], labels, vmax, row_labels=(i == 0))}</div>"
        for i, p in enumerate(hm["panels"])
    )
    m = rep["metrics"]
    bars = "".join(
        bars_svg(
            k,
            [
                (n, row[k]["value"], row[k].get("lo"), row[k].get("hi"))
                for n, row in m["methods"].items()
                if k in row and row[k].get("value") is not None
            ],
        )
        for k in METRIC_KEYS
    )
    studies = _study_tables(rep)
    sec = []
    titles = {
        "explain": "Explainability: top-5 features vs ground truth, Consistency Rate",
        "robustness": "Counterfactual robustness: direction accuracy",
        "ablation": "Ablations: shots, image caption, titles",
    }
    for key, title in titles.items():
        body = (
            "".join(html_table(h, r, key) for h, r in studies[key])
            if studies[key]
            else f'<p class="missing">not given: run <code>{_e(HOWTO[key])}</code> and pass '
            f"<code>--{key} FOLDER</code></p>"
        )
        sec.append(f'<section id="{key}"><h2>{_e(title)}</h2>{body}</section>')
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>LLM-HYPER report: {_e(rep['dataset'])}</title><style>{CSS}</style></head><body>",
            f"<h1>LLM-HYPER report: {_e(rep['dataset'])}</h1>",
            f'<p class="note">{rep["n_ads"]} cold ads covered by every run. Everything on this page is '
            "inline (no scripts, no external resources).</p>",
            '<section id="runs"><h2>Runs</h2>',
            html_table(*run_rows(rep), "runs"),
            "</section>",
            '<section id="metrics"><h2>Metrics (95% intervals)</h2>',
            f'<p class="note">Source: {_e(m["source"])}; {m.get("n_test_users")} test users x '
            f'{m.get("n_ads")} ads, '
            f"{m.get('n_boot')} bootstrap resamples of users.</p>",
            f'<div class="panels">{bars}</div>',
            html_table(*metric_rows(rep), "metrics"),
            "</section>",
            '<section id="weights"><h2>Generated vs trained weights</h2>',
            f'<p class="note">Ads x features ({len(hm["ads"])} of {hm["n_ads_total"]} ads shown); '
            "each row scaled to "
            f"unit L2 norm; colour scale clipped at ±{vmax:.2f} (98th percentile of |w|). "
            "Red: users with more of "
            "the feature click more; blue: less.</p>",
            colour_bar_svg(vmax),
            f'<div class="panels">{panels}</div>',
            html_table(*heatmap_rows(rep), "cosine"),
            "</section>",
            '<section id="calibration"><h2>Calibration on the test users</h2>',
            calibration_svg(rep["calibration"]),
            html_table(*calibration_rows(rep), "calibration"),
            "</section>",
            *sec,
            "</body></html>",
        ]
    )


def render_markdown(rep: dict[str, Any]) -> str:
    from llmhyper.trust.explain import md_table

    m = rep["metrics"]
    out = [
        f"# LLM-HYPER report: {rep['dataset']}",
        "",
        f"{rep['n_ads']} cold ads covered by every run.",
        "",
        "## Runs",
        "",
        md_table(*run_rows(rep)),
        "",
        "## Metrics (95% intervals)",
        "",
        f"Source: {m['source']}; {m.get('n_test_users')} test users x {m.get('n_ads')} ads, "
        f"{m.get('n_boot')} "
        "bootstrap resamples of users.",
        "",
        md_table(*metric_rows(rep)),
        "",
        "## Generated vs trained weights",
        "",
        "Per-ad cosine between the generated weights and LR_warm's (the heatmap is in the HTML page).",
        "",
        md_table(*heatmap_rows(rep)),
        "",
        "## Calibration on the test users",
        "",
        md_table(*calibration_rows(rep)),
        "",
    ]
    studies = _study_tables(rep)
    titles = {"explain": "Explainability", "robustness": "Counterfactual robustness", "ablation": "Ablations"}
    for key, title in titles.items():
        out += [f"## {title}", ""]
        if studies[key]:
            for h, r in studies[key]:
                out += [md_table(h, r), ""]
        else:
            out += [f"Not given: run `{HOWTO[key]}` and pass `--{key} FOLDER`.", ""]
    return "\n".join(out)


def write_report(rep: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(rep), encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(render_markdown(rep) + "\n", encoding="utf-8")
    return out, md


# =====================================================================================================
# command line
# =====================================================================================================


def _load_summary(folder: str | None, name: str) -> dict[str, Any] | None:
    if not folder:
        return None
    p = Path(folder)
    p = p / f"{name}.json" if p.is_dir() else p
    if not p.exists():
        raise LLMHyperError(f"no {name}.json in {folder} (run llmhyper trust first)")
    return json.loads(p.read_text())


def add_report_parser(sub, add_data_args) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page (+ Markdown) of runs and trust studies")
    add_data_args(p)
    p.set_defaults(dataset=None)
    p.add_argument(
        "--runs", nargs="+", required=True, help="generate run directories (the first is the main one)"
    )
    p.add_argument("--out", default="report.html", help="the HTML file; the Markdown goes next to it (.md)")
    p.add_argument(
        "--eval",
        help="`llmhyper evaluate --json` output for the metric bars (default: computed here "
        "for LR_warm and the runs)",
    )
    p.add_argument("--explain", help="a `llmhyper trust explain` folder")
    p.add_argument("--robustness", help="a `llmhyper trust robustness` folder")
    p.add_argument("--ablation", help="a `llmhyper trust ablate` folder")
    p.add_argument("--max-ads", type=int, default=60, help="ads shown in the heatmap")
    p.add_argument(
        "--bootstrap", type=int, default=200, help="bootstrap resamples when metrics are computed here"
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from llmhyper.cli.common import data_settings
    from llmhyper.data import load_dataset
    from llmhyper.trust.cli import resolve

    resolve(args, args.runs[0])
    data = load_dataset(data_settings(args))
    ablation = _load_summary(args.ablation, "ablation")
    eval_result = json.loads(Path(args.eval).read_text()) if args.eval else None
    rep = gather(
        data,
        args.runs,
        eval_result=eval_result,
        explain=_load_summary(args.explain, "explain"),
        robustness=_load_summary(args.robustness, "robustness"),
        ablation=ablation,
        max_ads=args.max_ads,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    html_path, md_path = write_report(rep, args.out)
    print(f"written: {html_path} ({html_path.stat().st_size // 1024} KiB), {md_path}")
    return 0
