"""`llmhyper warmup` on the synthetic world: priors centred on better weights start higher and reach
LR_warm's AUC sooner; the precision comes from held-out retired ads; the table, JSON and SVG."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from llmhyper.ctr import warmup as wu
from llmhyper.ctr.posterior import EBSettings
from llmhyper.ctr.prepare import prepare
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.errors import LLMHyperError
from tests.fakes import HashEncoder

SETTINGS = wu.WarmupSettings(
    impressions=(0, 10, 40, 160),
    repeats=2,
    n_boot=30,
    eb=EBSettings(grid=(0.3, 3.0, 30.0), intercept_grid=(0.1, 10.0), reveal=(10, 40), max_ads=12),
)


@pytest.fixture(scope="module")
def world():
    s = generate_synthetic(n_users=400, n_warm=50, n_cold=10, seed=1)
    prep = prepare(s.data, encoder=HashEncoder(), k=3, progress=False)
    truth = s.truth.subset(s.data.cold_ads)
    truth.method = "oracle"  # an artifact; the synthetic world also has a "truth" baseline
    return s, prep, truth


@pytest.fixture(scope="module")
def result(world):
    _, prep, truth = world
    return wu.run_warmup(prep, ["lr_cold", "knn_cal"], {"oracle": truth}, SETTINGS, encoder=HashEncoder())


def test_simulation_shape_and_what_it_shows(result):
    assert list(result["priors"]) == ["none", "lr_cold", "knn_cal", "oracle"]
    assert result["impressions"] == [0, 10, 40, 160] and result["n_ads"] == 10
    auc = {name: [c["value"] for c in row["curve"]["auc"]] for name, row in result["priors"].items()}
    assert auc["none"][0] == pytest.approx(0.5)  # no prior, no data: no ranking
    assert auc["oracle"][0] > auc["knn_cal"][0] > auc["none"][0]  # better weights start higher
    assert auc["none"][-1] > auc["none"][1] > auc["none"][0]  # data teach the no-prior model
    assert auc["oracle"][-1] > 0.95 * result["lr_warm"]["auc"]["value"]
    for name, row in result["priors"].items():
        for m in wu.WARMUP_METRICS:
            cells = row["curve"][m]
            assert len(cells) == 4
            assert all(
                c["lo"] <= c["value"] + 1e-9 and c["value"] <= c["hi"] + 1e-9
                for c in cells
                if c["lo"] is not None and np.isfinite(c["value"])
            ), (name, m)
        assert len(row["auc_per_repeat"]) == 2
    # the headline: the true weights need no impressions; none needs the most
    need = {n: r["impressions_to_target"] for n, r in result["priors"].items()}
    assert need["oracle"] == 0.0
    assert need["none"] is None or need["none"] > need["oracle"]
    assert result["priors"]["oracle"]["saved_vs_none"]["value"] > 0
    json.dumps(result)  # JSON-safe


def test_precisions_come_from_retired_ads(result):
    rows = result["priors"]
    for name in ("none", "lr_cold", "knn_cal"):
        assert rows[name]["from"].startswith("empirical Bayes on held-out retired ads")
        assert rows[name]["eb"]["n_ads"] == 12
        assert len(rows[name]["eb"]["candidates"]) == (3 if name == "none" else 6)
    assert rows["none"]["intercept_precision"] == wu.FLAT
    # the synthetic truth covers no retired ad... it is given the cold ads only: it borrows knn_cal's
    assert rows["oracle"]["precision"] == rows["knn_cal"]["precision"] and "knn_cal's" in rows["oracle"]["from"]


def test_retired_split_holds_ads_out_of_the_pool(world):
    _, prep, _ = world
    view = wu.retired_split(prep, 12, seed=0)
    held = set(view.data.cold_ads)
    assert len(held) == 12 and held <= set(prep.retired.ad_ids)
    assert not held & set(view.retired.ad_ids) and not held & set(view.data.warm_ads)
    assert set(view.lr_warm.ad_ids) == held
    for ad, nbs in view.neighbours.items():
        assert not {n.ad_id for n in nbs} & held  # a held-out ad never sees itself or another held-out ad


def test_markdown_and_svg(result, tmp_path):
    text = wu.markdown(result)
    assert "| AUC at impressions per ad | none | lr_cold | knn_cal | oracle |" in text
    assert "impressions to 95% of LR_warm AUC" in text and "LR_warm (all train users)" in text
    svg = wu.svg(result)
    root = ET.fromstring(svg)  # well-formed
    assert root.tag.endswith("svg")
    assert svg.count("<polyline") == 4 and "95% of LR_warm" in svg


def test_crossing():
    assert wu.crossing([0, 10, 20], [0.5, 0.6, 0.8], 0.7) == pytest.approx(15.0)
    assert wu.crossing([0, 10], [0.9, 0.95], 0.8) == 0.0
    assert wu.crossing([0, 10], [0.5, 0.6], 0.8) is None


def test_bad_requests(world):
    _, prep, truth = world
    with pytest.raises(LLMHyperError, match="unknown or non-linear priors"):
        wu.run_warmup(prep, ["nope"], {}, SETTINGS)
    with pytest.raises(LLMHyperError, match="unknown or non-linear priors"):
        wu.run_warmup(prep, ["lr_warm"], {}, SETTINGS)  # the upper bound is not a prior
    with pytest.raises(LLMHyperError, match="increasing"):
        wu.run_warmup(prep, [], {}, wu.WarmupSettings(impressions=(10, 0)))


def test_cli_parses_and_registers():
    from llmhyper.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "warmup",
            "--dataset",
            "synthetic",
            "--priors",
            "lr_cold,RUN/weights",
            "--impressions",
            "0,5,20",
            "--repeats",
            "2",
        ]
    )
    assert args.impressions == (0, 5, 20) and args.repeats == 2 and args.priors == "lr_cold,RUN/weights"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["warmup", "--impressions", "10,5"])


def test_the_report_embeds_the_warmup_curves(result):
    from llmhyper.report.render import _warmup_html

    html = _warmup_html(result)
    assert '<section id="warmup">' in html and html.count("<polyline") == 4 and "oracle" in html
    assert "impressions to 95% of LR_warm AUC" in html
    assert _warmup_html(None) == ""
