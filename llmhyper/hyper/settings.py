"""What a generate run is made with: `GenerateSettings` (typed; the command line builds it) and the record a
run keeps of them in config.json, compared on resume."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmhyper.ctr.prepare import DEFAULT_ENCODER
from llmhyper.data import CTRData, DataSettings
from llmhyper.errors import LLMHyperError
from llmhyper.hyper.program import DEFAULT_PROGRAM, ProgramConfig
from llmhyper.llm.settings import EMBEDDED, LMSettings
from llmhyper.paths import repo_relative
from llmhyper.store import file_sha256


@dataclass(frozen=True)
class GenerateSettings:
    """Everything `run_generate` needs; the command line builds it (nothing here sees argparse)."""

    out: Path
    data: DataSettings = field(default_factory=DataSettings)
    k: int = 3
    encoder: str = DEFAULT_ENCODER
    lm: LMSettings = field(default_factory=LMSettings)
    judge_lm: LMSettings | None = None  # None: the judge runs on `lm`
    program: Path | None = None  # None: DEFAULT_PROGRAM when it exists, else the signatures' own text
    batch_size: int = 10
    samples: int = 1
    judge: bool = True
    hide_titles: bool = False
    vision: bool = False  # the LM sees images: each ad's image goes into the prompt
    limit: int | None = None  # only the first N ads
    ads: tuple[str, ...] | None = None  # these ads (default: the data set's cold ads)
    force: bool = False  # continue a folder made with other settings
    # how the ads are run (none of these changes a record, so a resume may change them)
    workers: int = 1  # ads in flight at once (threads; with `ray`, in Ray actors)
    ad_retries: int = 2  # reruns of an ad whose LM call failed with a transient error after DSPy's retries
    retry_wait: float = 2.0  # seconds before the first such rerun, doubling (capped), unless the server says
    ray: bool = False  # the per-ad work as Ray actors (pip extra "ray")
    ray_address: str | None = None  # None: a local Ray; "auto" / "ray://HOST:10001": a cluster

    def validate(self) -> GenerateSettings:
        """One-line errors for settings that cannot make a run, before anything is read or loaded."""
        for name in ("k", "batch_size", "samples"):
            _whole(name, getattr(self, name))
        if self.limit is not None:
            _whole("limit", self.limit)
        _whole("workers", self.workers)
        if isinstance(self.ad_retries, bool) or not isinstance(self.ad_retries, int) or self.ad_retries < 0:
            raise LLMHyperError(f"ad_retries must be a whole number >= 0, got {self.ad_retries!r}")
        wait = self.retry_wait
        if (
            isinstance(wait, bool)
            or not isinstance(wait, (int, float))
            or not math.isfinite(wait)
            or wait < 0
        ):
            raise LLMHyperError(f"retry_wait must be a finite number of seconds >= 0, got {wait!r}")
        if self.ray_address is not None and not self.ray:
            raise LLMHyperError("--ray-address is only for --ray")
        if self.ads is not None:
            if isinstance(self.ads, str) or not self.ads:
                raise LLMHyperError(
                    "--ads names no ad; give comma-separated ad ids, or leave it out for all cold ads"
                )
            if any(not isinstance(a, str) or not a.strip() for a in self.ads):
                raise LLMHyperError(f"--ads holds an empty ad id: {list(self.ads)[:5]}")
        self.lm.validate()
        if self.judge_lm is not None:
            self.judge_lm.validate()
        self.program_config()
        return self

    def program_config(self) -> ProgramConfig:
        return ProgramConfig(
            batch_size=self.batch_size,
            n_samples=self.samples,
            use_judge=self.judge,
            hide_titles=self.hide_titles,
            vision=self.vision,
        )

    def program_path(self) -> Path | None:
        if self.program is not None:
            return Path(self.program).expanduser().resolve()
        return DEFAULT_PROGRAM if DEFAULT_PROGRAM.exists() else None

    @property
    def judge_settings(self) -> LMSettings:
        return self.judge_lm if self.judge_lm is not None else self.lm


def _whole(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LLMHyperError(f"{name} must be a whole number >= 1, got {value!r}")


def data_fingerprint(data: CTRData) -> str:
    """A short hash of the feature names and all ad ids: a changed data folder is refused on resume."""
    ident = json.dumps({"features": data.feature_names, "ads": [a.id for a in data.ads]})
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]


def run_settings(settings: GenerateSettings, data: CTRData | None = None) -> dict[str, Any]:
    """What a run records in config.json and compares on resume. The program counts by its SHA-256 (its
    path may differ between checkouts); a data folder by its resolved path (relative or absolute, the same
    folder); the data by its fingerprint."""
    program = settings.program_path()
    folder = settings.data.folder
    lm, judge = settings.lm, settings.judge_settings
    out: dict[str, Any] = {
        "dataset": str(Path(folder).expanduser().resolve()) if folder is not None else settings.data.dataset,
        "seed": settings.data.seed,
        "k": settings.k,
        "encoder": settings.encoder,
        "lm": lm.spec,
        "judge_lm": judge.spec,
        "api_base": lm.api_base,
        "program": repo_relative(program) if program else None,
        "program_sha256": file_sha256(program) if program and program.is_file() else None,
        "batch_size": settings.batch_size,
        "samples": settings.samples,
        "judge": settings.judge,
        "hide_titles": settings.hide_titles,
        "temperature": lm.temperature,
        "max_tokens": lm.max_tokens,
        "frequency_penalty": lm.penalty,
    }
    if lm.seed is not None:
        out["lm_seed"] = lm.seed
    if settings.vision:  # recorded only when on, so runs made before the option still resume
        out["vision"] = True
    if judge is not lm:
        out["judge_lm_settings"] = judge.record()
    if data is not None:
        out["data_fingerprint"] = data_fingerprint(data)
    return out


def judge_settings_for(lm: LMSettings, judge_spec: str | None) -> LMSettings | None:
    """The judge's LM for `--judge-lm SPEC`: the same settings on another model (None: the judge runs on
    `lm`). An embedded judge takes no --api-base."""
    if not judge_spec or judge_spec == lm.spec:
        return None
    return replace(lm, spec=judge_spec, api_base=None if judge_spec == EMBEDDED else lm.api_base)
