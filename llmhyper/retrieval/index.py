"""Nearest warm ads: a faiss inner-product index over unit ad embeddings (= cosine similarity).

`AdIndex` holds the embeddings of the retired (warm) ads with their ids. An ad never retrieves
itself: `search(..., exclude_ids=...)` / `search_ids` over-fetch and drop the excluded ids. Saved
without pickle as `ads.faiss` (faiss.write_index) + `ads.json` (ids, encoder name, dim).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmhyper.errors import DataError, LLMHyperError

INDEX_NAME, META_NAME = "ads.faiss", "ads.json"


class AdIndexError(LLMHyperError, ValueError):
    """Misuse of an AdIndex: empty index, wrong dimension, duplicate ids, bad k."""


@dataclass(frozen=True)
class Neighbour:
    ad_id: str
    similarity: float


def _unit_rows(vectors: Any, what: str) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise AdIndexError(f"{what}: expected a 2-d array (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AdIndexError(f"{what}: vectors contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class AdIndex:
    """Exact cosine search (faiss IndexFlatIP over L2-normalised vectors) over warm ads."""

    def __init__(self, encoder_name: str | None = None):
        self.encoder_name = encoder_name
        self.ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._index = None
        self.dim: int | None = None

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_vectors(cls, ids: Sequence[Any], vectors: Any, encoder_name: str | None = None) -> AdIndex:
        return cls(encoder_name).build(ids, vectors)

    def build(self, ids: Sequence[Any], vectors: Any) -> AdIndex:
        """(Re)build from ids and (n, dim) vectors (normalised here, so cosine = inner product)."""
        faiss = _faiss()
        ids = [str(i) for i in ids]
        x = _unit_rows(vectors, "AdIndex.build")
        if len(ids) != x.shape[0]:
            raise AdIndexError(f"AdIndex.build: {len(ids)} ids but {x.shape[0]} vectors")
        if not ids:
            raise AdIndexError("AdIndex.build: no ads to index (the warm set is empty)")
        dup = sorted(a for a, c in Counter(ids).items() if c > 1)
        if dup:
            raise AdIndexError(f"AdIndex.build: duplicate ad ids {dup[:5]}")
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        self._index, self.dim, self.ids = index, int(x.shape[1]), ids
        self._pos = {a: i for i, a in enumerate(ids)}
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, ad_id: object) -> bool:
        return str(ad_id) in self._pos

    def vector(self, ad_id: Any) -> np.ndarray:
        """The stored (unit) vector of an indexed ad."""
        self._require_built()
        try:
            return self._index.reconstruct(self._pos[str(ad_id)])
        except KeyError:
            raise KeyError(f"ad {ad_id!r} is not in the index") from None

    # -- searching --------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if self._index is None or not self.ids:
            raise AdIndexError("the ad index is empty: build() it from the warm ads first")

    def search(
        self, vectors: Any, k: int, exclude_ids: Sequence[Any] | Sequence[Iterable[Any]] | None = None
    ) -> list[list[Neighbour]]:
        """The k most similar indexed ads for each query vector, most similar first.

        `exclude_ids` is either one collection of ids excluded for every query, or one collection per
        query (a list of lists/sets, same length as `vectors`); excluded ads never appear. Fewer than
        k neighbours come back only when the index holds fewer than k eligible ads.
        """
        self._require_built()
        if int(k) < 1:
            raise AdIndexError(f"k must be at least 1, got {k}")
        k = int(k)
        q = _unit_rows(vectors, "AdIndex.search")
        if q.shape[1] != self.dim:
            raise AdIndexError(
                f"query vectors have dimension {q.shape[1]} but the index holds {self.dim}-d "
                f"vectors (encoder {self.encoder_name or 'unknown'}): embed queries with the "
                "same encoder"
            )
        per_query = _per_query_exclusions(exclude_ids, q.shape[0])
        # over-fetch by the number of excluded ids that are actually in the index
        extra = max((sum(1 for e in ex if e in self._pos) for ex in per_query), default=0)
        fetch = min(len(self.ids), k + extra)
        sims, rows = self._index.search(q, fetch)
        out: list[list[Neighbour]] = []
        for qi in range(q.shape[0]):
            ex = per_query[qi]
            hits: list[Neighbour] = []
            for s, r in zip(sims[qi], rows[qi]):
                if r < 0:
                    continue
                ad = self.ids[r]
                if ad in ex:
                    continue
                hits.append(Neighbour(ad, float(s)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search_ids(self, query_ids: Sequence[Any], query_vectors: Any, k: int) -> list[list[Neighbour]]:
        """`search` where each query ad's own id is excluded (an ad never retrieves itself)."""
        query_ids = [str(i) for i in query_ids]
        q = np.asarray(query_vectors, dtype=np.float32)
        n = 1 if q.ndim == 1 else q.shape[0]
        if len(query_ids) != n:
            raise AdIndexError(f"search_ids: {len(query_ids)} ids but {n} query vectors")
        return self.search(q, k, exclude_ids=[{i} for i in query_ids])

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write `ads.faiss` and `ads.json` under `directory` (created); returns the directory."""
        self._require_built()
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:8]
        tmp_index, tmp_meta = d / f".{INDEX_NAME}.{token}.tmp", d / f".{META_NAME}.{token}.tmp"
        faiss.write_index(self._index, str(tmp_index))
        meta = {
            "version": 1,
            "encoder": self.encoder_name,
            "dim": self.dim,
            "metric": "cosine",
            "ids": self.ids,
        }
        tmp_meta.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp_index, d / INDEX_NAME)
        os.replace(tmp_meta, d / META_NAME)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder_name: str | None = None) -> AdIndex:
        """Read an index written by `save`. With `encoder_name`, refuse an index built by another encoder."""
        faiss = _faiss()
        d = Path(directory)
        index_path, meta_path = d / INDEX_NAME, d / META_NAME
        for p in (index_path, meta_path):
            if not p.is_file():
                raise DataError("ad index file not found", file=str(p))
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            ids = [str(i) for i in meta["ids"]]
            dim = int(meta["dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"not a valid ad index description ({exc})", file=str(meta_path)) from exc
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise DataError(
                f"cannot read the faiss index ({str(exc).strip().splitlines()[-1]})", file=str(index_path)
            ) from exc
        if index.ntotal != len(ids) or index.d != dim:
            raise DataError(
                f"index holds {index.ntotal} vectors of dim {index.d} but {META_NAME} lists "
                f"{len(ids)} ids of dim {dim}",
                file=str(index_path),
            )
        stored = meta.get("encoder")
        if encoder_name is not None and stored is not None and stored != encoder_name:
            raise DataError(
                f"index was built with encoder '{stored}', not '{encoder_name}'", file=str(meta_path)
            )
        self = cls(stored)
        self._index, self.dim, self.ids = index, dim, ids
        self._pos = {a: i for i, a in enumerate(ids)}
        return self

    # -- DSPy / GEPA deep-copy programs; the index is read-only after build, so share it -----------
    def __deepcopy__(self, memo: dict) -> AdIndex:
        return self

    def __repr__(self) -> str:
        return f"AdIndex(n={len(self.ids)}, dim={self.dim}, encoder={self.encoder_name!r})"


def _per_query_exclusions(exclude_ids: Any, n: int) -> list[set[str]]:
    if exclude_ids is None:
        return [set() for _ in range(n)]
    if isinstance(exclude_ids, (str, bytes, int)):
        exclude_ids = [exclude_ids]
    items = list(exclude_ids)
    nested = bool(items) and all(isinstance(e, (list, tuple, set, frozenset)) for e in items)
    if nested:
        if len(items) != n:
            raise AdIndexError(f"exclude_ids has {len(items)} per-query entries but there are {n} queries")
        return [{str(a) for a in e} for e in items]
    shared = {str(a) for a in items}
    return [shared for _ in range(n)]


def _faiss():
    import faiss  # a core dependency

    return faiss
