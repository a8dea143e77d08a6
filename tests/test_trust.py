"""Trust studies with scripted LMs only: explainability metrics by hand, the consistency judge, counterfactual
direction accuracy (by hand and end to end on the synthetic world), the ablation driver and the CLI."""

from __future__ import annotations

import json

import pytest

from llmhyper.ctr.prepare import prepare
from llmhyper.hyper.program import LLMHyper, ProgramConfig
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.trust.explain import (
    coverage_at_k,
    explain_study,
    explainability,
    hit_rate_at_k,
    random_expectation,
    target_features,
    top_k,
    weights_from_run,
)
from llmhyper.trust.consistency import score_consistency
from llmhyper.trust.robustness import direction_accuracy, direction_correct, robustness_study, text_unchanged
from tests.fakes import HashEncoder
from tests.scripted_lm import Handle, scripted_lm
from tests.scripted_trust import (
    TrustEngine,
    main_topic_policy,
    make_run,
    stance_from_reasoning,
    topic_reasoning,
    constant_policy,
    contrarian_rewriter,
    faithful_rewriter,
    reading_policy,
    section,
)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    syn = generate_synthetic(n_users=300, n_warm=40, n_cold=5, seed=1, image_dir=tmp_path / "img")
    enc = HashEncoder()
    return syn, prepare(syn.data, encoder=enc, k=5, progress=False), enc


# -- explainability by hand -------------------------------------------------------------------------


def test_target_features_per_data_set():
    from llmhyper.data.movielens import feature_specs as ml_specs
    from llmhyper.data.synthetic import feature_specs as syn_specs

    ml = [f.name for f in ml_specs()]
    assert target_features({"metadata": {"genres": ["Drama", "Children's"]}}, ml) == [
        "share_Drama",
        "like_Drama",
        "share_Childrens",
        "like_Childrens",
    ]
    assert target_features({"metadata": {"genres": ["Film-Noir"]}}, ml) == ["share_FilmNoir", "like_FilmNoir"]
    syn = [f.name for f in syn_specs()]
    assert target_features({"metadata": {"topics": ["tech", "travel"]}}, syn) == [
        "interest_tech",
        "interest_travel",
    ]
    # the general hook wins, and names that are not features are dropped
    meta = {"target_features": ["age", "nope", "age"], "topics": ["tech"]}
    assert target_features({"metadata": meta}, syn) == ["age"]
    assert target_features({"metadata": {}}, syn) == []


def test_hit_rate_and_coverage_by_hand():
    w = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5, "f": 0.4, "g": -0.95, "h": 0.0}
    assert top_k(w, 5) == ["a", "b", "c", "d", "e"]
    assert top_k(w, 5, rank="abs") == ["g", "a", "b", "c", "d"]
    assert hit_rate_at_k(w, ["e", "g"]) == 1.0
    assert coverage_at_k(w, ["e", "g"]) == pytest.approx(1 / 6)  # {e} / {a,b,c,d,e,g}
    assert hit_rate_at_k(w, ["f", "h"]) == 0.0 and coverage_at_k(w, ["f", "h"]) == 0.0
    assert coverage_at_k(w, ["a", "b"]) == pytest.approx(2 / 5)
    assert coverage_at_k(w, ["e", "g"], rank="abs") == pytest.approx(1 / 6)  # {g} / {g,a,b,c,d,e}
    assert top_k({"x": 0.0, "b": 0.0, "a": 0.0}, 2) == ["a", "b"]  # ties: by name
    # random top-5 of 8 features with 2 true ones: 1 - C(6,5)/C(8,5); E[Jaccard] = 30/56 * 1/6 + 20/56 * 2/5
    hit, cov = random_expectation(8, 2, 5)
    assert hit == pytest.approx(1 - 6 / 56) and cov == pytest.approx(30 / 56 / 6 + 20 / 56 * 2 / 5)


