"""The evolution page of a compile: a text report (lineage tree, best-so-far curve, iterations, instruction
diffs) and one self-contained HTML page (inline CSS, JS and SVG; nothing remote), from `optimize.evolution`.
"""

from __future__ import annotations

import html
from typing import Any

from llmhyper.optimize.evolution import Evolution, best_so_far, instruction_diff, origin


def _score(s: float | None) -> str:
    return "   -  " if s is None else f"{s:.4f}"


def _label(evo: Evolution, c: dict[str, Any]) -> str:
    marks = []
    if c["id"] == evo.best:
        marks.append("BEST")
    if c["id"] in evo.front:
        marks.append("pareto")
    how = origin(c)
    it = c.get("iteration")
    where = f", iteration {it}" if it not in (None, 0) else ""
    return f"#{c['id']}  {_score(c.get('val_score'))}  {how}{where}" + (
        f"  [{', '.join(marks)}]" if marks else ""
    )


def lineage_lines(evo: Evolution) -> list[str]:
    kids = evo.children()
    lines: list[str] = []

    def walk(idx: int, prefix: str, last: bool, root: bool) -> None:
        c = evo.by_id(idx)
        lines.append((prefix + ("" if root else ("└── " if last else "├── "))) + _label(evo, c))
        sub = kids.get(idx, [])
        for i, k in enumerate(sub):
            walk(k, prefix + ("" if root else ("    " if last else "│   ")), i == len(sub) - 1, False)

    for r in evo.roots():
        walk(r, "", True, True)
    return lines


def curve_lines(evo: Evolution, width: int = 40) -> list[str]:
    pts = best_so_far(evo)
    if not pts:
        return ["(no scored candidate)"]
    lo = min(0.5, min(s for _, s, _ in pts))
    hi = max(1e-9, max(s for _, s, _ in pts) - lo)
    used = (evo.manifest or {}).get("budget", {}).get("metric_calls_used")
    out = ["  calls    best  candidate"]
    for calls, s, idx in pts:
        bar = "█" * max(1, round(width * (s - lo) / hi))
        out.append(f"  {calls:5d}  {s:.4f}  #{idx:<4d} {bar}")
    if used is not None:
        out.append(f"  {used:5d}  {pts[-1][1]:.4f}  (end of budget)")
    return out


def iteration_lines(evo: Evolution) -> list[str]:
    if not evo.iterations:
        return ["(no iteration finished yet)"]
    out = ["   it  parent  minibatch              before -> after          outcome"]
    for it in evo.iterations:
        before = ",".join(_score(s).strip() for s in it.get("parent_scores") or [])
        after = ",".join(_score(s).strip() for s in it.get("new_scores") or [])
        outcome = it.get("outcome", "?")
        if it.get("new_candidate") is not None and outcome in ("accepted", "merged"):
            outcome += f" -> #{it['new_candidate']} (val {_score(it.get('val_score'))})"
        out.append(
            f"  {it.get('iteration', '?'):3}  {it.get('parent', '-')!s:>6}  "
            f"{','.join(it.get('minibatch') or []):<22.22} {before or '-':>8} -> {after or '-':<8}  {outcome}"
        )
    return out


def render_text(evo: Evolution, candidate: int | None = None, all_diffs: bool = False) -> str:
    m = evo.manifest or {}
    head = [f"Evolution of {evo.name}  ({evo.folder})"]
    if m:
        b = m.get("budget", {})
        head.append(
            f"val score {m.get('val_score_before')} -> {m.get('val_score_after')}; "
            f"{b.get('metric_calls_used')} of {b.get('max_metric_calls')} metric calls; "
            f"wall {m.get('wall_seconds')} s; task LM {m.get('lms', {}).get('task', {}).get('model')}, "
            f"reflection LM {m.get('lms', {}).get('reflection', {}).get('model')}"
        )
    else:
        head.append("(no manifest yet: the compile is running or was stopped)")
    head.append(f"train ads: {', '.join(evo.train_ads)}")
    head.append(f"val ads:   {', '.join(evo.val_ads)}")
    parts = [
        "\n".join(head),
        "Lineage (val score; [pareto] = best on some val ad)",
        "\n".join(lineage_lines(evo)),
        "Best validation score so far (by metric calls spent)",
        "\n".join(curve_lines(evo)),
        "Iterations",
        "\n".join(iteration_lines(evo)),
    ]
    if all_diffs:
        ids = [c["id"] for c in evo.candidates if c.get("parents")]
    elif candidate is not None:
        ids = [candidate]
    else:
        ids = [evo.best] if evo.best is not None and evo.by_id(evo.best).get("parents") else []
    for idx in ids:
        c = evo.by_id(idx)
        parts.append(f"Instruction diff: candidate {idx} vs parent(s) {c.get('parents') or '-'}")
        parts.append(instruction_diff(evo, idx).rstrip("\n"))
    if not ids:
        parts.append("(the best candidate is the starting program: no instruction changed)")
    return "\n\n".join(parts) + "\n"


