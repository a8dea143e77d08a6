"""Data: the contract for your own folders, MovieLens-100k, and the synthetic world, behind one loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmhyper.data import movielens
from llmhyper.data.contract import CTRData, load_folder
from llmhyper.data.synthetic import generate_synthetic
from llmhyper.errors import LLMHyperError

# synthetic-unseen: cold ads on topics no retired ad covers (only the text can tell)
DATASETS = ("movielens-100k", "synthetic", "synthetic-unseen")


@dataclass(frozen=True)
class SyntheticSettings:
    n_users: int = 400
    n_warm: int = 60
    n_cold: int = 12


@dataclass(frozen=True)
class DataSettings:
    """Which data a command works on: a named data set, or a folder of your own (`folder` wins)."""

    dataset: str = "movielens-100k"
    folder: Path | None = None
    posters: str | None = None  # MovieLens poster folder; None = ../shared/data/ml100k-posters if present
    seed: int = 0
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)

    @property
    def name(self) -> str:
        return str(self.folder) if self.folder is not None else self.dataset


def load_dataset(settings: DataSettings) -> CTRData:
    if settings.folder is not None:
        folder = Path(settings.folder)
        if not folder.is_dir():
            raise LLMHyperError(
                f"data folder not found: {folder}"
                if not folder.exists()
                else f"--data must be a folder of tables, {folder} is a file"
            )
        return load_folder(folder, seed=settings.seed)
    if settings.dataset == "movielens-100k":
        return movielens.build(posters=settings.posters or "auto", seed=settings.seed)
    if settings.dataset in ("synthetic", "synthetic-unseen"):
        s = settings.synthetic
        return generate_synthetic(
            n_users=s.n_users,
            n_warm=s.n_warm,
            n_cold=s.n_cold,
            seed=settings.seed,
            unseen_topics=settings.dataset == "synthetic-unseen",
        ).data
    raise LLMHyperError(f"unknown dataset '{settings.dataset}' (use {' or '.join(DATASETS)}, or --data DIR)")


__all__ = ["CTRData", "DATASETS", "DataSettings", "SyntheticSettings", "load_dataset"]
