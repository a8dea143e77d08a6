"""What the program sees of an ad: its view, its retrieved warm neighbours as demonstrations (content,
similarity, click rate, trained weights), image captions; and how raw LLM weights become a finished,
servable record (prior fill for failed features, L2 norm, intercept shift)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from llmhyper.ctr.baselines import knn_prior
from llmhyper.ctr.normalize import normalize_and_calibrate
from llmhyper.ctr.prepare import Prepared
from llmhyper.errors import DataError
from llmhyper.paths import cache_dir
from llmhyper.retrieval.encoders import ad_key
from llmhyper.store import read_json, write_json_atomic

# -- inputs of the program --------------------------------------------------------------------


def captions_for(prep: Prepared, encoder, ad_ids: list[str]) -> dict[str, str]:
    """Zero-shot image tags for ads with an image, cached by image content per encoder."""
    path = cache_dir() / "captions" / f"{encoder.name}.json"
    try:
        cache = read_json(path, "caption cache") if path.exists() else {}
    except DataError:  # a damaged cache is only lost work: caption again
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    need = {a: prep.data.ad_by_id[a].image for a in ad_ids if prep.data.ad_by_id[a].image}
    keys = {a: ad_key("", img) for a, img in need.items()}
    todo = [a for a in need if keys[a] not in cache]
    if todo:
        print(f"llmhyper: captioning {len(todo)} images ...", file=sys.stderr)
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            for a, cap in zip(chunk, encoder.captions([need[a] for a in chunk]), strict=True):
                cache[keys[a]] = cap
            write_json_atomic(path, cache)
    return {a: cache[keys[a]] for a in need}


def ad_view(prep: Prepared, ad_id: str, captions: dict[str, str]) -> dict[str, Any]:
    ad = prep.data.ad_by_id[ad_id]
    return {
        "id": ad.id,
        "title": ad.title,
        "text": ad.text,
        "caption": ad.caption or captions.get(ad_id),
        "image": ad.image,  # for LMs that see images (ProgramConfig.vision)
    }


def demonstrations(prep: Prepared, ad_id: str, captions: dict[str, str]) -> list[dict[str, Any]]:
    """The retrieved warm ads as the LLM sees them: content, similarity, click rate, trained weights."""
    data, pool = prep.data, prep.retired
    out = []
    for nb in prep.neighbours[ad_id]:
        row = pool.index_of([nb.ad_id])[0]
        j = data.ad_index[nb.ad_id]
        shown = data.M[data.train_users, j]
        ctr = float(data.Y[data.train_users, j][shown].mean()) if shown.any() else float("nan")
        out.append(
            {
                **ad_view(prep, nb.ad_id, captions),
                "similarity": float(nb.similarity),
                "ctr": ctr,
                "weights": {
                    f: round(float(w), 2) for f, w in zip(pool.feature_names, pool.theta[row], strict=True)
                },
            }
        )
    return out


def knn_prior_vector(prep: Prepared, ad_id: str) -> np.ndarray:
    return knn_prior(prep.retired, {ad_id: prep.neighbours[ad_id]}, [ad_id]).theta[0]


# -- one ad -----------------------------------------------------------------------------------


def finish_ad(prep: Prepared, ad_id: str, pred, feature_names: list[str]) -> dict[str, Any]:
    """Raw LLM weights -> (prior fill for failed features, recorded) -> L2 norm -> intercept shift."""
    raw = dict(pred.weights)
    filled = {}
    if len(raw) < len(feature_names):
        prior = knn_prior_vector(prep, ad_id)
        for j, f in enumerate(feature_names):
            if f not in raw:
                filled[f] = float(prior[j])
    theta = np.array([raw.get(f, filled.get(f)) for f in feature_names], dtype=np.float64)
    alpha = prep.alphas[ad_id]
    theta_n, delta = normalize_and_calibrate(theta, prep.X_cal, alpha)
    status = "ok" if not filled else ("failed" if not raw else "partial")
    return {
        "status": status,
        "raw_weights": raw,
        "filled_from_knn_prior": filled,
        "normalized_weights": dict(zip(feature_names, theta_n.round(6).tolist(), strict=True)),
        "delta": delta,
        "alpha": alpha,
    }