# -- HTML ------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.meta{color:#5a6475}
.meta b{color:#1d2330}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:22px;position:relative}
ul.tree{padding-left:0}
ul.tree ul li{position:relative}
ul.tree ul li::before{content:"";position:absolute;left:-14px;top:0;height:14px;width:10px;border-left:1px solid #9aa6b8;border-bottom:1px solid #9aa6b8}
.node{display:inline-block;margin:3px 0;padding:2px 8px;border:1px solid #c5cedb;border-radius:6px;background:#f7f9fc;cursor:pointer}
.node.best{border-color:#1f8a4c;background:#e7f6ec;font-weight:600}
.node.pareto{box-shadow:inset 3px 0 0 #3a6fd8}
.node.selected{outline:2px solid #f0a020}
.node .score{font-variant-numeric:tabular-nums;margin-left:6px}
.node .how{color:#5a6475;margin-left:6px;font-weight:normal}
svg{background:#fff;border:1px solid #dde2ea;border-radius:6px}
svg .axis{stroke:#9aa6b8}
svg .grid{stroke:#eef1f5}
svg text{font-size:11px;fill:#5a6475}
svg .best-line{fill:none;stroke:#1f8a4c;stroke-width:2}
svg .candidate{fill:#3a6fd8;stroke:#fff;stroke-width:1.5;cursor:pointer}
svg .candidate.best{fill:#1f8a4c}
table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #eef1f5;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f7f9fc}
td.num{font-variant-numeric:tabular-nums}
details{margin:6px 0;border:1px solid #dde2ea;border-radius:6px;padding:4px 10px}
details[open]{background:#fcfdfe}
summary{cursor:pointer;font-weight:600}
pre.diff{white-space:pre-wrap;font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;margin:6px 0}
pre.diff span{display:block}
pre.diff .add{background:#e6ffec;color:#116329}
pre.diff .del{background:#ffebe9;color:#82071e}
pre.diff .hunk{color:#8250df}
pre.diff .file{color:#5a6475}
.fb{white-space:pre-wrap;font-size:12px;color:#333;background:#f7f9fc;border-radius:4px;padding:4px 6px;margin:4px 0}
"""

JS = """
(function(){
  function show(id){
    document.querySelectorAll('.node.selected').forEach(function(n){n.classList.remove('selected');});
    var node=document.getElementById('cand-'+id); if(node){node.classList.add('selected');}
    var d=document.getElementById('diff-'+id);
    if(d){d.open=true; d.scrollIntoView({behavior:'smooth',block:'center'});}
  }
  document.querySelectorAll('[data-candidate]').forEach(function(el){
    el.addEventListener('click',function(){show(el.getAttribute('data-candidate'));});
  });
  // marks the page as rendered (the headless-browser test looks for it)
  var n=document.querySelectorAll('#lineage .node').length;
  document.documentElement.setAttribute('data-rendered-nodes',String(n));
})();
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _tree_html(evo: Evolution) -> str:
    kids = evo.children()

    def node(idx: int) -> str:
        c = evo.by_id(idx)
        cls = ["node"] + (["best"] if idx == evo.best else []) + (["pareto"] if idx in evo.front else [])
        how = origin(c)
        it = c.get("iteration")
        title = f"iteration {it}; discovered after {c.get('discovered_at_metric_calls')} metric calls"
        sub = "".join(node(k) for k in kids.get(idx, []))
        return (
            f'<li><span class="{" ".join(cls)}" id="cand-{idx}" data-candidate="{idx}" title="{_esc(title)}">'
            f'#{idx}<span class="score">{_esc(_score(c.get("val_score")))}</span>'
            f'<span class="how">{_esc(how)}</span></span>' + (f"<ul>{sub}</ul>" if sub else "") + "</li>"
        )

    return '<ul class="tree">' + "".join(node(r) for r in evo.roots()) + "</ul>"


def _svg_plot(evo: Evolution, w: int = 720, h: int = 300) -> str:
    pad_l, pad_r, pad_t, pad_b = 52, 16, 16, 40
    cands = [c for c in evo.candidates if c.get("val_score") is not None]
    used = (evo.manifest or {}).get("budget", {}).get("metric_calls_used")
    xmax = max([c.get("discovered_at_metric_calls") or 0 for c in cands] + [used or 0, 1])
    scores = [c["val_score"] for c in cands] or [0.5]
    ylo = min(0.5, min(scores)) - 0.02
    yhi = max(scores) + 0.02
    if yhi - ylo < 0.1:
        yhi = ylo + 0.1

    def X(v: float) -> float:
        return pad_l + (w - pad_l - pad_r) * v / xmax

    def Y(v: float) -> float:
        return h - pad_b - (h - pad_t - pad_b) * (v - ylo) / (yhi - ylo)

    parts = [
        (
            f'<svg id="score-plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            'aria-label="validation score of each candidate and the best so far, by metric calls spent">'
        )
    ]
    for k in range(6):
        v = ylo + (yhi - ylo) * k / 5
        parts.append(
            f'<line class="grid" x1="{pad_l}" x2="{w - pad_r}" y1="{Y(v):.1f}" y2="{Y(v):.1f}"/>'
            f'<text x="{pad_l - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>'
        )
    for k in range(6):
        v = xmax * k / 5
        parts.append(f'<text x="{X(v):.1f}" y="{h - pad_b + 16}" text-anchor="middle">{v:.0f}</text>')
    parts.append(
        f'<line class="axis" x1="{pad_l}" x2="{w - pad_r}" y1="{h - pad_b}" y2="{h - pad_b}"/>'
        f'<line class="axis" x1="{pad_l}" x2="{pad_l}" y1="{pad_t}" y2="{h - pad_b}"/>'
        f'<text x="{(w + pad_l) / 2:.0f}" y="{h - 6}" text-anchor="middle">metric calls spent</text>'
        f'<text x="14" y="{(h - pad_b) / 2:.0f}" transform="rotate(-90 14 {(h - pad_b) / 2:.0f})" '
        f'text-anchor="middle">val score</text>'
    )
    pts = best_so_far(evo)
    if pts:
        path, last = [], None
        for calls, s, _ in pts:
            if last is not None:
                path.append(f"{X(calls):.1f},{Y(last):.1f}")
            path.append(f"{X(calls):.1f},{Y(s):.1f}")
            last = s
        path.append(f"{X(max(xmax, pts[-1][0])):.1f},{Y(last):.1f}")
        parts.append(f'<polyline class="best-line" points="{" ".join(path)}"/>')
    for c in cands:
        cls = "candidate best" if c["id"] == evo.best else "candidate"
        cx = X(c.get("discovered_at_metric_calls") or 0)
        parts.append(
            f'<circle class="{cls}" data-candidate="{c["id"]}" cx="{cx:.1f}" cy="{Y(c["val_score"]):.1f}" '
            f'r="5"><title>candidate {c["id"]}: val {c["val_score"]:.4f}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _diff_html(text: str) -> str:
    out = []
    for line in text.splitlines():
        cls = (
            "file"
            if line.startswith(("---", "+++"))
            else "hunk"
            if line.startswith("@@")
            else "add"
            if line.startswith("+")
            else "del"
            if line.startswith("-")
            else ""
        )
        out.append(f'<span class="{cls or "ctx"}">{_esc(line) or " "}</span>')
    return '<pre class="diff">' + "".join(out) + "</pre>"  # one block span per line, no newline text between


def render_html(evo: Evolution) -> str:
    m = evo.manifest or {}
    b = m.get("budget", {})
    meta = []
    if m:
        meta.append(
            f"val score <b>{_esc(m.get('val_score_before'))}</b> &rarr; "
            f"<b>{_esc(m.get('val_score_after'))}</b>"
        )
        meta.append(f"{_esc(b.get('metric_calls_used'))} of {_esc(b.get('max_metric_calls'))} metric calls")
        meta.append(f"wall {_esc(m.get('wall_seconds'))} s")
        meta.append(
            f"task LM {_esc(m.get('lms', {}).get('task', {}).get('model'))}, reflection LM "
            f"{_esc(m.get('lms', {}).get('reflection', {}).get('model'))}"
        )
    meta.append(f"{len(evo.candidates)} candidates")
    diffs = []
    for c in evo.candidates:
        if not c.get("parents"):
            continue
        summary = (
            f"#{c['id']} vs parent {' + '.join('#' + str(p) for p in c['parents'])}: "
            f"val {_score(c.get('val_score'))} (changed {', '.join(c.get('changed') or []) or 'nothing'})"
        )
        diffs.append(
            f'<details id="diff-{c["id"]}"{" open" if c["id"] == evo.best else ""}>'
            f"<summary>{_esc(summary)}</summary>{_diff_html(instruction_diff(evo, c['id']))}</details>"
        )
    rows = []
    for it in evo.iterations:
        fb = []
        for comp, items in (it.get("feedback") or {}).items():
            for f in items[:3]:
                fb.append(f'<div class="fb"><b>{_esc(comp)}</b>: {_esc(f)}</div>')
        new = it.get("new_candidate")
        rows.append(
            f'<tr><td class="num">{_esc(it.get("iteration"))}</td><td>#{_esc(it.get("parent", "-"))}</td>'
            f"<td>{_esc(', '.join(it.get('minibatch') or []))}</td>"
            f'<td class="num">{_esc(", ".join(_score(s).strip() for s in it.get("parent_scores") or []))}</td>'
            f'<td class="num">{_esc(", ".join(_score(s).strip() for s in it.get("new_scores") or []))}</td>'
            f"<td>{_esc(it.get('outcome', '?'))}{(' &rarr; #' + _esc(new)) if new is not None else ''}"
            f"{('<br><small>' + _esc(it.get('reason')) + '</small>') if it.get('reason') else ''}</td>"
            f"<td>{''.join(fb)}</td></tr>"
        )
    table = (
        (
            "<table><thead><tr><th>it</th><th>parent</th><th>minibatch</th><th>before</th><th>after</th>"
            "<th>outcome</th><th>feedback shown to the reflection LM</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )
        if rows
        else "<p>No iteration finished yet.</p>"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Evolution of {_esc(evo.name)}</title><style>{CSS}</style></head><body>"
        f'<h1>Prompt evolution: {_esc(evo.name)}</h1><p class="meta">{" &middot; ".join(meta)}</p>'
        f'<p class="meta">train ads: {_esc(", ".join(evo.train_ads))}<br>val ads: {_esc(", ".join(evo.val_ads))}</p>'
        f'<section id="lineage"><h2>Lineage</h2><p class="meta">Click a candidate to open its instruction diff. '
        f"Green: best on the val ads; blue edge: on the Pareto front (best on at least one val ad).</p>"
        f"{_tree_html(evo)}</section>"
        f'<section id="scores"><h2>Validation score</h2>{_svg_plot(evo)}</section>'
        f'<section id="diffs"><h2>Instruction changes</h2>{"".join(diffs) or "<p>No candidate beyond the seed.</p>"}'
        f'</section><section id="iterations"><h2>Iterations</h2>{table}</section>'
        f"<script>{JS}</script></body></html>\n"
    )


def render_search_html(name: str, text: str) -> str:
    """An edit compile's search log as one self-contained page (no script, nothing fetched)."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(name)}: edit program search</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}pre{font:13px ui-monospace,monospace;"
        "white-space:pre-wrap}</style></head>"
        f"<body><h1>{_esc(name)}: edit program search</h1><pre>{_esc(text)}</pre></body></html>\n"
    )
