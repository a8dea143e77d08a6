"""`llmhyper evolution`: text report (tree, scores, curve, diffs) and the self-contained HTML page, from a real
(scripted) compile's log and from a hand-made log with branches and a merge."""

from __future__ import annotations

import json
import textwrap
from html.parser import HTMLParser

import pytest

from llmhyper.cli.main import main
from llmhyper.errors import DataError, LLMHyperError
from llmhyper.optimize.compile import compile_recipe
from llmhyper.optimize.evolution import best_so_far, instruction_diff, load_evolution
from llmhyper.report.evolution import lineage_lines, render_html, render_text
from tests.fakes import NO_CHROMIUM, HashEncoder, chromium, dump_dom
from tests.scripted_reflection import RULE, CompileEngine, scripted_pair
from tests.test_compile import RECIPE


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("evo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMHYPER_CACHE", str(root / "cache"))
        recipe = root / "tiny.toml"
        recipe.write_text(textwrap.dedent(RECIPE))
        task, refl = scripted_pair(CompileEngine())
        res = compile_recipe(recipe, root / "programs", encoder=HashEncoder(), task_lm=task, reflection_lm=refl,
                             progress=False)
    return res


def _instr(text: str) -> dict[str, str]:
    return {"predict_weights.predict": text, "judge": "Judge the weights."}


@pytest.fixture()
def branched(tmp_path):
    """0 -> 1 -> 3, 0 -> 2, merge(2, 3) -> 4 (best)."""
    base = "Write one weight per feature.\nUse the examples."
    cands = [
        {"id": 0, "parents": [], "instructions": _instr(base), "val_scores": {"a": 0.5, "b": 0.4}, "val_score": 0.45,
         "discovered_at_metric_calls": 0, "iteration": 0, "changed": [], "origin": "seed"},
        {"id": 1, "parents": [0], "instructions": _instr(base + "\nMind the signs."), "val_scores": {"a": 0.6, "b": 0.5},
         "val_score": 0.55, "discovered_at_metric_calls": 8, "iteration": 1, "changed": ["predict_weights.predict"]},
        {"id": 2, "parents": [0], "instructions": _instr("Write weights.\nUse the examples."),
         "val_scores": {"a": 0.7, "b": 0.3}, "val_score": 0.5, "discovered_at_metric_calls": 14, "iteration": 2,
         "changed": ["predict_weights.predict"]},
        {"id": 3, "parents": [1], "instructions": _instr(base + "\nMind the signs.\nBe brief."),
         "val_scores": {"a": 0.6, "b": 0.6}, "val_score": 0.6, "discovered_at_metric_calls": 20, "iteration": 3,
         "changed": ["predict_weights.predict"]},
        {"id": 4, "parents": [2, 3], "instructions": {**_instr(base + "\nMind the signs."), "judge": "Judge <b>it</b>."},
         "val_scores": {"a": 0.7, "b": 0.6}, "val_score": 0.65, "discovered_at_metric_calls": 26, "iteration": 4,
         "changed": ["judge", "predict_weights.predict"], "origin": "merge"},
    ]
    evo = tmp_path / "hand.evolution"
    evo.mkdir()
    (evo / "candidates.json").write_text(json.dumps({"format": "llmhyper-evolution/1", "val_ads": ["a", "b"],
                                                     "train_ads": ["t1", "t2"], "best": 4, "candidates": cands}))
    (evo / "pareto.json").write_text(json.dumps({"per_ad": {"a": {"best_score": 0.7, "candidates": [2, 4]},
                                                            "b": {"best_score": 0.6, "candidates": [3, 4]}},
                                                 "front": [2, 3, 4]}))
    its = [{"iteration": 1, "parent": 0, "minibatch": ["t1"], "parent_scores": [0.4], "new_scores": [0.6],
            "outcome": "accepted", "new_candidate": 1, "val_score": 0.55,
            "feedback": {"predict_weights.predict": ["Wrong sign (your weight vs trained): age +0.30 vs -0.80."]}},
           {"iteration": 2, "parent": 1, "minibatch": ["t2"], "parent_scores": [0.5], "new_scores": [0.4],
            "outcome": "interrupted"},
           {"iteration": 2, "parent": 0, "minibatch": ["t2"], "parent_scores": [0.4], "new_scores": [0.5],
            "outcome": "accepted", "new_candidate": 2}]
    (evo / "iterations.jsonl").write_text("".join(json.dumps(i) + "\n" for i in its) + '{"iteration": 3, "par')
    return tmp_path / "hand"


