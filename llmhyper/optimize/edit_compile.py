"""Compile and run the edit program: the ridge prior as the floor, the LM as a gated editor of it.

`compile_edit` runs each prompt variant on held-out retired ads, searches the gates over their labels
(`hyper.edit_gate`) and writes `programs/NAME.json` (the DSPy state with the chosen configuration and
gate), `NAME.manifest.json` (the gate, validation before/after on the report third, calls, seed and
compiled SHA-256), `NAME.search.md` (every candidate's score: the compile's log) and the run folders of
the validation labels `NAME.gate/VARIANT/`. `run_edit` runs a compiled program over cold ads into a
run folder with the usual artifact (`RUN/weights/`, method `llm_edit`) and manifest.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmhyper.ctr.prepare import Prepared
from llmhyper.data import DataSettings
from llmhyper.errors import LLMHyperError
from llmhyper.fmt import md_table
from llmhyper.hyper.edit import EditConfig, EditProgram, Gate
from llmhyper.hyper.edit_inputs import EditContext
from llmhyper.hyper.edit_run import METHOD, GateSettings, compile_gate, edit_ads, edit_table
from llmhyper.llm.logprobs import ChatClient
from llmhyper.runs import RunDir
from llmhyper.store import (
    file_sha256,
    git_commit,
    now,
    read_json,
    versions,
    write_bytes_atomic,
    write_json_atomic,
)


@dataclass(frozen=True)
class EditRunSettings:
    """What a run of the edit program depends on (a rerun with others is refused)."""

    data: DataSettings = field(default_factory=DataSettings)
    encoder: str = "minilm-effnet-conse"
    k: int = 3
    lm: dict[str, Any] = field(default_factory=dict)  # LMSettings.record()
    config: EditConfig = field(default_factory=EditConfig)
    group_by: str | None = None  # metadata field whose groups the retired out-of-fold priors leave out

    def record(self, **extra: Any) -> dict[str, Any]:
        out = {
            "data": self.data.name,
            "seed": self.data.seed,
            "posters": self.data.posters,
            "encoder": self.encoder,
            "k": self.k,
            "lm": self.lm,
            "config": asdict(self.config),
            "group_by": self.group_by,
            **extra,
        }
        return json.loads(json.dumps(out, default=str))


def manifest_path(program: Path) -> Path:
    return program.with_name(program.stem + ".manifest.json")


def program_sha256(program: EditProgram, path: Path) -> str:
    """The SHA-256 of the program's saved file (saved beside `path`, then removed)."""
    tmp = path.with_name(path.stem + ".tmp.json")
    program.save(str(tmp))
    try:
        return file_sha256(tmp)
    finally:
        tmp.unlink()