def test_explainability_is_paired_and_averaged():
    truth = {"1": ["a"], "2": ["b"], "3": ["c"], "4": []}
    llm = {"1": {"a": 1.0, "b": 0.0}, "2": {"a": 1.0, "b": 0.5}, "3": {"a": 0.1, "c": 0.2}, "4": {"a": 1.0}}
    knn = {"1": {"a": 0.0, "b": 1.0}, "2": {"a": 0.0, "b": 1.0}}  # covers only ads 1 and 2
    res = explainability({"llm_hyper": llm, "knn": knn}, truth, k=1, n_features=3, n_boot=200)
    rows = res["methods"]
    assert rows["llm_hyper"]["n_ads"] == rows["knn"]["n_ads"] == 2  # paired: ads 1 and 2 (4 has no truth)
    assert rows["llm_hyper"]["hit_rate"]["value"] == pytest.approx(0.5)  # top-1: a (hit), a (miss)
    assert rows["knn"]["hit_rate"]["value"] == pytest.approx(0.5)  # b (miss), b (hit)
    assert rows["llm_hyper"]["coverage"]["value"] == pytest.approx(0.5)  # Jaccard 1 and 0
    assert rows["random (expected)"]["hit_rate"]["value"] == pytest.approx(1 / 3)
    unpaired = explainability({"llm_hyper": llm}, truth, k=1, paired=False)["methods"]["llm_hyper"]
    assert unpaired["n_ads"] == 3 and unpaired["hit_rate"]["value"] == pytest.approx(2 / 3)


def test_consistency_by_hand():
    views = [
        {
            "batch": 0,
            "features": ["a", "b", "c", "d"],
            "reasoning": "r0",
            "weights": {"a": 0.1, "b": -0.3, "c": 0.05, "d": 0.4},
        },
        {"batch": 1, "features": ["e", "f", "g"], "reasoning": "r1", "weights": {"e": -0.2, "f": 0.3}},
    ]
    stances = [
        {"a": "positive", "b": "Positive", "c": "neutral", "d": "not mentioned"},
        {"e": "neg", "f": "maybe", "g": "negative"},
    ]
    s = score_consistency(views, stances, tau=0.1)
    # a: +0.1 >= tau (match); b: positive but -0.3 (miss); c: |0.05| < tau (match); d: not mentioned;
    # e: negative, -0.2 (match); f: unknown label; g: no weight
    assert (s["judged"], s["match"], s["not_mentioned"], s["unlabelled"], s["no_weight"]) == (4, 3, 1, 1, 1)
    assert s["rate"] == pytest.approx(0.75)
    assert s["by_label"]["positive"] == {"n": 2, "match": 1}
    # a failed judge call labels nothing
    s2 = score_consistency(views, [None, stances[1]], tau=0.1)
    assert (s2["judged"], s2["unlabelled"]) == (1, 5)


# -- explainability end to end (scripted generate run + scripted judge) ----------------------------


