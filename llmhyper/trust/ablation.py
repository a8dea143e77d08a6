"""Ablations (paper section 4.4): how many demonstrations (0, 3, 5 shots), the image caption, the titles.

Each variant is a `generate()` run into OUT/<variant>/ (a complete, resumable run directory, like
`llmhyper generate` writes), then all variants are scored with `evaluate()` on the same test users and the
same ads, paired against the calibrated kNN prior (knn_cal), into one table (OUT/ablation.json, .md).

What changes and what does not:
- shots s: the program is shown the first s of the retrieved neighbours (s = 0: "(no similar past ads)" and no
  trained weights in the feature lines). Retrieval itself is unchanged, so every variant keeps the same
  calibration target alpha (the mean CTR of the base k neighbours) and the same kNN-prior fill for features
  the LLM fails to answer: only what the LLM sees differs. For s > k, s neighbours are retrieved (and then
  also fill failed features; alpha stays that of the base k).
- no_caption: the image tags are removed from the new ad and from the demonstrations.
- hide_titles: `ProgramConfig.hide_titles` (genres/date/poster only).
This is done by `VariantProgram`, a thin subclass of the program that filters its inputs; no other module
needs to know about the ablation (`prepare` with k = 0 would leave alpha undefined, so shots = 0 is not
done through k).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmhyper.ctr import baselines as bl
from llmhyper.ctr.evaluate import evaluate
from llmhyper.fmt import ci_cell, diff_cell, md_table
from llmhyper.hyper.generate import generate
from llmhyper.hyper.program import LLMHyper, ProgramConfig, load_program
from llmhyper.runs import RunDir
from llmhyper.store import now, write_json_atomic, write_text_atomic
from llmhyper.weights import WeightTable

BAR = "knn_cal"
# settings a reused run must share with the ablation (those present in both configs are compared)
SAME = (
    "dataset",
    "seed",
    "k",
    "encoder",
    "lm",
    "judge_lm",
    "api_base",
    "program_sha256",
    "batch_size",
    "samples",
    "judge",
    "temperature",
    "max_tokens",
)
METRICS = ("ad_auc", "auc", "ndcg10")
HEAD = {"ad_auc": "ad-AUC", "auc": "AUC", "ndcg10": "NDCG@10"}


@dataclass(frozen=True)
class Variant:
    name: str
    shots: int = 3
    caption: bool = True
    hide_titles: bool = False

    def describe(self) -> str:
        return ", ".join(
            [
                f"{self.shots} shots",
                "caption" if self.caption else "no caption",
                "titles hidden" if self.hide_titles else "titles",
            ]
        )


VARIANTS = {
    v.name: v
    for v in (
        Variant("full"),
        Variant("shots0", shots=0),
        Variant("shots5", shots=5),
        Variant("no_caption", caption=False),
        Variant("hide_titles", hide_titles=True),
    )
}


def parse_variants(spec: str | None) -> list[Variant]:
    """ "full,shots0" or custom "name:shots=1:caption=0:titles=0" items."""
    if not spec:
        return list(VARIANTS.values())
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item in VARIANTS:
            out.append(VARIANTS[item])
            continue
        name, *opts = item.split(":")
        kw: dict[str, Any] = {}
        for o in opts:
            k, _, v = o.partition("=")
            if k == "shots":
                try:
                    kw["shots"] = int(v)
                except ValueError:
                    raise ValueError(f"shots must be a whole number in {item!r}") from None
            elif k == "caption":
                kw["caption"] = v not in ("0", "false", "no")
            elif k == "titles":
                kw["hide_titles"] = v in ("0", "false", "no", "hidden")
            else:
                raise ValueError(f"unknown variant option {k!r} in {item!r} (shots=, caption=, titles=)")
        if not opts:
            raise ValueError(f"unknown variant {item!r}: use {', '.join(VARIANTS)} or name:shots=N:caption=0")
        out.append(Variant(name, **kw))
    if len({v.name for v in out}) != len(out):
        raise ValueError("duplicate variant names")
    return out


class VariantProgram(LLMHyper):
    """The program, shown only the first `shots` demonstrations and (without `caption`) no image tags."""

    def __init__(
        self, config: ProgramConfig | None = None, judge_lm: Any = None, shots: int = 3, caption: bool = True
    ):
        super().__init__(config, judge_lm=judge_lm)
        self.shots, self.caption = shots, caption

    def forward(self, ad, examples, features):
        examples = list(examples)[: self.shots]
        if not self.caption:
            ad = {**ad, "caption": None}
            examples = [{**ex, "caption": None} for ex in examples]
        return super().forward(ad, examples, features)


def variant_program(
    variant: Variant,
    config: ProgramConfig | None = None,
    program_path: str | Path | None = None,
    judge_lm: Any = None,
) -> VariantProgram:
    """The LLM-HYPER program with the variant's inputs (a compiled program's state loads as usual)."""
    cfg = dataclasses.replace(config or ProgramConfig(), hide_titles=variant.hide_titles)
    program = VariantProgram(cfg, judge_lm, variant.shots, variant.caption)
    if program_path is not None:  # load_program checks the file before its state is taken over
        program.load_state(load_program(program_path, cfg).dump_state())
    return program


def base_prepared(prep, k: int):
    """`prep` (retrieved with k' >= k neighbours) seen as a k-neighbour preparation: alpha from the
    first k."""
    nb = {a: list(n[:k]) for a, n in prep.neighbours.items()}
    alphas = {a: prep.alpha_for(n) for a, n in nb.items()}
    return dataclasses.replace(prep, neighbours=nb, alphas=alphas, k=k)


def variant_prepared(prep, variant: Variant, base):
    """Neighbours max(k, shots) (the program shows `shots` of them), alpha always the base one."""
    k = max(base.k, variant.shots)
    if k == base.k:
        return base
    nb = {a: list(n[:k]) for a, n in prep.neighbours.items()}
    if any(len(n) < k for n in nb.values()):
        raise ValueError(f"variant {variant.name} needs {k} neighbours; prepare with k >= {k}")
    return dataclasses.replace(base, neighbours=nb, k=k)


def check_reuse(run_dir: Path, variant: Variant, config: dict[str, Any]) -> None:
    """A run reused as a variant must have been made with the ablation's settings and the variant's inputs (a
    plain generate run counts as k shots with the caption)."""
    run = RunDir(run_dir)
    if not run.weights_dir.exists():
        raise ValueError(f"{run_dir} is not a generate run (no weights/ folder)")
    old = run.settings()
    if old is None:
        return
    diff = {k: (old[k], config[k]) for k in SAME if k in old and k in config and old[k] != config[k]}
    if bool(old.get("hide_titles", False)) != variant.hide_titles:
        diff["hide_titles"] = (old.get("hide_titles", False), variant.hide_titles)
    v = old.get("variant")
    shown = (v["shots"], v["caption"]) if v else (old.get("k", 3), True)
    if shown != (variant.shots, variant.caption):
        diff["shots, caption"] = (shown, (variant.shots, variant.caption))
    if diff:
        raise ValueError(f"{run_dir} cannot stand for variant {variant.name}: settings differ {diff}")


def run_ablation(
    prep,
    encoder,
    lm_handle,
    judge_handle,
    ad_ids: list[str],
    out: str | Path,
    config: dict[str, Any],
    *,
    variants: list[Variant] | None = None,
    base_k: int = 3,
    program_config: ProgramConfig | None = None,
    program_path: str | Path | None = None,
    reuse: dict[str, str | Path] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate every variant (resumable) and evaluate them together. `prep` must be retrieved with
    k >= max(base_k, shots of every variant). `reuse`: variant name -> an existing generate run directory
    made with the same settings (e.g. the main run as "full"): its weights are used, nothing is generated."""
    out = Path(out)
    variants = variants or list(VARIANTS.values())
    reuse = {k: Path(v) for k, v in (reuse or {}).items()}
    unknown = set(reuse) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"--reuse names variants that are not run: {sorted(unknown)}")
    base = base_prepared(prep, base_k)
    judge_lm = judge_handle.lm if judge_handle is not lm_handle else None
    runs: dict[str, dict[str, Any]] = {}
    tables: dict[str, WeightTable] = {}
    with RunDir(out):  # one ablation at a time in OUT; each variant's run folder has its own lock
        for v in variants:
            if v.name in reuse:
                run_dir = reuse[v.name]
                check_reuse(run_dir, v, config)
                totals = RunDir(run_dir).manifest().get("totals", {})
            else:
                run_dir = out / v.name
                cfg = {
                    **config,
                    "variant": dataclasses.asdict(v),
                    "base_k": base_k,
                    "hide_titles": v.hide_titles,
                }
                program = variant_program(v, program_config, program_path, judge_lm)
                if progress:
                    print(f"llmhyper: ablation variant {v.name} ({v.describe()}) -> {run_dir}")
                # generate guards the variant's settings (a rerun with others is refused) and resumes it
                totals = generate(
                    variant_prepared(prep, v, base),
                    encoder,
                    program,
                    lm_handle,
                    judge_handle,
                    ad_ids,
                    run_dir,
                    cfg,
                    progress=progress,
                    force=force,
                )
            table = WeightTable.load(RunDir(run_dir).weights_dir)
            tables[v.name] = table
            runs[v.name] = {
                "variant": dataclasses.asdict(v),
                "describe": v.describe(),
                "run": str(run_dir),
                "reused": v.name in reuse,
                "totals": totals,
                "ads": len(table.ad_ids),
            }
        common = [a for a in ad_ids if all(a in set(t.ad_ids) for t in tables.values())]
        if not common:
            raise ValueError("no ad has weights in every variant (all failed?)")
        cold = list(prep.data.cold_ads)
        knn = bl.knn_prior(base.retired, base.neighbours, cold)
        methods: dict[str, Any] = {
            "lr_cold": bl.lr_cold(base.retired, cold),
            BAR: bl.calibrated(knn, base.X_cal, base.alphas, BAR),
        }
        if all(a in set(base.lr_warm.ad_ids) for a in common):
            methods["lr_warm"] = base.lr_warm
        methods.update(tables)
        result = evaluate(
            base, methods, ad_ids=common, n_boot=n_boot, seed=seed, challengers=list(tables), bar=BAR
        )
        summary = {
            "study": "ablation",
            "updated": now(),
            "base_k": base_k,
            "variants": runs,
            "config": config,
            "evaluation": result,
        }
        write_json_atomic(out / "ablation.json", summary)
        write_text_atomic(out / "ablation.md", ablation_markdown(summary) + "\n")
    return summary


