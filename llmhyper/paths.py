"""Where llmhyper keeps downloaded data, the joined model, and caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout (programs/, results/ live here)
PROGRAMS = REPO / "programs"


def cache_dir() -> Path:
    """$LLMHYPER_CACHE, else $XDG_CACHE_HOME/llmhyper, else ~/.cache/llmhyper (created on demand)."""
    root = os.environ.get("LLMHYPER_CACHE")
    if root:
        path = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "llmhyper"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_dir() -> Path:
    """Where the joined embedded model lives: $LLMHYPER_MODEL_DIR, else `cache_dir()/models`. Apart from
    the cache so that a job with a scratch cache still finds the one verified copy of the model."""
    env = os.environ.get("LLMHYPER_MODEL_DIR")
    path = Path(env) if env else cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_posters_dir() -> Path | None:
    """The team's poster folder (../shared/data/ml100k-posters next to the checkout), if present."""
    env = os.environ.get("LLMHYPER_POSTERS")
    if env:
        return Path(env)
    for cand in (REPO.parent / "shared" / "data" / "ml100k-posters",):
        if (cand / "posters.csv").exists():
            return cand
    return None


def repo_relative(path: str | Path) -> str:
    """A path inside the checkout as a relative one (so committed configs hold no machine's paths)."""
    resolved = Path(path).expanduser().resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return str(resolved)
