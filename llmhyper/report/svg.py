"""The report's pictures as inline SVG (no xmlns needed in HTML5, no script): weight heatmaps with their
colour bar, the calibration curve, and metric bars with 95% interval whiskers. Every text is escaped."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from llmhyper.report.gather import METRIC_NAMES

PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def esc(x: Any) -> str:
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
        f'aria-label="{esc(panel["name"])}">',
        f"<title>{esc(panel['name'])}</title>",
    ]
    for j, f in enumerate(features):
        x = left + j * cell + cell * 0.7
        parts.append(
            f'<text class="col" x="{x:.1f}" y="{top - 4}" transform="rotate(-60 {x:.1f} {top - 4})">'
            f"{esc(f)}</text>"
        )
    for i, lab in enumerate(labels):
        y = top + i * cell
        if row_labels:
            parts.append(
                f'<text class="row" x="{left - 4}" y="{y + cell - 2}" text-anchor="end">'
                f"{esc(lab[:28])}</text>"
            )
        for j, f in enumerate(features):
            v = m[i, j] / vmax if vmax > 0 else 0.0
            parts.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{diverging(v)}"><title>{esc(lab[:40])} / {esc(f)}: {m[i, j]:+.3f}</title>'
                "</rect>"
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
        f'<svg class="calibration" width="{size + 170}" height="{size}" '
        f'viewBox="0 0 {size + 170} {size}" role="img" aria-label="calibration curve">'
        "<title>calibration curve</title>",
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
            f"<title>{esc(name)}</title></polyline>"
        )
        for b in c["bins"]:
            parts.append(
                f'<circle cx="{X(b["pred"]):.1f}" cy="{Y(b["obs"]):.1f}" r="3" fill="{col}">'
                f"<title>{esc(name)}: predicted {b['pred']:.3f}, observed {b['obs']:.3f} "
                f"(n={b['n']})</title></circle>"
            )
        ly = pad + 16 * i
        parts.append(
            f'<line x1="{size + 4}" y1="{ly}" x2="{size + 24}" y2="{ly}" stroke="{col}" '
            'stroke-width="3"/>'
            f'<text x="{size + 28}" y="{ly + 4}">{esc(name[:22])} (ECE {c["ece"]:.3f})</text>'
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
    title = esc(METRIC_NAMES.get(metric, metric))
    parts = [
        f'<svg class="bars" width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" '
        f'aria-label="{title}"><title>{title}</title><text x="4" y="16" class="head">{title}</text>'
    ]
    for i, (name, v, lo, hi) in enumerate(rows):
        y = 26 + i * (bar_h + gap)
        col = "#b2182b" if name.startswith("llm_hyper") else ("#2166ac" if name == "knn_cal" else "#999999")
        parts.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" text-anchor="end">{esc(name[:24])}</text>')
        interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        parts.append(
            f'<rect x="{left}" y="{y}" width="{max(0.0, X(v) - left):.1f}" height="{bar_h}" '
            f'fill="{col}"><title>{esc(name)}: {v:.3f}{interval}</title></rect>'
        )
        if lo is not None and hi is not None:
            ym = y + bar_h / 2
            parts.append(
                f'<line x1="{X(lo):.1f}" y1="{ym}" x2="{X(hi):.1f}" y2="{ym}" class="whisker"/>'
                f'<line x1="{X(lo):.1f}" y1="{y + 3}" x2="{X(lo):.1f}" y2="{y + bar_h - 3}" '
                'class="whisker"/>'
                f'<line x1="{X(hi):.1f}" y1="{y + 3}" x2="{X(hi):.1f}" y2="{y + bar_h - 3}" '
                'class="whisker"/>'
            )
        parts.append(f'<text x="{width - right + 4}" y="{y + bar_h - 4}">{v:.3f}</text>')
    ya = 26 + len(rows) * (bar_h + gap) + 12
    parts.append(
        f'<text x="{left}" y="{ya}" text-anchor="middle">{lo_ax:.2f}</text>'
        f'<text x="{left + span}" y="{ya}" text-anchor="middle">{hi_ax:.2f}</text></svg>'
    )
    return "".join(parts)
