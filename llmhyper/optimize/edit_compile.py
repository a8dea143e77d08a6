"""Compile and run the edit program: the ridge prior as the floor, the LM as a gated editor of it.

`compile_edit` fits the gate (gamma) on held-out retired ads and writes `programs/NAME.json` (the DSPy
state), `NAME.manifest.json` (gamma, validation before/after, calls, seed and compiled SHA-256) and the
run folder of its validation labels `NAME.gate/`. `run_edit` runs a compiled program over cold ads into a
run folder with the usual artifact (`RUN/weights/`, method `llm_edit`) and manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmhyper.ctr.prepare import Prepared
from llmhyper.data import DataSettings
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.edit import EditConfig, EditProgram
from llmhyper.hyper.edit_inputs import EditContext
from llmhyper.hyper.edit_run import METHOD, GateSettings, compile_gate, edit_ads, edit_table
from llmhyper.llm.logprobs import ChatClient
from llmhyper.runs import RunDir
from llmhyper.store import file_sha256, git_commit, now, read_json, versions, write_json_atomic


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


def compile_edit(
    prep: Prepared,
    ctx: EditContext,
    program: EditProgram,
    out: Path,
    captions: dict[str, str],
    settings: EditRunSettings,
    gate: GateSettings,
    lm_description: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the gate on held-out retired ads; write the program, its manifest and its gate run folder."""
    out = Path(out)
    program_path = out.with_suffix(".json")
    seed_path = out.with_name(out.name + ".seed.json")
    program.save(str(seed_path))
    seed_sha = file_sha256(seed_path)
    seed_path.unlink()
    with RunDir(out.with_name(out.name + ".gate")) as run:
        # the number of ads is left out: a compile with a larger budget extends this one
        run_settings = settings.record(gate={"seed": gate.seed}, program_sha256=seed_sha)
        run.check_settings(run_settings)
        result = compile_gate(prep, ctx, program, run, captions, gate, run_settings, progress)
    program.save(str(program_path))
    manifest = {
        "shape": "edit",
        "method": METHOD,
        "program": program_path.name,
        "sha256": file_sha256(program_path),
        "seed_sha256": seed_sha,
        "optimizer": "gate: least-squares gamma on held-out retired ads",
        "gamma": result["gamma"],
        "calibrate": ctx.calibrate,
        "units": ctx.units.round(6).tolist(),
        "lm_adds_nothing": result["gamma"] == 0.0,
        "validation": result,
        "settings": run_settings,
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
    return manifest


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
    with RunDir(out) as run:
        run_settings = settings.record(
            program_sha256=file_sha256(program_path), gamma=gamma, calibrate=calibrate
        )
        run.check_settings(run_settings)
        times = run.session_times(resuming=bool(run.records()))
        records = edit_ads(prep, ctx, program, ad_ids, run, run_settings, captions, progress=progress)
        table = edit_table(prep, ctx, records, ad_ids, gamma, calibrate)
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
                "lm_adds_nothing": gamma == 0.0,
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
