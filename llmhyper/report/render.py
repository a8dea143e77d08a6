"""The report as one self-contained HTML page (inline CSS and SVG, no script, no remote resource) and a
Markdown twin with the same tables, from what `gather` collected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.ctr.warmup import markdown as warmup_markdown
from llmhyper.ctr.warmup import svg as warmup_svg
from llmhyper.fmt import ci_cell, diff_cell, md_table
from llmhyper.report.gather import METRIC_KEYS, METRIC_NAMES
from llmhyper.report.svg import bars_svg, calibration_svg, colour_bar_svg, esc, heatmap_svg
from llmhyper.store import write_text_atomic
from llmhyper.trust.ablation import ablation_rows
from llmhyper.trust.explain import explain_rows
from llmhyper.trust.robustness import example_rows, robustness_rows

Table = tuple[list[str], list[list[str]]]
STUDIES = ("explain", "robustness", "ablation")
HOWTO = {
    "explain": "llmhyper trust explain --run RUN --out EXPLAIN",
    "robustness": "llmhyper trust robustness --run RUN --out ROBUSTNESS",
    "ablation": "llmhyper trust ablate --run RUN --reuse full=RUN --out ABLATION",
}

# -- tables (shared by HTML and Markdown) -----------------------------------------------------------


def metric_rows(rep: dict[str, Any]) -> Table:
    m = rep["metrics"]
    bar_keys = sorted({k for v in m["vs_bar"].values() for k in v}) if m["vs_bar"] else []
    head = ["method"] + [METRIC_NAMES[k] for k in METRIC_KEYS]
    head += [f"Δ{METRIC_NAMES.get(k, k)} vs {m.get('bar') or 'bar'} (p)" for k in bar_keys]
    rows = []
    for name, row in m["methods"].items():
        d = m["vs_bar"].get(name, {})
        cells = [ci_cell(row.get(k)) for k in METRIC_KEYS] + [diff_cell(d.get(k)) for k in bar_keys]
        rows.append([name, *cells])
    return head, rows


def calibration_rows(rep: dict[str, Any]) -> Table:
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


def heatmap_rows(rep: dict[str, Any]) -> Table:
    head = ["run", "ads", "mean cosine vs lr_warm", "median", "share > 0"]
    rows = []
    for n, cos in rep["heatmap"]["cosine_vs_lr_warm"].items():
        c = np.asarray(cos)
        rows.append([n, str(len(c)), f"{c.mean():.3f}", f"{np.median(c):.3f}", f"{(c > 0).mean():.2f}"])
    return head, rows


def run_rows(rep: dict[str, Any]) -> Table:
    head = ["name", "run", "LM", "ads ok / partial / failed", "weight calls", "parse failures", "seconds"]
    rows = []
    for r in rep["runs"]:
        t = r["totals"]
        counts = " / ".join(str(t.get(k, "—")) for k in ("ads_ok", "ads_partial", "ads_failed"))
        rows.append(
            [
                r["name"],
                r["path"],
                str(r["lm"] or "—"),
                counts,
                str(t.get("weight_calls", "—")),
                str(t.get("parse_failures", "—")),
                str(t.get("seconds", "—")),
            ]
        )
    return head, rows


def study_tables(rep: dict[str, Any]) -> dict[str, list[Table] | None]:
    """Per trust study its tables (None when the study was not given)."""
    out: dict[str, list[Table] | None] = dict.fromkeys(STUDIES)
    if rep.get("explain"):
        out["explain"] = [explain_rows(rep["explain"])]
    if rep.get("robustness"):
        examples = example_rows(rep["robustness"], 8, split=True)
        out["robustness"] = [robustness_rows(rep["robustness"])] + ([examples] if examples[1] else [])
    if rep.get("ablation"):
        out["ablation"] = [ablation_rows(rep["ablation"])]
    return out


# -- HTML -------------------------------------------------------------------------------------------

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
HTML_TITLES = {
    "explain": "Explainability: top-5 features vs ground truth, Consistency Rate",
    "robustness": "Counterfactual robustness: direction accuracy",
    "ablation": "Ablations: shots, image caption, titles",
}
MD_TITLES = {"explain": "Explainability", "robustness": "Counterfactual robustness", "ablation": "Ablations"}


def html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    h = "".join(f"<th>{esc(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _heatmaps(hm: dict[str, Any]) -> tuple[float, str]:
    """The colour scale's end (98th percentile of |w| over every panel) and the panels."""
    mats = [np.abs(np.asarray(p["matrix"])) for p in hm["panels"]]
    scale = np.concatenate([m.ravel() for m in mats]) if mats and mats[0].size else None
    vmax = float(np.percentile(scale, 98)) if scale is not None else 1.0
    vmax = vmax if vmax > 0 else 1.0
    labels = [f"{a} {t}" for a, t in zip(hm["ads"], hm["titles"], strict=True)]
    panels = "".join(
        f'<div class="panel"><h3>{esc(p["name"])}</h3>'
        f"{heatmap_svg(p, hm['features'], labels, vmax, row_labels=(i == 0))}</div>"
        for i, p in enumerate(hm["panels"])
    )
    return vmax, panels


