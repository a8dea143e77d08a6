"""The LM as an encoder: the embedded model's own mean-pooled hidden states of an ad's text.

A small LM that cannot write good weights may still place ads well: its hidden states of
"title. genres, date" carry what it knows about the movie. `LMTextEncoder` is a text-only `Encoder`, so
the embedding cache and the ridge prior take it like any other; the prior keeps it only if cross-validation
on retired ads picks it (`llmhyper evaluate --prior-lm-vectors`). No generation: one short prompt per ad.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from llmhyper.errors import DataError, LLMHyperError
from llmhyper.llm.embedded import _NO_PROXY, EMBEDDED_MODEL, EmbeddedServer
from llmhyper.retrieval.encoders import Encoder

# hidden size of the shipped model (Qwen2.5-1.5B); the cache needs it before any server starts
EMBEDDED_DIM = 1536


class LMTextEncoder(Encoder):
    """Text -> unit vector from the embedded LM's embedding mode (its own llama.cpp server, started on the
    first text that is not already in the embedding cache and closed by `close()`)."""

    def __init__(
        self, model_path: str | PathLike | None = None, *, n_threads: int = 2, dim: int | None = None
    ):
        self.model_path = Path(model_path) if model_path is not None else None
        self.n_threads = n_threads
        if self.model_path is None:
            self.dim = EMBEDDED_DIM
            tag = EMBEDDED_MODEL.sha256[:12]
        elif dim is None:
            raise LLMHyperError(f"LMTextEncoder: give dim= (the hidden size) for the model {self.model_path}")
        else:
            self.dim = dim
            tag = self.model_path.stem
        # the name keys the embedding cache: the model's identity and the pooling
        self.name = f"lm-{tag}-mean"
        self._server: EmbeddedServer | None = None

    def _start(self) -> EmbeddedServer:
        if self._server is None:
            self._server = EmbeddedServer(self.model_path, n_threads=self.n_threads, embedding=True)
        return self._server

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        srv = self._start()
        req = urllib.request.Request(
            srv.base_url + "/embeddings",
            data=json.dumps({"input": texts, "encoding_format": "float"}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {srv.api_key}"},
        )
        with _NO_PROXY.open(req, timeout=600) as resp:
            reply = json.loads(resp.read())
        rows = sorted(reply["data"], key=lambda r: r["index"])
        out = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        if out.shape != (len(texts), self.dim):
            raise LLMHyperError(
                f"the LM's embeddings have shape {out.shape}, expected {(len(texts), self.dim)}"
            )
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)

    def encode_images(self, image_paths: Sequence[PathLike]) -> np.ndarray:
        raise DataError("the LM encoder reads text only; pass images=False", file=str(image_paths[0]))

    def caption(self, image_path: PathLike, top: int = 3) -> str:
        raise DataError("the LM encoder does not caption images", file=str(image_path))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> LMTextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
