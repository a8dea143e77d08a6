"""data -> warm models -> embeddings -> retrieval: everything the program and the baselines share.

`prepare` trains the warm per-ad models, embeds the ads (cached on disk by content hash), builds the faiss
index over the retired ads that have a trained model, retrieves each cold ad's neighbours and computes
alpha (the neighbours' mean predicted CTR over sampled train users) for calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmhyper.ctr.normalize import calibration_users, neighbour_alpha
from llmhyper.ctr.warm import train_warm
from llmhyper.data.contract import CTRData
from llmhyper.paths import cache_dir
from llmhyper.retrieval.encoders import embed_ads, get_encoder
from llmhyper.retrieval.index import AdIndex, Neighbour
from llmhyper.weights import WeightTable

DEFAULT_ENCODER = "minilm-effnet-conse"


@dataclass
class Prepared:
    data: CTRData
    retired: WeightTable  # warm models of retired ads: the few-shot pool
    lr_warm: WeightTable  # the cold ads' own models on train users: the upper bound
    index: AdIndex
    vectors: dict[str, np.ndarray]  # ad id -> embedding (pool and cold ads)
    neighbours: dict[str, list[Neighbour]]  # cold ad -> its k nearest retired ads
    X_cal: np.ndarray  # features of the sampled train users used for calibration
    alphas: dict[str, float]
    encoder_name: str
    k: int

    def alpha_for(self, neighbours: list[Neighbour]) -> float:
        idx = self.retired.index_of([n.ad_id for n in neighbours])
        return neighbour_alpha(self.retired.theta[idx], self.retired.intercept[idx], self.X_cal)

    def neighbours_of(self, ad_ids: list[str], k: int | None = None) -> dict[str, list[Neighbour]]:
        """Neighbours for any ads with vectors; an ad in the pool never retrieves itself."""
        vecs = np.stack([self.vectors[a] for a in ad_ids])
        found = self.index.search_ids(ad_ids, vecs, k or self.k)
        return dict(zip(ad_ids, found, strict=True))


def ad_texts(data: CTRData, ad_ids: list[str], hide_titles: bool = False) -> list[str]:
    out = []
    for a in ad_ids:
        ad = data.ad_by_id[a]
        out.append(ad.text if hide_titles else f"{ad.title}. {ad.text}")
    return out


def embed(
    data: CTRData, ad_ids: list[str], encoder, *, images: bool = True, hide_titles: bool = False
) -> np.ndarray:
    paths = [data.ad_by_id[a].image if images else None for a in ad_ids]
    return embed_ads(encoder, ad_ids, ad_texts(data, ad_ids, hide_titles), paths, cache_dir() / "embeddings")


def prepare(
    data: CTRData, *, encoder=None, k: int = 3, n_cal: int = 500, seed: int = 0, progress: bool = True
) -> Prepared:
    encoder = encoder or get_encoder(DEFAULT_ENCODER)
    retired = train_warm(data, data.warm_ads, method="retired", progress=progress)
    lr_warm = train_warm(data, data.cold_ads, method="lr_warm", progress=progress, min_pos=1, min_neg=1)
    ids = retired.ad_ids + [a for a in data.cold_ads if a not in set(retired.ad_ids)]
    V = embed(data, ids, encoder)
    vectors = dict(zip(ids, V, strict=True))
    index = AdIndex.from_vectors(
        retired.ad_ids, np.stack([vectors[a] for a in retired.ad_ids]), encoder_name=encoder.name
    )
    X_cal = data.X[data.train_users[calibration_users(len(data.train_users), n_cal, seed)]]
    prep = Prepared(data, retired, lr_warm, index, vectors, {}, X_cal, {}, encoder.name, k)
    prep.neighbours = prep.neighbours_of(data.cold_ads)
    prep.alphas = {a: prep.alpha_for(nb) for a, nb in prep.neighbours.items()}
    return prep