def test_explain_study_with_scripted_judge_and_resume(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    eng = TrustEngine(weight_policy=main_topic_policy, reasoning_policy=topic_reasoning)
    make_run(prep, enc, eng, tmp_path / "run", cold)
    raw = weights_from_run(tmp_path / "run")
    assert sorted(raw) == sorted(cold)

    def explain_with(engine, folder, **kw):
        kw.setdefault("n_boot", 50)
        return explain_study(
            syn.data, tmp_path / "run", tmp_path / folder, lm_handle=Handle(scripted_lm(engine)), progress=False, **kw
        )

    judge = TrustEngine(stance_policy=stance_from_reasoning())
    summary = explain_with(judge, "expl", tables={"lr_warm": prep.lr_warm}, n_boot=100)
    assert judge.stance_calls == 2 * len(cold)  # 7 features in batches of 4: two batches per ad
    rows = summary["methods"]
    assert rows["llm_hyper"]["hit_rate"]["value"] == 1.0  # the main topic weighs 1.0, everything else 0
    assert rows["llm_hyper"]["n_ads"] == rows["lr_warm"]["n_ads"] == len(cold)
    assert "random (expected)" in rows
    cons = summary["consistency"]
    # per ad: the topic (positive, w=1) and age (neutral, w=0) are judged and match; the rest not mentioned
    assert cons["judged"] == 2 * len(cold) and cons["rate"] == 1.0 and cons["not_mentioned"] == 5 * len(cold)
    rec = json.loads((tmp_path / "expl" / "consistency" / f"{cold[0]}.json").read_text())
    assert rec["status"] == "ok" and len(rec["batches"]) == 2 and rec["batches"][0]["verdict"]["ok"]
    assert (tmp_path / "expl" / "calls.jsonl").read_text().count("\n") == judge.stance_calls
    md = (tmp_path / "expl" / "explain.md").read_text()
    assert "HitRate@5" in md and "Coverage@5" in md and "Consistency Rate" in md

    # resume: finished ads are not judged again
    again = TrustEngine(stance_policy=stance_from_reasoning())
    explain_with(again, "expl")
    assert again.stance_calls == 0

    # a judge whose labels contradict the weights (the topic called negative): half the judged features match
    bad = explain_with(TrustEngine(stance_policy=stance_from_reasoning(lie=True)), "expl2")
    assert bad["consistency"]["rate"] == pytest.approx(0.5)
    assert bad["consistency"]["by_label"]["negative"] == {"n": len(cold), "match": 0, "rate": 0.0}

    # consistency on the first two ads only; HitRate/Coverage still over every ad
    few = TrustEngine(stance_policy=stance_from_reasoning())
    part = explain_with(few, "expl3", consistency_limit=2)
    assert few.stance_calls == 2 * 2 and part["consistency"]["ads"] == 2
    assert part["methods"]["llm_hyper"]["n_ads"] == len(cold)
    assert "of 2 ads" in (tmp_path / "expl3" / "explain.md").read_text()
    # a smaller limit on the same folder judges nothing new and counts only its own ads
    one = TrustEngine(stance_policy=stance_from_reasoning())
    assert explain_with(one, "expl3", consistency_limit=1)["consistency"]["ads"] == 1 and one.stance_calls == 0


# -- counterfactual robustness ---------------------------------------------------------------------


def test_direction_accuracy_by_hand():
    assert direction_correct("enhanced", 0.2, 0.5) and not direction_correct("enhanced", 0.2, 0.2)
    assert direction_correct("diminished", 0.3, -0.1) and not direction_correct("diminished", -0.5, -0.4)
    assert direction_correct("neutralised", 0.8, 0.1) and not direction_correct("neutralised", -0.6, 0.7)
    assert direction_correct("neutralised", -0.6, 0.5)  # toward 0 from the other side still counts
    assert direction_correct("neutralised", 0.0, 0.0) and not direction_correct("neutralised", 0.0, 0.2)
    with pytest.raises(ValueError):
        direction_correct("sideways", 0, 1)
    items = [
        {"type": "enhanced", "before": 0.2, "after": 0.5},
        {"type": "enhanced", "before": 0.2, "after": 0.2, "text_unchanged": True},
        {"type": "diminished", "before": 0.3, "after": -0.1},
        {"type": "diminished", "before": -0.5, "after": -0.4},
        {"type": "neutralised", "before": 0.8, "after": 0.1},
        {"type": "neutralised", "before": -0.6, "after": 0.7},
        {"type": "neutralised", "before": 0.0, "after": 0.0},
        {"type": "neutralised", "before": 0.4, "after": None},
    ]  # failed: counted, not scored
    acc = direction_accuracy(items, n_boot=100)
    assert acc["enhanced"]["accuracy"] == pytest.approx(0.5) and acc["enhanced"][
        "mean_change"
    ] == pytest.approx(0.15)
    assert acc["diminished"]["accuracy"] == pytest.approx(0.5)
    assert acc["neutralised"]["accuracy"] == pytest.approx(2 / 3) and acc["neutralised"]["failed"] == 1
    assert acc["overall"]["n"] == 7 and acc["overall"]["correct"] == 4 and acc["overall"]["failed"] == 1
    # the two ways a move fails: the weight stays put (2 items), the rewriter changed nothing (1 item)
    assert acc["overall"]["weight_unchanged"] == 2 and acc["enhanced"]["weight_unchanged"] == 1
    assert acc["overall"]["text_unchanged"] == 1 and acc["diminished"]["text_unchanged"] == 0


def test_text_unchanged_ignores_title_case_and_spacing():
    orig = {"title": "Fargo (1996)", "text": "Movie. Genres: Crime."}
    same = {"ok": True, "title": "Fargo - Crime", "text": " movie.  genres: crime.", "original": orig}
    assert text_unchanged(same)
    assert not text_unchanged({**same, "text": "Movie. Genres: Drama."})
    assert text_unchanged({"ok": False, "reason": "empty rewrite", "original": orig}) is None
    assert text_unchanged({}) is None


def robust(prep, enc, weight_policy, rewriter, out, ad_ids, **kw):
    eng = TrustEngine(weight_policy=weight_policy, rewrite_policy=rewriter)
    h = Handle(scripted_lm(eng))
    program = LLMHyper(ProgramConfig(batch_size=4))
    summary = robustness_study(
        prep, enc, program, h, h, ad_ids, out, {"test": True}, n_boot=100, progress=False, **kw
    )
    return summary, eng


def test_faithful_rewrites_move_the_target_weight_the_right_way(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads
    out = tmp_path / "cf"
    summary, eng = robust(prep, enc, reading_policy(), faithful_rewriter, out, cold)
    acc = summary["accuracy"]
    for kind in ("enhanced", "diminished", "neutralised", "overall"):
        assert acc[kind]["accuracy"] == 1.0, (kind, acc[kind])
    assert acc["overall"]["n"] == 3 * len(cold) and acc["overall"]["failed"] == 0
    assert acc["enhanced"]["mean_change"] > 0 > acc["diminished"]["mean_change"]
    assert acc["overall"]["weight_unchanged"] == 0 and acc["overall"]["text_unchanged"] == 0
    assert eng.rewrite_calls == 3 * len(cold)
    # scope "batch": one program run = one weight call (the target's batch of 4) + the judge
    assert eng.weight_calls == 4 * len(cold) and eng.judge_calls == 4 * len(cold)
    # the rewrites are kept for inspection, and the items say what was shown and what came out
    ad0 = cold[0]
    target = target_features(syn.data.ad_by_id[ad0], syn.data.feature_names)[0]
    rw = json.loads((out / "rewrites" / f"{ad0}__{target}__enhanced.json").read_text())
    assert rw["ok"] and rw["text"].endswith("fans.") and rw["original"]["text"] == syn.data.ad_by_id[ad0].text
    item = json.loads((out / "items" / f"{ad0}__{target}__enhanced.json").read_text())
    orig = json.loads((out / "items" / f"{ad0}__{target}__original.json").read_text())
    assert item["status"] == "ok" and item["weight"] > orig["weight"] and len(item["features"]) == 4
    assert target in item["features"]
    assert (out / "robustness.md").exists() and "direction accuracy" in (out / "robustness.md").read_text()
    assert (
        len((out / "calls.jsonl").read_text().splitlines())
        == eng.rewrite_calls + eng.weight_calls + eng.judge_calls
    )

    # resume: nothing is asked again
    again, eng2 = robust(prep, enc, reading_policy(), faithful_rewriter, out, cold)
    assert eng2.weight_calls == eng2.rewrite_calls == 0 and again["accuracy"]["overall"]["accuracy"] == 1.0


def test_broken_rewriter_and_blind_hypernetwork_score_low(world, tmp_path):
    syn, prep, enc = world
    cold = syn.data.cold_ads[:3]
    contrary, _ = robust(prep, enc, reading_policy(), contrarian_rewriter, tmp_path / "c", cold)
    acc = contrary["accuracy"]
    assert acc["enhanced"]["accuracy"] == 0.0 and acc["diminished"]["accuracy"] == 0.0
    assert acc["neutralised"]["accuracy"] == 1.0 and acc["overall"]["accuracy"] == pytest.approx(1 / 3)
    # a hypernetwork that ignores the ad cannot move any weight
    blind, _ = robust(prep, enc, constant_policy(0.3), faithful_rewriter, tmp_path / "b", cold)
    assert blind["accuracy"]["overall"]["accuracy"] == 0.0 and blind["accuracy"]["overall"]["n"] == 9
    assert blind["accuracy"]["overall"]["weight_unchanged"] == 9


def test_failed_rewrites_are_recorded_not_scored_and_retried_on_resume(world, tmp_path):
    syn, prep, enc = world
    ad = syn.data.cold_ads[:1]
    empty, eng = robust(prep, enc, reading_policy(), lambda a, t, c: ("", ""), tmp_path / "e", ad)
    acc = empty["accuracy"]["overall"]
    assert acc["n"] == 0 and acc["failed"] == 3 and acc["accuracy"] is None
    assert eng.weight_calls == 1  # only the original was weighed
    item = json.loads(next((tmp_path / "e" / "items").glob("*__enhanced.json")).read_text())
    assert item["status"] == "failed" and "empty rewrite" in item["reason"]
    fixed, eng2 = robust(prep, enc, reading_policy(), faithful_rewriter, tmp_path / "e", ad)
    assert eng2.rewrite_calls == 3 and fixed["accuracy"]["overall"]["accuracy"] == 1.0


def test_scope_all_and_settings_guard(world, tmp_path):
    from llmhyper.errors import LLMHyperError

    syn, prep, enc = world
    ad = syn.data.cold_ads[:1]
    summary, eng = robust(
        prep, enc, reading_policy(), faithful_rewriter, tmp_path / "all", ad, scope="all", types=("enhanced",)
    )
    assert summary["accuracy"]["enhanced"]["accuracy"] == 1.0
    assert eng.weight_calls == 2 * 2  # original + rewrite, each all 7 features in 2 batches
    with pytest.raises(LLMHyperError, match="other settings"):
        robust(prep, enc, reading_policy(), faithful_rewriter, tmp_path / "all", ad, scope="batch")


# -- ablations -------------------------------------------------------------------------------------


def ablation_policy(feature, user):
    desc = section(user, "ad").lower()
    return 1.0 if feature.startswith("interest_") and feature[9:] in desc else 0.1


def user_prompts(run_dir):
    out = []
    for line in (run_dir / "calls.jsonl").read_text().splitlines():
        call = json.loads(line)
        msgs = call.get("messages") or []
        user = "\n".join(str(m.get("content")) for m in msgs if m.get("role") == "user")
        if "[[ ## examples ## ]]" in user and "[[ ## features ## ]]" in user:  # a weight call
            out.append(user)
    return out


def test_ablation_variants_see_what_they_should_and_share_one_table(world, tmp_path):
    from llmhyper.trust.ablation import parse_variants, run_ablation

    syn, prep, enc = world
    cold = syn.data.cold_ads
    eng = TrustEngine(weight_policy=ablation_policy)
    h = Handle(scripted_lm(eng))
    out = tmp_path / "abl"
    summary = run_ablation(
        prep,
        enc,
        h,
        h,
        cold,
        out,
        {"test": True},
        base_k=3,
        program_config=ProgramConfig(batch_size=4),
        n_boot=50,
        progress=False,
    )
    assert set(summary["variants"]) == {"full", "shots0", "shots5", "no_caption", "hide_titles"}
    prompts = {v: user_prompts(out / v) for v in summary["variants"]}
    assert all(len(p) == 2 * len(cold) for p in prompts.values())
    ex = lambda u: section(u, "examples")  # noqa: E731
    ad = lambda u: section(u, "ad")  # noqa: E731
    assert all("(no similar past ads)" in ex(u) and "Trained weights" not in u for u in prompts["shots0"])
    assert all("Example 3" in ex(u) and "Example 4" not in ex(u) for u in prompts["full"])
    assert all("Example 5" in ex(u) for u in prompts["shots5"])
    assert all("Image:" in ad(u) for u in prompts["full"])
    assert all("Image:" not in ad(u) and "Image:" not in ex(u) for u in prompts["no_caption"])
    assert all("Title:" not in ad(u) and "Title:" not in ex(u) for u in prompts["hide_titles"])
    assert all("Title:" in ad(u) for u in prompts["shots0"])
    # every variant calibrates to the same alpha (the base k neighbours), whatever it shows the LLM
    for a in cold:
        alphas = {
            v: json.loads((out / v / "ads" / f"{a}.json").read_text())["alpha"] for v in summary["variants"]
        }
        assert len({round(x, 12) for x in alphas.values()}) == 1, alphas
    res = summary["evaluation"]
    for v in summary["variants"]:
        assert set(res["methods"][v]["vs_knn_cal"]) >= {"auc", "ad_auc", "ndcg10"}
    md = (out / "ablation.md").read_text()
    for v in list(summary["variants"]) + ["knn_cal", "ad-AUC", "NDCG@10", "Δad-AUC vs knn_cal"]:
        assert v in md
    # rerun: every variant resumes, nothing is generated again; --reuse takes an existing run as a variant
    calls = eng.weight_calls
    run_ablation(
        prep,
        enc,
        h,
        h,
        cold,
        out,
        {"test": True},
        base_k=3,
        program_config=ProgramConfig(batch_size=4),
        n_boot=20,
        progress=False,
    )
    assert eng.weight_calls == calls
    reused = run_ablation(
        prep,
        enc,
        h,
        h,
        cold,
        tmp_path / "abl2",
        {"test": True},
        base_k=3,
        variants=parse_variants("full,shots0"),
        reuse={"full": out / "full", "shots0": out / "shots0"},
        program_config=ProgramConfig(batch_size=4),
        n_boot=20,
        progress=False,
    )
    assert eng.weight_calls == calls and reused["variants"]["full"]["reused"]
    assert not (tmp_path / "abl2" / "full").exists()
    # a run made with other inputs cannot stand for a variant
    with pytest.raises(ValueError, match="cannot stand for variant full"):
        run_ablation(
            prep,
            enc,
            h,
            h,
            cold,
            tmp_path / "abl3",
            {"test": True},
            variants=parse_variants("full"),
            reuse={"full": out / "shots0"},
            program_config=ProgramConfig(batch_size=4),
            progress=False,
        )


def test_parse_variants():
    from llmhyper.trust.ablation import Variant, parse_variants

    assert [v.name for v in parse_variants(None)] == ["full", "shots0", "shots5", "no_caption", "hide_titles"]
    assert parse_variants("shots1:shots=1:caption=0") == [Variant("shots1", shots=1, caption=False)]
    with pytest.raises(ValueError):
        parse_variants("nonsense")
    with pytest.raises(ValueError):
        parse_variants("full,full")


def test_shots0_program_passes_an_empty_example_list(world):
    """shots=0 is done in the program, not by k=0: retrieval also sets the calibration target alpha."""
    from llmhyper.trust.ablation import Variant, variant_program

    syn, prep, enc = world
    program = variant_program(Variant("shots0", shots=0))
    seen = {}

    def spy(ad, examples, features):
        seen["examples"] = examples
        raise RuntimeError("stop")

    object.__setattr__(program, "_forward", spy)
    with pytest.raises(RuntimeError):
        program.forward({"title": "t", "text": "x"}, [{"similarity": 1.0}], [])
    assert seen["examples"] == []


# -- command line ----------------------------------------------------------------------------------


def test_cli_registers_trust_and_report_and_explains_without_llm(default_run, tmp_path, capsys):
    from llmhyper.cli import report as report_cmd
    from llmhyper.cli import trust as trust_cmd
    from llmhyper.cli.main import build_parser, main
    from llmhyper.trust.settings import resolve

    run, syn = default_run
    parser = build_parser()
    args = parser.parse_args(["trust", "robustness", "--base-run", str(run), "--out", "x"])
    assert args.func is trust_cmd.run and args.trust_command == "robustness"
    assert args.scope == "batch" and args.lm is None and args.run == str(run)
    settings = resolve(trust_cmd.study_settings(args), run)  # unset settings come from the base run
    assert (settings.data.dataset, settings.batch_size, settings.judge, settings.encoder) == (
        "synthetic", 4, True, "test-hash")
    assert settings.lm.spec == "scripted" and settings.judge_settings is settings.lm
    # given settings win over the base run's; --run is the README's name of --base-run
    args = parser.parse_args(["trust", "ablate", "--run", str(run), "--out", "x", "--batch-size", "2",
                              "--no-judge"])
    settings = resolve(trust_cmd.study_settings(args), args.run)
    assert (settings.batch_size, settings.judge, settings.k) == (2, False, 3)
    assert parser.parse_args(["report", "--runs", "a", "b"]).func is report_cmd.run

    # a sub-command's error shows that sub-command's usage, not the top-level one
    with pytest.raises(SystemExit):
        parser.parse_args(["trust", "robustness", "--out", "x", "--bogus"])
    err = capsys.readouterr().err
    assert "usage: llmhyper trust robustness" in err and "unrecognized arguments: --bogus" in err

    assert main(["trust", "estimate", "--n-ads", "97"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["generate (main run)"]["llm_calls"] == 485 and est["explain"]["llm_calls"] == 388
    assert est["robustness"]["llm_calls"] == 97 * 11 and est["ablation"]["llm_calls"] == 97 * 25

    out = tmp_path / "expl"
    assert (
        main(
            [
                "trust",
                "explain",
                "--run",
                str(run),
                "--out",
                str(out),
                "--no-consistency",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    summary = json.loads((out / "explain.json").read_text())
    assert set(summary["methods"]) == {"llm_hyper", "lr_warm", "knn", "lr_cold", "random (expected)"}
    assert summary["methods"]["llm_hyper"]["hit_rate"]["value"] == 1.0
    assert summary["methods"]["llm_hyper"]["n_ads"] == len(syn.data.cold_ads)
    assert "consistency" not in summary
    assert main(["trust", "ablate", "--out", str(tmp_path / "a"), "--variants", "bogus"]) == 2


def test_cli_robustness_and_ablate_wire_the_studies(default_run, tmp_path, monkeypatch, capsys):
    """The commands with the LM and encoder builders swapped for scripted ones (no LLM is started)."""
    import llmhyper.llm.build
    import llmhyper.retrieval.encoders
    from llmhyper.cli.main import main

    run, syn = default_run
    eng = TrustEngine(weight_policy=reading_policy(), rewrite_policy=faithful_rewriter)
    built = []

    def fake_build_lm(settings, **kw):
        built.append(settings.spec)
        return Handle(scripted_lm(eng))

    monkeypatch.setattr(llmhyper.llm.build, "build_lm", fake_build_lm)
    monkeypatch.setattr(llmhyper.retrieval.encoders, "get_encoder", lambda name: HashEncoder())
    out = tmp_path / "cf"
    assert (
        main(
            [
                "trust",
                "robustness",
                "--base-run",
                str(run),
                "--out",
                str(out),
                "--limit",
                "2",
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    assert built == ["scripted"]  # the base run's LM, built once for the program and the rewriter
    summary = json.loads((out / "robustness.json").read_text())
    assert summary["accuracy"]["overall"]["n"] == 6 and summary["accuracy"]["overall"]["accuracy"] == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["batch_size"], cfg["dataset"], cfg["scope"]) == (4, "synthetic", "batch")

    abl = tmp_path / "abl"
    assert (
        main(
            [
                "trust",
                "ablate",
                "--base-run",
                str(run),
                "--out",
                str(abl),
                "--limit",
                "2",
                "--variants",
                "full,shots0",
                "--reuse",
                f"full={run}",
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    res = json.loads((abl / "ablation.json").read_text())
    assert res["variants"]["full"]["reused"] and not (abl / "full").exists()
    assert len(list((abl / "shots0" / "ads").glob("*.json"))) == 2
    assert "shots0" in capsys.readouterr().out