class Page(HTMLParser):
    """Collects tags, the tree's node nesting, SVG children, scripts and any remote reference."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.nodes: dict[str, list[str]] = {}  # candidate id -> enclosing candidate ids (outermost first)
        self.svg: list[tuple[str, dict]] = []
        self.in_svg = 0
        self.remote: list[str] = []
        self.scripts_with_src = 0
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k in ("src", "href"):
            if a.get(k):
                self.remote.append(a[k])
        if tag == "script" and a.get("src"):
            self.scripts_with_src += 1
        if tag == "svg":
            self.in_svg += 1
        elif self.in_svg:
            self.svg.append((tag, a))
        if "node" in (a.get("class") or "").split():
            items = [x["data-candidate"] for t, x in self.stack if t == "li" and "data-candidate" in x]
            assert items and items[-1] == a["data-candidate"], "a tree node outside its own list item"
            self.nodes[a["data-candidate"]] = items[:-1]  # the candidates it descends from
        self.stack.append((tag, a))

    def handle_endtag(self, tag):
        if tag == "svg":
            self.in_svg -= 1
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break


def parse(html_text: str) -> Page:
    # the parser attributes candidate ids to their <li>: copy each node's id onto its list item
    import re

    html_text = re.sub(r'<li><span class="([^"]*node[^"]*)" id="cand-(\d+)" data-candidate="(\d+)"',
                       r'<li data-candidate="\3"><span class="\1" id="cand-\2" data-candidate="\3"', html_text)
    p = Page()
    p.feed(html_text)
    return p


# -- text ----------------------------------------------------------------------------------------------

def test_text_report_of_a_real_compile(compiled):
    evo = load_evolution(compiled.program_path.with_suffix(""))
    for path in (compiled.program_path, compiled.evolution_dir, compiled.manifest_path):  # all name the same log
        assert load_evolution(path).folder == evo.folder
    out = render_text(evo)
    assert "Lineage" in out and "#0  0.1932  seed" in out
    assert f"└── #1  {compiled.val_after:.4f}  changed predict_weights.predict, iteration 1  [BEST, pareto]" in out
    assert "Best validation score so far" in out and "Iterations" in out
    assert f"val score {compiled.val_before} -> {compiled.val_after}" in out
    assert "Instruction diff: candidate 1 vs parent(s) [0]" in out
    assert f"+{RULE}" in out and "--- candidate 0 / predict_weights.predict" in out
    assert "accepted -> #1" in out
    pts = best_so_far(evo)
    assert [p[2] for p in pts] == [0, 1] and pts[0][0] == 0 and pts[1][1] == compiled.val_after


def test_text_tree_with_branches_merge_and_diffs(branched):
    evo = load_evolution(branched)
    assert [i["iteration"] for i in evo.iterations] == [1, 2]  # replayed iteration: last record kept; cut line ignored
    assert evo.iterations[1]["outcome"] == "accepted"
    lines = lineage_lines(evo)
    assert lines[0].startswith("#0  0.4500  seed")
    assert lines[1].startswith("├── #1  0.5500")
    assert lines[2].startswith("│   └── #3  0.6000") and "[pareto]" in lines[2]
    assert lines[3].startswith("└── #2  0.5000")
    assert lines[4].startswith("    └── #4  0.6500  merge of 2 + 3") and "[BEST, pareto]" in lines[4]
    assert [(c, s) for c, s, _ in best_so_far(evo)] == [(0, 0.45), (8, 0.55), (20, 0.6), (26, 0.65)]
    d = instruction_diff(evo, 3)
    assert "+Be brief." in d and "-" not in [ln[:1] for ln in d.splitlines() if not ln.startswith("---")]
    d4 = instruction_diff(evo, 4)  # against both parents
    assert "candidate 2 / predict_weights.predict" in d4 and "candidate 3 / judge" in d4 and "+Judge <b>it</b>." in d4
    assert "starting program" in instruction_diff(evo, 0)
    out = render_text(evo, candidate=3)
    assert "Instruction diff: candidate 3 vs parent(s) [1]" in out and "(no manifest yet" in out
    every = render_text(evo, all_diffs=True)
    assert all(f"Instruction diff: candidate {i} vs" in every for i in (1, 2, 3, 4))
    with pytest.raises(LLMHyperError, match="no candidate 9"):
        render_text(evo, candidate=9)


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no evolution log"):
        load_evolution(tmp_path / "nothing")


def test_cli_evolution_text_and_html(compiled, tmp_path, capsys):
    out = tmp_path / "page" / "evo.html"
    assert main(["evolution", str(compiled.program_path.with_suffix("")), "--html", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Lineage" in text and f"wrote {out}" in text
    assert out.read_text().startswith("<!doctype html>")
    assert main(["evolution", str(tmp_path / "none")]) == 2
    assert "no evolution log" in capsys.readouterr().err


# -- HTML ----------------------------------------------------------------------------------------------

def _check_self_contained(page: Page, html_text: str) -> None:
    assert page.remote == [] and page.scripts_with_src == 0
    assert "link" not in page.tags and "iframe" not in page.tags and "img" not in page.tags
    assert "http://" not in html_text and "https://" not in html_text and "@import" not in html_text
    assert "<style>" in html_text and "<script>" in html_text


def test_html_page_of_a_real_compile(compiled):
    evo = load_evolution(compiled.program_path.with_suffix(""))
    html_text = render_html(evo)
    page = parse(html_text)
    _check_self_contained(page, html_text)
    assert page.nodes == {"0": [], "1": ["0"]}  # candidate 1 sits inside candidate 0's list item
    circles = [a for t, a in page.svg if t == "circle"]
    assert sorted(a["data-candidate"] for a in circles) == ["0", "1"]
    assert any(t == "polyline" and "best-line" in a.get("class", "") for t, a in page.svg)
    assert 'id="score-plot"' in html_text and 'id="diff-1"' in html_text
    assert RULE.replace("'", "&#x27;") in html_text


def test_html_page_tree_nesting_and_escaping(branched):
    html_text = render_html(load_evolution(branched))
    page = parse(html_text)
    _check_self_contained(page, html_text)
    assert page.nodes == {"0": [], "1": ["0"], "3": ["0", "1"], "2": ["0"], "4": ["0", "2"]}
    assert len([a for t, a in page.svg if t == "circle"]) == 5
    assert "Judge &lt;b&gt;it&lt;/b&gt;." in html_text and "<b>it</b>" not in html_text
    assert 'class="node best pareto" id="cand-4"' in html_text
    assert "Wrong sign (your weight vs trained): age +0.30 vs -0.80." in html_text


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_html_renders_in_headless_chromium(branched, tmp_path):
    page = tmp_path / "evo.html"
    page.write_text(render_html(load_evolution(branched)))
    dom = dump_dom(page, tmp_path / "profile")
    for idx in range(5):
        assert f'id="cand-{idx}"' in dom
    assert 'id="score-plot"' in dom
    assert 'data-rendered-nodes="5"' in dom  # the inline script ran over the rendered tree


def test_cli_evolution_shows_an_edit_compiles_search(tmp_path, capsys):
    (tmp_path / "edit_x.json").write_text("{}")
    (tmp_path / "edit_x.search.md").write_text("# Edit program search: edit_x.json\n\n| a <b> | 1 |\n")
    out = tmp_path / "page.html"
    assert main(["evolution", str(tmp_path / "edit_x.json"), "--html", str(out)]) == 0
    assert "Edit program search" in capsys.readouterr().out
    page = out.read_text()
    assert "a &lt;b&gt;" in page and "<script" not in page
    assert main(["evolution", str(tmp_path / "edit_y")]) == 2  # neither log: a clear error
