"""The evolution log of a compile, read back: candidates, Pareto front, iterations and events from
`programs/NAME.evolution/` (written by `optimize.recorder`; no GEPA pickle needed) and the manifest when
present, plus what the review shows of it: the lineage, the best score so far, instruction diffs.
`report.evolution` renders it as text and as one HTML page (`llmhyper evolution`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.store import read_json, read_jsonl


@dataclass
class Evolution:
    name: str
    folder: Path
    candidates: list[dict[str, Any]]
    best: int | None
    val_ads: list[str]
    train_ads: list[str]
    pareto: dict[str, Any] = field(default_factory=dict)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    def by_id(self, idx: int) -> dict[str, Any]:
        for c in self.candidates:
            if c["id"] == idx:
                return c
        raise LLMHyperError(
            f"no candidate {idx} (there are {len(self.candidates)}: {[c['id'] for c in self.candidates]})"
        )

    def children(self) -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {c["id"]: [] for c in self.candidates}
        for c in self.candidates:
            if c.get("parents"):
                kids.setdefault(c["parents"][0], []).append(c["id"])
        return kids

    def roots(self) -> list[int]:
        """Candidates without a (known) parent: the starting program, and any whose parent is missing."""
        kids = self.children()
        return [c["id"] for c in self.candidates if not c.get("parents") or c["parents"][0] not in kids]

    @property
    def front(self) -> set[int]:
        return set(self.pareto.get("front") or [])


def origin(c: dict[str, Any]) -> str:
    """How a candidate came about: "seed", "merge of 2 + 3" or "changed <predictors>"."""
    if not c.get("parents"):
        return "seed"
    if len(c["parents"]) > 1:
        return f"merge of {' + '.join(map(str, c['parents']))}"
    return f"changed {', '.join(c.get('changed') or []) or 'nothing'}"


# -- reading -------------------------------------------------------------------------------------------


def resolve_folder(path: str | Path) -> Path:
    """programs/NAME, programs/NAME.json, programs/NAME.manifest.json or programs/NAME.evolution."""
    p = Path(path)
    cands = [p]
    s = str(p).rstrip("/")
    for suffix in (".manifest.json", ".json"):
        if s.endswith(suffix):
            cands.append(Path(s[: -len(suffix)] + ".evolution"))
    if not s.endswith(".evolution"):
        cands.append(Path(s + ".evolution"))
    for c in cands:
        if (c / "candidates.json").is_file():
            return c
    raise DataError(
        "no evolution log here (expected NAME.evolution/candidates.json, written by `llmhyper compile`)",
        file=str(path),
    )


def edit_search_log(path: str | Path) -> Path | None:
    """The log an edit compile wrote (`NAME.search.md`: every candidate it scored) for programs/NAME,
    NAME.json or NAME.manifest.json; None when there is none, or when a GEPA evolution log (NAME.evolution)
    is there too. The edit compile searches prompt variants and gate read-outs instead of evolving
    instructions, so this is its evolution log."""
    s = str(path).rstrip("/")
    for suffix in (".manifest.json", ".json", ".search.md"):
        s = s.removesuffix(suffix)
    log = Path(s + ".search.md")
    return log if log.is_file() and not Path(s + ".evolution").is_dir() else None


def load_evolution(path: str | Path) -> Evolution:
    """The log a compile wrote (`path`: see `resolve_folder`). Lines cut short by a kill are skipped."""
    folder = resolve_folder(path)
    cj = read_json(folder / "candidates.json", "candidates file")
    pareto = read_json(folder / "pareto.json", "Pareto file") if (folder / "pareto.json").exists() else {}
    iterations: dict[int, dict[str, Any]] = {}
    # a replayed iteration (after a kill) keeps its last record
    for rec in read_jsonl(folder / "iterations.jsonl"):
        iterations[int(rec.get("iteration", -1))] = rec
    name = folder.name.removesuffix(".evolution")
    manifest_path = folder.parent / f"{name}.manifest.json"
    manifest = read_json(manifest_path, "compile manifest") if manifest_path.exists() else None
    cands = sorted(cj.get("candidates", []), key=lambda c: c["id"])
    return Evolution(
        name,
        folder,
        cands,
        cj.get("best"),
        cj.get("val_ads", []),
        cj.get("train_ads", []),
        pareto,
        [iterations[k] for k in sorted(iterations)],
        read_jsonl(folder / "events.jsonl"),
        manifest,
    )


# -- analysis --------------------------------------------------------------------------------------------


def best_so_far(evo: Evolution) -> list[tuple[int, float, int]]:
    """(metric calls at discovery, best val score so far, candidate that holds it), one point per new best."""
    points: list[tuple[int, float, int]] = []
    best = None
    for c in sorted(evo.candidates, key=lambda c: (c.get("discovered_at_metric_calls") or 0, c["id"])):
        s = c.get("val_score")
        if s is None:
            continue
        if best is None or s > best:
            best = s
            points.append((int(c.get("discovered_at_metric_calls") or 0), float(s), c["id"]))
    return points


def instruction_diff(evo: Evolution, idx: int, parent: int | None = None) -> str:
    """Unified diff (difflib) of each predictor's instructions between a candidate and its parent."""
    cand = evo.by_id(idx)
    parents = [parent] if parent is not None else list(cand.get("parents") or [])
    if not parents:
        return f"candidate {idx} is the starting program (no parent)\n"
    out = []
    for p in parents:
        par = evo.by_id(p)
        for pred in sorted(set(cand["instructions"]) | set(par["instructions"])):
            a = _lines(par["instructions"].get(pred))
            b = _lines(cand["instructions"].get(pred))
            d = list(
                difflib.unified_diff(
                    a, b, fromfile=f"candidate {p} / {pred}", tofile=f"candidate {idx} / {pred}", n=2
                )
            )
            if d:
                out.append("".join(x if x.endswith("\n") else x + "\n" for x in d))
    return "".join(out) or f"candidate {idx} has the same instructions as its parent(s) {parents}\n"


def _lines(text: str | None) -> list[str]:
    text = text or ""
    return (text if text.endswith("\n") or not text else text + "\n").splitlines(keepends=True)