def render_html(rep: dict[str, Any]) -> str:
    hm, m = rep["heatmap"], rep["metrics"]
    vmax, panels = _heatmaps(hm)
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
    studies = study_tables(rep)
    sec = []
    for key, title in HTML_TITLES.items():
        body = (
            "".join(html_table(h, r, key) for h, r in studies[key])
            if studies[key]
            else f'<p class="missing">not given: run <code>{esc(HOWTO[key])}</code> and pass '
            f"<code>--{key} FOLDER</code></p>"
        )
        sec.append(f'<section id="{key}"><h2>{esc(title)}</h2>{body}</section>')
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>LLM-HYPER report: {esc(rep['dataset'])}</title><style>{CSS}</style></head><body>",
            f"<h1>LLM-HYPER report: {esc(rep['dataset'])}</h1>",
            f'<p class="note">{rep["n_ads"]} cold ads covered by every run. Everything on this page is '
            "inline (no scripts, no external resources).</p>",
            '<section id="runs"><h2>Runs</h2>',
            html_table(*run_rows(rep), "runs"),
            "</section>",
            '<section id="metrics"><h2>Metrics (95% intervals)</h2>',
            f'<p class="note">Source: {esc(m["source"])}; {m.get("n_test_users")} test users x '
            f"{m.get('n_ads')} ads, {m.get('n_boot')} bootstrap resamples of users.</p>",
            f'<div class="panels">{bars}</div>',
            html_table(*metric_rows(rep), "metrics"),
            "</section>",
            '<section id="weights"><h2>Generated vs trained weights</h2>',
            f'<p class="note">Ads x features ({len(hm["ads"])} of {hm["n_ads_total"]} ads shown); each row '
            f"scaled to unit L2 norm; colour scale clipped at ±{vmax:.2f} (98th percentile of |w|). Red: users "
            "with more of the feature click more; blue: less.</p>",
            colour_bar_svg(vmax),
            f'<div class="panels">{panels}</div>',
            html_table(*heatmap_rows(rep), "cosine"),
            "</section>",
            '<section id="calibration"><h2>Calibration on the test users</h2>',
            calibration_svg(rep["calibration"]),
            html_table(*calibration_rows(rep), "calibration"),
            "</section>",
            *sec,
            _warmup_html(rep.get("warmup")),
            "</body></html>",
        ]
    )


# -- Markdown ---------------------------------------------------------------------------------------


def _warmup_html(result: dict[str, Any] | None) -> str:
    """The warm-up curves (AUC against impressions per prior) and the headline table, when given."""
    if not result:
        return ""
    return (
        '<section id="warmup"><h2>Warm-up: from the prior to trained weights</h2>'
        f"{warmup_svg(result)}<pre>{esc(warmup_markdown(result))}</pre></section>"
    )


def render_markdown(rep: dict[str, Any]) -> str:
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
        f"{m.get('n_boot')} bootstrap resamples of users.",
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
    studies = study_tables(rep)
    for key, title in MD_TITLES.items():
        out += [f"## {title}", ""]
        if studies[key]:
            for h, r in studies[key]:
                out += [md_table(h, r), ""]
        else:
            out += [f"Not given: run `{HOWTO[key]}` and pass `--{key} FOLDER`.", ""]
    if rep.get("warmup"):
        out += ["## Warm-up: from the prior to trained weights", "", warmup_markdown(rep["warmup"]), ""]
    return "\n".join(out)


def write_report(rep: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """The HTML page at `out` and its Markdown twin beside it (`.md`), each written atomically."""
    out = Path(out)
    md = out.with_suffix(".md")
    write_text_atomic(out, render_html(rep))
    write_text_atomic(md, render_markdown(rep) + "\n")
    return out, md
