"""`llmhyper report`: the page renders from scripted runs and studies, is self-contained, and its Markdown
twin holds the same tables."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from llmhyper.ctr.prepare import prepare
from llmhyper.hyper.program import ProgramConfig
from llmhyper.report.gather import calibration_bins, gather
from llmhyper.report.render import render_markdown, write_report
from llmhyper.report.svg import diverging
from llmhyper.data.synthetic import generate_synthetic
from tests.fakes import NO_CHROMIUM, HashEncoder, chromium, dump_dom
from tests.scripted_lm import Handle, scripted_lm
from tests.scripted_trust import (
    TrustEngine,
    faithful_rewriter,
    main_topic_policy,
    make_run,
    reading_policy,
    stance_from_reasoning,
    topic_reasoning,
)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.table_cells: dict[str, list[str]] = {}
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = a.get("class", "")
            self.table_cells.setdefault(self._table, [])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._table is not None:
            self.table_cells[self._table].append(data)

    def count(self, tag, cls=None):
        return sum(1 for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split()))


@pytest.fixture()
def studies(tmp_path, monkeypatch):
    """A scripted run, its explain / robustness / ablation studies, on a small synthetic world."""
    from llmhyper.ctr.evaluate import baseline_methods, evaluate, load_artifacts
    from llmhyper.hyper.program import LLMHyper
    from llmhyper.trust.ablation import parse_variants, run_ablation
    from llmhyper.trust.explain import explain_study
    from llmhyper.trust.robustness import robustness_study

    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    syn = generate_synthetic(n_users=300, n_warm=40, n_cold=5, seed=1, image_dir=tmp_path / "img")
    syn.data.ad_by_id[syn.data.cold_ads[0]].title = '<b>bold</b> & "quoted" <script>alert(1)</script>'
    enc = HashEncoder()
    prep = prepare(syn.data, encoder=enc, k=3, progress=False)
    run = tmp_path / "run"
    eng = TrustEngine(
        weight_policy=main_topic_policy,
        reasoning_policy=topic_reasoning,
        stance_policy=stance_from_reasoning(),
        rewrite_policy=faithful_rewriter,
    )
    make_run(prep, enc, eng, run, syn.data.cold_ads)
    h = Handle(scripted_lm(eng))
    explain = explain_study(
        syn.data,
        run,
        tmp_path / "expl",
        tables={"lr_warm": prep.lr_warm},
        lm_handle=h,
        n_boot=50,
        progress=False,
    )
    reader = TrustEngine(weight_policy=reading_policy(), rewrite_policy=faithful_rewriter)
    hr = Handle(scripted_lm(reader))
    robustness = robustness_study(
        prep,
        enc,
        LLMHyper(ProgramConfig(batch_size=4)),
        hr,
        hr,
        syn.data.cold_ads[:3],
        tmp_path / "cf",
        {"test": True},
        n_boot=50,
        progress=False,
    )
    ablation = run_ablation(
        prep,
        enc,
        h,
        h,
        syn.data.cold_ads,
        tmp_path / "abl",
        {"test": True},
        base_k=3,
        variants=parse_variants("full,shots0"),
        reuse={"full": run},
        program_config=ProgramConfig(batch_size=4),
        n_boot=30,
        progress=False,
    )
    methods = baseline_methods(prep)
    methods.update(load_artifacts([run / "weights"]))
    ev = evaluate(prep, methods, n_boot=30, challengers=["llm_hyper"])
    return {
        "syn": syn,
        "prep": prep,
        "run": run,
        "explain": explain,
        "robustness": robustness,
        "ablation": ablation,
        "eval": ev,
        "tmp": tmp_path,
    }


def test_report_renders_self_contained_with_every_section(studies):
    s = studies
    rep = gather(
        s["syn"].data,
        [s["run"]],
        eval_result=s["eval"],
        explain=s["explain"],
        robustness=s["robustness"],
        ablation=s["ablation"],
        lr_warm=s["prep"].lr_warm,
    )
    html_path, md_path = write_report(rep, s["tmp"] / "out" / "report.html")
    html = html_path.read_text()
    page = Page()
    page.feed(html)
    page.close()

    # self-contained: no scripts, no external resources, no URL at all
    assert "http://" not in html and "https://" not in html
    assert page.count("script") == 0 and page.count("link") == 0 and page.count("img") == 0
    assert not any(k in ("src", "href") for _, a in page.tags for k in a)
    assert page.count("style") == 1

    # the pieces: two heatmap panels (lr_warm + the run), the calibration curve, three metric bar charts
    assert page.count("svg", "heatmap") == 2 and page.count("svg", "calibration") == 1
    assert page.count("svg", "bars") == 3
    n_ads, d = len(s["syn"].data.cold_ads), len(s["syn"].data.feature_names)
    assert page.count("rect") >= 2 * n_ads * d  # every cell of both heatmaps
    assert page.count("polyline") == 2  # one calibration curve per method (lr_warm, llm_hyper)
    for cls in ("runs", "metrics", "cosine", "calibration", "explain", "robustness", "ablation"):
        assert cls in page.table_cells, cls
    text = " ".join(page.text)
    for needle in (
        "HitRate@5",
        "Coverage@5",
        "Consistency Rate",
        "direction accuracy",
        "enhanced",
        "neutralised",
        "shots0",
        "knn_cal",
        "ad-AUC",
        "NDCG@10",
    ):
        assert needle in text, needle
    # metric bars come from the evaluate JSON: the baselines are there, with the paired difference vs knn_cal
    assert "lr_cold" in page.table_cells["metrics"] and "Δad-AUC vs knn_cal (p)" in text
    # hostile ad titles are escaped, never markup
    assert "<script>alert" not in html and not any(t == "b" for t, _ in page.tags)
    assert "&lt;b&gt;bold&lt;/b&gt;" in html

    md = md_path.read_text()
    for needle in (
        "| method |",
        "HitRate@5",
        "direction accuracy",
        "Δad-AUC vs knn_cal",
        "mean cosine vs lr_warm",
        "ECE",
    ):
        assert needle in md, needle
    assert "http://" not in md and "https://" not in md


def test_report_without_studies_computes_metrics_and_says_what_is_missing(studies):
    s = studies
    rep = gather(s["syn"].data, [s["run"], s["run"]], n_boot=30)  # the same run twice: two panels, two names
    assert [r["name"] for r in rep["runs"]] == ["llm_hyper", "llm_hyper:run"]
    assert set(rep["metrics"]["methods"]) == {"lr_warm", "llm_hyper", "llm_hyper:run"}
    m = rep["metrics"]["methods"]["llm_hyper"]["ad_auc"]
    assert m["lo"] <= m["value"] <= m["hi"]
    md = render_markdown(rep)
    assert "Not given: run `llmhyper trust explain" in md and "llmhyper trust ablate" in md
    assert len(rep["heatmap"]["panels"]) == 3
    # the heatmap may show fewer rows, but the cosine table covers every ad
    few = gather(s["syn"].data, [s["run"]], n_boot=30, max_ads=2)
    hm = few["heatmap"]
    assert len(hm["ads"]) == 2 and len(hm["cosine_vs_lr_warm"]["llm_hyper"]) == hm["n_ads_total"] > 2


def test_pieces():
    import numpy as np

    assert diverging(0) == "#ffffff" and diverging(1) == "#b2182b" and diverging(-1) == "#2166ac"
    assert diverging(float("nan")) == "#ffffff" and diverging(5) == diverging(1)
    Y = np.array([[0, 1, 0, 1], [1, 1, 0, 0]])
    P = np.array([[0.1, 0.9, 0.2, 0.8], [0.7, 0.6, 0.3, 0.4]])
    bins = calibration_bins(Y, P, np.ones_like(Y, bool), n_bins=2)
    assert [b["n"] for b in bins] == [4, 4]
    # lowest four predictions 0.1-0.4 were all non-clicks, highest four 0.6-0.9 all clicks
    assert bins[0]["pred"] == pytest.approx(0.25) and bins[0]["obs"] == 0.0
    assert bins[1]["pred"] == pytest.approx(0.75) and bins[1]["obs"] == 1.0


def test_report_command(default_run, tmp_path, capsys):
    from llmhyper.cli.main import main

    run, _ = default_run
    assert (
        main(
            [
                "trust",
                "explain",
                "--run",
                str(run),
                "--out",
                str(tmp_path / "e"),
                "--no-consistency",
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    out = tmp_path / "r" / "report.html"
    assert (
        main(
            [
                "report",
                "--runs",
                str(run),
                "--out",
                str(out),
                "--explain",
                str(tmp_path / "e"),
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    assert out.exists() and out.with_suffix(".md").exists()
    assert "HitRate@5" in out.read_text() and "written:" in capsys.readouterr().out
    assert (
        main(["report", "--runs", str(run), "--out", str(out), "--robustness", str(tmp_path / "nope")]) == 2
    )


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_chromium_loads_the_page(studies, tmp_path):
    s = studies
    rep = gather(
        s["syn"].data,
        [s["run"]],
        explain=s["explain"],
        robustness=s["robustness"],
        ablation=s["ablation"],
        lr_warm=s["prep"].lr_warm,
        n_boot=20,
    )
    html_path, _ = write_report(rep, tmp_path / "page" / "report.html")
    dom = dump_dom(html_path, tmp_path / "profile")
    dom = dom
    assert dom.count("<svg") == 2 + 1 + 1 + 3  # heatmaps, colour bar, calibration, metric bars
    assert dom.count('<svg class="heatmap"') == 2 and "HitRate@5" in dom and "direction accuracy" in dom
    assert "<script>alert" not in dom