def compile_edit(
    prep: Prepared,
    ctx: EditContext,
    programs: dict[str, EditProgram],
    out: Path,
    captions: dict[str, str],
    settings: EditRunSettings,
    gate: GateSettings,
    lm_description: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Run the prompt variants (the first is the seed) on held-out retired ads, choose the gate, write the
    program, its manifest, its search log and the variants' run folders."""
    out = Path(out)
    program_path = out.with_suffix(".json")
    seed_name = next(iter(programs))
    shas = {v: program_sha256(p, program_path) for v, p in programs.items()}
    run_settings = {
        # the number of ads is left out: a compile with a larger budget extends this one
        v: settings.record(config=asdict(p.config), gate={"seed": gate.seed}, program_sha256=shas[v])
        for v, p in programs.items()
    }
    with ExitStack() as stack:
        runs = {v: stack.enter_context(RunDir(out.with_name(out.name + ".gate") / v)) for v in programs}
        for v, run in runs.items():
            run.check_settings(run_settings[v])
        result = compile_gate(prep, ctx, programs, runs, captions, gate, run_settings, progress)
    chosen = result.pop("chosen")
    name = chosen["variant"] if chosen["variant"] in programs else seed_name
    program, chosen_gate = programs[name], chosen["gate"]
    program.gate = chosen_gate.record()
    program.save(str(program_path))
    manifest = {
        "shape": "edit",
        "method": METHOD,
        "program": program_path.name,
        "sha256": file_sha256(program_path),
        "seed_sha256": shas[seed_name],
        "optimizer": "reflection-free search: prompt variants x gate read-outs on held-out retired ads "
        "(fit / select / report thirds)",
        "chosen": {"variant": chosen["variant"], "readout": chosen["readout"]},
        "gamma": round(float(chosen_gate.gamma.mean()), 6),  # the mean; the gate holds one per feature
        "gate": chosen_gate.record(),
        "calibrate": ctx.calibrate,
        "units": ctx.units.round(6).tolist(),
        "lm_adds_nothing": chosen_gate.is_zero,
        "validation": result,
        "settings": run_settings[name],
        "lm": lm_description,
        "prior": {
            "inputs": ctx.prior.inputs,
            "alpha": ctx.prior.alpha,
            "retired_validation_auc": ctx.validation,
        },
        "git": git_commit(),
        "versions": versions(),
        "written": now(),
    }
    write_json_atomic(manifest_path(program_path), manifest)
    write_bytes_atomic(search_log_path(program_path), search_log(manifest).encode())
    return manifest


def search_log_path(program: Path) -> Path:
    return program.with_name(program.stem + ".search.md")


def search_log(man: dict[str, Any]) -> str:
    """The compile's log: every candidate's score on the select third, and the chosen one on the report."""
    v = man["validation"]
    rows = [
        [c["variant"], c["readout"], f"{c['select_auc']:.4f}", f"{c['mean_gamma']:.3f}"]
        for c in v["candidates"]
    ]
    return (
        f"# Edit program search: {man['program']}\n\n"
        f"{len(v['fit_ads'])} fit, {len(v['select_ads'])} select and {len(v['report_ads'])} report held-out "
        f"retired ads; {v['lm_calls']} LM calls, {v['metric_calls']} metric calls (a candidate scored on an "
        f"ad), {v['parse_failures']} parse failures, {v['seconds']} s of LM time.\n\n"
        + md_table(["prompt variant", "read-out", "select AUC", "mean gamma"], rows)
        + f"\n\nChosen: {man['chosen']['variant']} / {man['chosen']['readout']}. On the report third: prior "
        f"{v['validation_auc_prior']:.4f}, edited {v['validation_auc_edited']:.4f}"
        + (" (gamma 0: the LM adds nothing; the weights are the prior's)." if man["lm_adds_nothing"] else ".")
        + f"\nSeed program {man['seed_sha256'][:12]}, compiled {man['sha256'][:12]}.\n"
    )


def load_edit_program(
    path: Path, client: ChatClient | None, mode: str | None = None
) -> tuple[EditProgram, dict]:
    """A compiled edit program and its manifest (gamma, settings); one-line errors for anything else."""
    path = Path(path)
    man = read_json(manifest_path(path), "edit program manifest")
    if not isinstance(man, dict) or man.get("shape") != "edit" or "gamma" not in man:
        raise LLMHyperError(f"{manifest_path(path)} is not the manifest of a compiled edit program")
    cfg = EditConfig(**{**man["settings"]["config"], **({"mode": mode} if mode else {})})
    program = EditProgram(cfg, client=client)
    state = read_json(path, "edit program")
    if not isinstance(state, dict) or "edit" not in state:
        raise LLMHyperError(f"{path} is not a saved edit program (no 'edit' predictor)")
    program.load(str(path))
    return program, man


def run_edit(
    prep: Prepared,
    ctx: EditContext,
    program: EditProgram,
    manifest: dict[str, Any],
    ad_ids: list[str],
    out: Path,
    captions: dict[str, str],
    settings: EditRunSettings,
    program_path: Path,
    lm_description: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Label every cold ad (resumable), then write the artifact with the compiled gamma, and the manifest."""
    gamma, calibrate = float(manifest["gamma"]), bool(manifest.get("calibrate", False))
    gate = Gate.from_manifest(manifest, len(ctx.feature_names))
    with RunDir(out) as run:
        run_settings = settings.record(
            program_sha256=file_sha256(program_path), gamma=gamma, calibrate=calibrate
        )
        run.check_settings(run_settings)
        times = run.session_times(resuming=bool(run.records()))
        records = edit_ads(prep, ctx, program, ad_ids, run, run_settings, captions, progress=progress)
        table = edit_table(prep, ctx, records, ad_ids, gate, calibrate)
        if not table.ad_ids:
            raise LLMHyperError(f"no ad got labels in {out}; see the records in {run.records_dir}")
        table.save(run.weights_dir)
        recs = [records[a] for a in table.ad_ids]
        calls = sum(int(r.get("calls", 0)) for r in recs)
        totals = {
            "ads": len(recs),
            "lm_calls": calls,
            "parse_failures": sum(int(r.get("parse_failures", 0)) for r in recs),
            "prompt_tokens": sum(int(r.get("tokens", {}).get("prompt_tokens", 0)) for r in recs),
            "completion_tokens": sum(int(r.get("tokens", {}).get("completion_tokens", 0)) for r in recs),
            "seconds": round(sum(float(r.get("seconds", 0)) for r in recs), 1),
        }
        run.write_manifest(
            {
                "method": METHOD,
                "shape": "edit",
                "settings": run_settings,
                "gamma": gamma,
                "gate": gate.record(),
                "lm_adds_nothing": gate.is_zero,
                "program": str(program_path),
                "program_sha256": file_sha256(program_path),
                "lm": lm_description,
                "prior": {"inputs": ctx.prior.inputs, "alpha": ctx.prior.alpha},
                "git": git_commit(),
                "versions": versions(),
                **times,
                "updated": now(),
                "requested_ads": len(ad_ids),
                "totals": totals,
            }
        )
    return totals
