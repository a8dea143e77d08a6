"""What a trust study shares with the generate run it checks. Settings not given are taken from the base run
(its config.json: data set, seed, k, encoder, LM, program and its settings), else from `generate`'s
defaults, so a study runs the same program as the run it checks. The result is a typed `GenerateSettings`;
`LMPool` builds each LM a study needs once and closes them all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmhyper.ctr.prepare import DEFAULT_ENCODER, Prepared, prepare
from llmhyper.data import DATASETS, CTRData, DataSettings
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.generate import GenerateSettings, judge_settings_for
from llmhyper.llm import build as llm_build
from llmhyper.llm.build import LMHandle
from llmhyper.llm.settings import DEFAULT_MAX_TOKENS, DEFAULT_THREADS, EMBEDDED, LMSettings
from llmhyper.paths import PROGRAMS
from llmhyper.retrieval import encoders
from llmhyper.runs import RunDir
from llmhyper.store import file_sha256


@dataclass(frozen=True)
class StudySettings:
    """What the command line gave; None = the base run's setting, else generate's default."""

    dataset: str | None = None
    folder: str | None = None  # your own data folder (--data)
    posters: str | None = None
    seed: int | None = None
    k: int | None = None
    encoder: str | None = None
    lm: str | None = None
    judge_lm: str | None = None
    api_base: str | None = None
    program: str | None = None
    batch_size: int | None = None
    samples: int | None = None
    judge: bool | None = None
    hide_titles: bool | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    threads: int = DEFAULT_THREADS


def base_config(run: str | Path | None) -> dict[str, Any]:
    """The base run's settings ({} without a run)."""
    if not run:
        return {}
    cfg = RunDir(run).settings()
    if cfg is None:
        raise LLMHyperError(f"{run} is not a generate run (no config.json)")
    return cfg


def resolve(given: StudySettings, run: str | Path | None, out: str | Path = ".") -> GenerateSettings:
    """`given`, with every unset setting from the base run, else the default. `out`: the study folder."""
    cfg = base_config(run)

    def pick(name: str, default: Any = None) -> Any:
        return next((v for v in (getattr(given, name), cfg.get(name)) if v is not None), default)

    dataset, folder = given.dataset, given.folder
    if dataset is None and folder is None and cfg.get("dataset"):
        name = str(cfg["dataset"])
        # a run records a named data set by its name, your own folder by its path
        dataset, folder = (name, None) if name in DATASETS or name.startswith("synthetic") else (None, name)
    data = DataSettings(
        dataset=dataset or DataSettings.dataset,
        posters=given.posters,
        seed=pick("seed", 0),
        folder=Path(folder).expanduser().resolve() if folder else None,
    )
    lm = LMSettings(
        spec=pick("lm", EMBEDDED),
        api_base=pick("api_base"),
        n_threads=given.threads,
        temperature=pick("temperature", 0.0),
        max_tokens=pick("max_tokens", DEFAULT_MAX_TOKENS),
    )
    return GenerateSettings(
        out=Path(out),
        data=data,
        k=pick("k", 3),
        encoder=pick("encoder", DEFAULT_ENCODER),
        lm=lm,
        judge_lm=judge_settings_for(lm, pick("judge_lm")),
        program=_program(given.program, cfg),
        batch_size=pick("batch_size", 10),
        samples=pick("samples", 1),
        judge=pick("judge", True),
        hide_titles=bool(pick("hide_titles", False)),
    )


def _program(given: str | None, cfg: dict[str, Any]) -> Path | None:
    """The program file: the one given, else the base run's. A run made in another checkout names a path
    that is not here; the file of the same name and hash in programs/ stands in for it."""
    if given is not None or not cfg.get("program"):
        return Path(given) if given is not None else None
    path = Path(cfg["program"])
    here = PROGRAMS / path.name
    if not path.exists() and here.is_file() and cfg.get("program_sha256") == file_sha256(here):
        return here
    return path


def choose_ads(data: CTRData, ads: list[str] | None = None, limit: int | None = None) -> list[str]:
    """The cold ads a study covers: `ads` (all cold ads when None), the first `limit` of them."""
    ad_ids = list(ads) if ads else list(data.cold_ads)
    unknown = [a for a in ad_ids if a not in set(data.cold_ads)]
    if unknown:
        raise LLMHyperError(f"not cold ads of this data set: {unknown[:5]}")
    return ad_ids[:limit] if limit else ad_ids


def prepare_study(settings: GenerateSettings, data: CTRData, k: int = 0) -> tuple[Any, Prepared]:
    """The encoder and the retrieval of the base run (at least `k` neighbours per ad)."""
    encoder = encoders.get_encoder(settings.encoder)  # looked up here, so a test can swap the module's
    return encoder, prepare(data, encoder=encoder, k=max(settings.k, k), seed=settings.data.seed)


def other_lm(lm: LMSettings, spec: str | None) -> LMSettings:
    """An LM beside the study's main one (judge, rewriter): the same settings on model `spec`."""
    return judge_settings_for(lm, spec) or lm


class LMPool:
    """Builds each distinct LM once (two embedded specs would start two servers) and closes them all."""

    def __init__(self, builder: Callable[[LMSettings], LMHandle] | None = None):
        self.builder = builder or llm_build.build_lm  # looked up here, so a test can swap the module's
        self.handles: dict[LMSettings, LMHandle] = {}

    def get(self, settings: LMSettings) -> LMHandle:
        if settings not in self.handles:
            self.handles[settings] = self.builder(settings)
        return self.handles[settings]

    def close(self) -> None:
        for h in self.handles.values():
            h.close()

    def __enter__(self) -> LMPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