SETTING = {
    "knn_cal": "kNN prior, normalised + calibrated (the bar)",
    "lr_warm": "trained on clicks (upper bound)",
}


def ablation_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    res = summary["evaluation"]
    head = (
        ["method", "setting", "ads ok"]
        + [HEAD[m] for m in METRICS]
        + [f"Δ{HEAD[m]} vs {BAR} (p)" for m in METRICS]
    )
    key = f"vs_{BAR}"
    rows = []
    for name, row in res["methods"].items():
        if name == "lr_cold":
            continue
        v = summary["variants"].get(name)
        setting = v["describe"] if v else SETTING.get(name, "")
        diffs = [diff_cell(row[key][m]) if key in row else "—" for m in METRICS]
        cells = [ci_cell(row[m]) for m in METRICS]
        rows.append([name, setting, str(v["ads"]) if v else "—", *cells, *diffs])
    return head, rows


def ablation_markdown(summary: dict[str, Any]) -> str:
    res = summary["evaluation"]
    return "\n".join(
        [
            md_table(*ablation_rows(summary)),
            "",
            f"{res['dataset']}: {res['n_test_users']} test users x {res['n_ads']} cold ads (those every "
            f"variant has weights for); 95% intervals from {res['n_boot']} paired bootstrap resamples of "
            f"users; Δ = variant minus {BAR}, paired. Calibration target alpha from the {summary['base_k']} "
            "nearest retired ads in every variant.",
        ]
    )
