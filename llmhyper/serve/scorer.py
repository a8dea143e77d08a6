"""Serving-side scorer: many users x many ads, vectorised, from one or two weight artifacts.

    p(user, ad) = sigmoid(theta_ad . x_user + b_ad)

`Scorer.from_dirs(generated=DIR, trained=DIR or None)` loads the LLM-written artifact and, optionally,
an artifact of trained per-ad models (e.g. `lr_warm`). An ad that has trained weights is served from
them ("hand-over": trained wins, `source` says which one an ad uses); the catalogue is the generated
ads (plus trained-only ads with `catalog="union"`).

Everything a request needs lives in one immutable `Snapshot` (read-only float32 arrays): `theta` as a
C-contiguous (features x ads) matrix, intercepts, per-ad sources and the judge's flags. `reload()`
builds a new snapshot from the directories and swaps the reference atomically; a caller that took
`scorer.snapshot` keeps a consistent view for as long as it holds it.

Judge flags (paper, appendix C.2): the judge may call the pairing of an ad with a feature improper
(e.g. an adult ad and a feature describing children). The scorer then never shows that ad to a user
whose standardised value of that feature is strong, |x_f| >= `flag_threshold`. Flags are a policy on
the (ad, feature) pair, so they keep applying after the ad is handed over to trained weights; flags of
both artifacts are merged.

User features are the standardised features of the artifact, in its `feature_names` order. Arrays are
trusted to be in that order (pass `feature_names=` to have it checked); `vectorize` builds a row from
a {name: value} mapping or a list and checks names, length and finiteness; with `raw=True` it z-scores
raw values with the artifact's `meta["feature_scaling"]` (`Snapshot.scaling`; see data/scaling.py).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import LLMHyperError
from llmhyper.serve.artifact import read_artifact
from llmhyper.serve.snapshot import (  # noqa: F401  (re-exported: the scorer's public names)
    GENERATED,
    NO_SCALING,
    TRAINED,
    FeatureError,
    Snapshot,
)
from llmhyper.weights import WeightTable


# ---------------------------------------------------------------------------------------------
# the scorer: directories + the current snapshot
# ---------------------------------------------------------------------------------------------
class Scorer:
    """Serves the current `Snapshot`; `reload()` re-reads the directories and swaps atomically.

    Methods read `self.snapshot` once per call, so a call never mixes two snapshots. Concurrent
    `reload()` calls are serialised; a failing reload raises and leaves the current snapshot in place.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        generated: str | Path | None = None,
        trained: str | Path | None = None,
        feature_names: Sequence[str] | None = None,
        catalog: str = GENERATED,
    ):
        self._snapshot = snapshot
        self._dirs = (
            None if generated is None else Path(generated),
            None if trained is None else Path(trained),
        )
        self._expected = None if feature_names is None else [str(f) for f in feature_names]
        self._catalog = catalog
        self._lock = threading.Lock()
        self.reloads = 0

    @classmethod
    def from_tables(
        cls,
        generated: WeightTable,
        trained: WeightTable | None = None,
        *,
        flag_threshold: float = 1.0,
        catalog: str = GENERATED,
    ) -> Scorer:
        return cls(
            Snapshot.build(generated, trained, flag_threshold=flag_threshold, catalog=catalog),
            catalog=catalog,
        )

    @classmethod
    def from_dirs(
        cls,
        generated: str | Path,
        trained: str | Path | None = None,
        flag_threshold: float = 1.0,
        *,
        feature_names: Sequence[str] | None = None,
        catalog: str = GENERATED,
    ) -> Scorer:
        """Load `generated` (e.g. RUN/weights) and optionally `trained`. With `feature_names`, the
        artifact's feature order must be exactly that (FeatureError otherwise)."""
        snap = cls._load(
            Path(generated),
            None if trained is None else Path(trained),
            flag_threshold,
            feature_names,
            catalog,
        )
        return cls(snap, generated=generated, trained=trained, feature_names=feature_names, catalog=catalog)

    @staticmethod
    def _load(
        generated: Path,
        trained: Path | None,
        flag_threshold: float,
        feature_names: Sequence[str] | None,
        catalog: str,
    ) -> Snapshot:
        gen, gh = read_artifact(generated)
        tr, th = read_artifact(trained) if trained is not None else (None, "")
        version = hashlib.sha256(f"{gh}:{th}:{flag_threshold}:{catalog}".encode()).hexdigest()[:12]
        snap = Snapshot.build(
            gen,
            tr,
            flag_threshold=flag_threshold,
            catalog=catalog,
            version=version,
            paths={GENERATED: str(generated), TRAINED: None if trained is None else str(trained)},
        )
        if feature_names is not None:
            snap.check_feature_names(feature_names)
        return snap

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def dirs(self) -> tuple[Path | None, Path | None]:
        """The (generated, trained) artifact folders this scorer reloads from."""
        return self._dirs

    def swap(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from now on (the feedback worker's refits); same features required."""
        if snapshot.feature_names != self._snapshot.feature_names:
            raise FeatureError("a swapped-in snapshot must have the served features")
        with self._lock:
            self._snapshot = snapshot

    def reload(self) -> Snapshot:
        """Re-read the artifact directories and swap in the new snapshot (same flag threshold)."""
        gen, tr = self._dirs
        if gen is None:
            raise LLMHyperError("this scorer was not loaded from directories; nothing to reload")
        with self._lock:
            snap = self._load(gen, tr, self._snapshot.flag_threshold, self._expected, self._catalog)
            if self._expected is None and snap.feature_names != self._snapshot.feature_names:
                raise FeatureError(
                    "the reloaded artifact has other features (or another order) than the one "
                    "being served; restart the service to change features"
                )
            self._snapshot = snap  # one reference assignment: atomic for readers
            self.reloads += 1
            return snap

    # -- delegation (each call uses one snapshot) ---------------------------------------------
    @property
    def ad_ids(self) -> tuple[str, ...]:
        return self._snapshot.ad_ids

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._snapshot.feature_names

    def scores(self, X: Any, feature_names: Sequence[str] | None = None) -> np.ndarray:
        return self._snapshot.scores(X, feature_names)

    def allowed(self, X: Any, feature_names: Sequence[str] | None = None) -> np.ndarray:
        return self._snapshot.allowed(X, feature_names)

    def rank(
        self, X: Any, k: int = 10, feature_names: Sequence[str] | None = None
    ) -> list[list[tuple[str, float]]]:
        return self._snapshot.rank(X, k, feature_names)

    def source_of(self, ad_id: str) -> str:
        return self._snapshot.source_of(ad_id)

    def vectorize(self, features: Mapping[str, Any] | Sequence[Any], *, raw: bool = False) -> np.ndarray:
        return self._snapshot.vectorize(features, raw=raw)
