"""The on-disk cache of ad embeddings: one `.npy` matrix + a JSON index per encoder, keyed by a hash of each
ad's text and image bytes (so a changed poster is re-encoded); no pickle anywhere."""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmhyper import paths
from llmhyper.errors import DataError
from llmhyper.store import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from llmhyper.retrieval.encoders import Encoder

PathLike = str | Path


def _safe(name: str) -> str:
    """A file-name-safe form of an encoder name, unique per name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60]
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _texts(texts: Sequence[Any]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a list of strings, not one string")
    return ["" if t is None else str(t) for t in texts]


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def _atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


# ---------------------------------------------------------------------------------------------
# on-disk cache of ad embeddings
# ---------------------------------------------------------------------------------------------
def ad_key(text: str | None, image_path: PathLike | None) -> str:
    """sha256 over the ad's text and its image file's bytes (so a changed poster is re-encoded)."""
    h = hashlib.sha256()
    h.update(b"text\0" + ("" if text is None else str(text)).encode("utf-8") + b"\0")
    if image_path is None or str(image_path) == "":
        h.update(b"no-image")
    else:
        p = Path(image_path)
        if not p.is_file():
            raise DataError("image file not found", file=str(image_path))
        h.update(b"image\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class EmbeddingCache:
    """Ad embeddings of one encoder under `directory`: `<encoder>.json` (index: key -> row, plus the
    current matrix file) and `<encoder>-<token>.npy` (the matrix). The JSON is replaced last, so a
    reader never sees an index that does not match its matrix; no pickle anywhere."""

    VERSION = 1

    def __init__(self, directory: PathLike, encoder_name: str, dim: int):
        self.directory = Path(directory)
        self.encoder_name, self.dim = encoder_name, int(dim)
        self._stem = _safe(encoder_name)
        self._index_path = self.directory / f"{self._stem}.json"
        self._rows: dict[str, int] = {}
        self._matrix = np.zeros((0, self.dim), np.float32)
        self._matrix_file: str | None = None
        self._load()

    def _load(self) -> None:
        if not self._index_path.is_file():
            return
        try:
            meta = json.loads(self._index_path.read_text(encoding="utf-8"))
            if meta.get("encoder") != self.encoder_name or int(meta.get("dim", -1)) != self.dim:
                return
            matrix = np.load(self.directory / meta["matrix"], allow_pickle=False)
            keys = list(meta["keys"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # unreadable: start empty, the next put() rewrites it
        if matrix.shape != (len(keys), self.dim):
            return
        self._matrix = matrix.astype(np.float32, copy=False)
        self._rows = {k: i for i, k in enumerate(keys)}
        self._matrix_file = meta["matrix"]

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, (n, dim) vectors with zeros where not found)."""
        found = np.array([k in self._rows for k in keys], dtype=bool)
        out = np.zeros((len(keys), self.dim), np.float32)
        if found.any():
            out[found] = self._matrix[[self._rows[k] for k, f in zip(keys, found) if f]]
        return found, out

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(
                f"cache put: vectors of shape {vectors.shape}, expected ({len(keys)}, {self.dim})"
            )
        new = {}
        for k, v in zip(keys, vectors):
            if k not in self._rows:
                new[k] = v
        if not new:
            return
        start = len(self._rows)
        self._matrix = np.concatenate([self._matrix, np.stack(list(new.values()))])
        for i, k in enumerate(new):
            self._rows[k] = start + i
        self._flush()

    def _flush(self) -> None:
        old = self._matrix_file
        name = f"{self._stem}-{uuid.uuid4().hex[:12]}.npy"
        _atomic_save_npy(self.directory / name, self._matrix)
        keys = sorted(self._rows, key=self._rows.__getitem__)
        meta = {
            "version": self.VERSION,
            "encoder": self.encoder_name,
            "dim": self.dim,
            "matrix": name,
            "keys": keys,
        }
        _atomic_write_text(self._index_path, json.dumps(meta))
        self._matrix_file = name
        if old and old != name:
            try:
                (self.directory / old).unlink()
            except OSError:
                pass


def embed_ads(
    encoder: Encoder,
    ids: Sequence[Any],
    texts: Sequence[str],
    image_paths: Sequence[PathLike | None] | None = None,
    cache_dir: PathLike | None = None,
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> np.ndarray:
    """(n, dim) ad embeddings (`encoder.encode_ads`), reusing and extending an on-disk cache.

    `cache_dir` defaults to `cache_dir()/embeddings`. Ads are keyed by content (text + image bytes),
    not by id, so an edited ad is re-encoded. A tqdm bar is shown when more than 64 ads need encoding
    (`progress=True/False` forces it on/off).
    """
    ids = [str(i) for i in ids]
    texts = _texts(texts)
    image_paths = [None] * len(ids) if image_paths is None else list(image_paths)
    if not (len(ids) == len(texts) == len(image_paths)):
        raise ValueError(f"embed_ads: {len(ids)} ids, {len(texts)} texts, {len(image_paths)} image paths")
    keys = []
    for ad_id, t, p in zip(ids, texts, image_paths):
        try:
            keys.append(ad_key(t, p))
        except DataError as exc:
            raise DataError(f"ad {ad_id}: {exc.reason}", file=exc.file) from exc
    directory = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "embeddings"
    cache = EmbeddingCache(directory, encoder.name, encoder.dim)
    found, out = cache.get(keys)
    todo = [i for i in np.flatnonzero(~found)]
    if todo:
        # identical ads (same key) are encoded once
        first: dict[str, int] = {}
        for i in todo:
            first.setdefault(keys[i], i)
        uniq = list(first.values())
        show = progress if progress is not None else len(uniq) > 64
        bar = None
        if show:
            from tqdm import tqdm  # a core dependency

            bar = tqdm(total=len(uniq), desc=f"encoding ads ({encoder.name})", unit="ad")
        try:
            for start in range(0, len(uniq), batch_size):
                chunk = uniq[start : start + batch_size]
                vecs = encoder.encode_ads([texts[i] for i in chunk], [image_paths[i] for i in chunk])
                # saved per batch: an interrupted run keeps its work
                cache.put([keys[i] for i in chunk], vecs)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        _, out = cache.get(keys)
    return out
