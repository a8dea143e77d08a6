"""The edit program end to end with a scripted server: on the world where only the text can tell
(synthetic-unseen), the gate fitted on held-out retired ads (grouped by topic) lets the LM's edits in and
the edited weights beat the prior on the cold ads; an LM that reads nothing gets gamma 0 and the prior."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from llmhyper.ctr.metrics import pooled_auc
from llmhyper.ctr.prepare import prepare
from llmhyper.data import DataSettings
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.hyper.edit import EditConfig, EditProgram
from llmhyper.hyper.edit_inputs import edit_context
from llmhyper.hyper.edit_run import GateSettings, validation_ads
from llmhyper.optimize.edit_compile import EditRunSettings, compile_edit, load_edit_program, run_edit
from llmhyper.runs import RunBusy, RunDir
from llmhyper.weights import WeightTable
from tests.fakes import HashEncoder
from tests.test_edit import ScriptedServer, new_ad_text


def reader(name, prompt):
    """A scripted LM that reads the ad: 'much higher' for the interest named in the ad's own text."""
    ad_text = new_ad_text(prompt)
    m = re.search(r"people into (\w+)", ad_text)
    if m and name == f"interest_{m.group(1)}":
        return [0.0, 0.0, 0.05, 0.15, 0.8]
    return [0.0, 0.0, 1.0, 0.0, 0.0]


def blind(name, prompt):
    return [0.1, 0.2, 0.4, 0.2, 0.1]


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMHYPER_CACHE", str(tmp_path / "cache"))
    syn = generate_synthetic(seed=0, unseen_topics=True, n_warm=60, n_cold=12)
    enc = HashEncoder()
    prep = prepare(syn.data, encoder=enc, k=3, progress=False)
    return syn, enc, prep


def cold_auc(prep, table: WeightTable) -> float:
    data = prep.data
    users = data.test_users
    _, Y, M = data.block(users, table.ad_ids)
    return float(pooled_auc(Y, data.X[users] @ table.theta.T + table.intercept, mask=M))


def variants(config, server, shots=(3, 0)):
    return {f"shots-{n}": EditProgram(replace(config, shots=n), client=server) for n in shots}


def compile_and_run(prep, enc, tmp_path, policy, name, layout="lines"):
    data = prep.data
    ctx = edit_context(prep, list(data.cold_ads), enc, group_by="topics")
    settings = EditRunSettings(data=DataSettings(dataset="synthetic-unseen"), encoder=enc.name, k=3,
                               lm={"spec": "scripted"}, config=EditConfig(batch_size=20, layout=layout),
                               group_by="topics")
    server = ScriptedServer(policy)
    man = compile_edit(prep, ctx, variants(settings.config, server), tmp_path / name, {}, settings,
                       GateSettings(n_ads=36, seed=0), {"model": "scripted"}, progress=False)
    program, man2 = load_edit_program(tmp_path / f"{name}.json", server)
    assert man2["gamma"] == man["gamma"]
    out = tmp_path / f"{name}-run"
    totals = run_edit(prep, ctx, program, man, list(data.cold_ads), out, {}, settings, tmp_path / f"{name}.json",
                      {"model": "scripted"}, progress=False)
    assert totals["ads"] == len(data.cold_ads) and totals["parse_failures"] == 0
    return man, WeightTable.load(out / "weights"), ctx, server


@pytest.mark.parametrize("layout", ["lines", "digits"])
def test_a_reading_lm_earns_its_gate_and_beats_the_prior_where_only_text_can_tell(world, tmp_path, layout):
    syn, enc, prep = world
    man, edited, ctx, server = compile_and_run(prep, enc, tmp_path, reader, "reader", layout)
    v = man["validation"]
    assert man["gamma"] > 0.2 and not man["lm_adds_nothing"]
    assert v["validation_auc_edited"] > v["validation_auc_prior"]  # on the report third, not chosen on
    assert man["sha256"] != man["seed_sha256"]  # the compiled program holds its gate
    assert v["metric_calls"] > v["lm_calls"] and len(v["candidates"]) == 1 + 2 * 4
    assert (tmp_path / "reader.search.md").read_text().count("| shots-") == 8
    cold = list(prep.data.cold_ads)
    prior = WeightTable("prior", cold, ctx.feature_names, np.stack([ctx.theta[a] for a in cold]),
                        np.array([ctx.intercept[a] for a in cold]))
    truth = syn.truth.subset(cold)
    assert cold_auc(prep, edited) > cold_auc(prep, prior) + 0.03
    cos = lambda a, b: float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert np.mean([cos(e, t) for e, t in zip(edited.theta, truth.theta)]) > \
        np.mean([cos(p, t) for p, t in zip(prior.theta, truth.theta)]) + 0.2


def test_a_blind_lm_gets_gamma_zero_and_the_prior(world, tmp_path):
    _, enc, prep = world
    man, edited, ctx, _ = compile_and_run(prep, enc, tmp_path, blind, "blind")
    assert man["gamma"] < 0.05
    for a, theta in zip(edited.ad_ids, edited.theta):  # the prior's direction (the artifact may be normalised)
        prior = ctx.theta[a]
        assert float(theta @ prior / np.linalg.norm(theta) / np.linalg.norm(prior)) > 0.995


def test_the_gate_run_resumes_from_its_records_and_refuses_a_second_process(world, tmp_path):
    _, enc, prep = world
    compile_and_run(prep, enc, tmp_path, reader, "r1")
    server = ScriptedServer(reader)
    data = prep.data
    ctx = edit_context(prep, list(data.cold_ads), enc, group_by="topics")
    settings = EditRunSettings(data=DataSettings(dataset="synthetic-unseen"), encoder=enc.name, k=3,
                               lm={"spec": "scripted"}, config=EditConfig(batch_size=20), group_by="topics")
    compile_edit(prep, ctx, variants(settings.config, server), tmp_path / "r1", {}, settings,
                 GateSettings(n_ads=36, seed=0), {"model": "scripted"}, progress=False)
    assert server.bodies == []  # every validation ad came from its record
    assert len(validation_ads(prep, GateSettings(n_ads=36, seed=0))) == 36
    with RunDir(tmp_path / "r1.gate" / "shots-3"), pytest.raises(RunBusy):
        RunDir(tmp_path / "r1.gate" / "shots-3").acquire()
