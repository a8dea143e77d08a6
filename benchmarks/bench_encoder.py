"""Encoder throughput (texts/s, images/s) and faiss k-NN latency, all on 1 CPU thread.

    nice -n 19 .venv/bin/python benchmarks/bench_encoder.py [--texts 256] [--images 16]

* text: MiniLM-L6 (`minilm-effnet-conse` encoder) over short ad texts ("Title (year). Genres: ...");
* images: EfficientNet-Lite0 forward + ConSE projection over MovieLens posters from
  ../shared/data/ml100k-posters/images (or --posters), when the folder is there; model load times apart;
* k-NN: the project's `AdIndex` (faiss IndexFlatIP) over 700 random unit 384-d vectors, 97 queries,
  k=3 (the MovieLens setting: 97 cold ads against the retired pool): one batched search, and one query
  at a time (median, p99). faiss and torch pinned to 1 thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ROOT, pct, single_thread, update_section

single_thread(1)

import numpy as np

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
WORDS = ["Last", "Night", "River", "Secret", "Return", "City", "Dark", "Summer", "King", "Lost", "Story", "Heart"]


def ad_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        title = " ".join(rng.choice(WORDS, rng.integers(1, 4), replace=False))
        genres = ", ".join(rng.choice(GENRES, rng.integers(1, 4), replace=False))
        out.append(f"{title} ({rng.integers(1930, 1999)}). Genres: {genres}.")
    return out


def knn_rows(n_pool: int, n_queries: int, k: int, dim: int) -> list[dict]:
    import faiss

    from llmhyper.retrieval.index import AdIndex

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(n_pool, dim)).astype(np.float32)
    queries = rng.normal(size=(n_queries, dim)).astype(np.float32)
    t0 = time.perf_counter()
    index = AdIndex.from_vectors([f"r{i}" for i in range(n_pool)], pool, "bench")
    build = time.perf_counter() - t0
    qids = [f"q{i}" for i in range(n_queries)]
    index.search_ids(qids, queries, k)  # warm
    batch = []
    for _ in range(20):
        t0 = time.perf_counter()
        index.search_ids(qids, queries, k)
        batch.append(time.perf_counter() - t0)
    single = []
    for _ in range(10):
        for i in range(n_queries):
            t0 = time.perf_counter()
            index.search_ids([qids[i]], queries[i:i + 1], k)
            single.append(time.perf_counter() - t0)
    raw = faiss.IndexFlatIP(dim)
    raw.add(pool / np.linalg.norm(pool, axis=1, keepdims=True))
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    raw_t = []
    for _ in range(20):
        t0 = time.perf_counter()
        raw.search(qn, k)
        raw_t.append(time.perf_counter() - t0)
    case = f"k-NN {n_queries} queries x {n_pool} vectors x {dim}-d, k={k}"
    return [
        {"case": f"{case}: AdIndex.search_ids, one batch", "items": n_queries,
         "ms per call (median)": 1e3 * pct(batch, 50), "p99 ms per call": 1e3 * pct(batch, 99),
         "ms per item": 1e3 * pct(batch, 50) / n_queries,
         "throughput": f"{n_queries / pct(batch, 50):.0f} queries/s", "note": f"index build {1e3 * build:.1f} ms"},
        {"case": f"{case}: AdIndex.search_ids, one query at a time", "items": len(single),
         "ms per call (median)": 1e3 * pct(single, 50), "p99 ms per call": 1e3 * pct(single, 99),
         "ms per item": 1e3 * pct(single, 50),
         "throughput": f"{1 / pct(single, 50):.0f} queries/s", "note": "per query, incl. Python checks"},
        {"case": f"{case}: bare faiss IndexFlatIP.search, one batch", "items": n_queries,
         "ms per call (median)": 1e3 * pct(raw_t, 50), "p99 ms per call": 1e3 * pct(raw_t, 99),
         "ms per item": 1e3 * pct(raw_t, 50) / n_queries,
         "throughput": f"{n_queries / pct(raw_t, 50):.0f} queries/s", "note": "no id mapping/exclusion"},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--images", type=int, default=16, help="posters to encode (0 = skip images)")
    ap.add_argument("--posters", default=str(ROOT.parent / "shared" / "data" / "ml100k-posters" / "images"))
    ap.add_argument("--pool", type=int, default=700)
    ap.add_argument("--queries", type=int, default=97)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--no-encoders", action="store_true", help="k-NN only")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    if not args.no_encoders:
        import torch

        torch.set_num_threads(1)
        from llmhyper.retrieval.encoders import MiniLMEffNetEncoder

        enc = MiniLMEffNetEncoder()
        t0 = time.perf_counter()
        enc._text_model()
        load_text = time.perf_counter() - t0
        texts = ad_texts(args.texts)
        enc.encode_texts(texts[:16])  # warm
        t0 = time.perf_counter()
        enc.encode_texts(texts)
        dt = time.perf_counter() - t0
        rows.append({"case": "MiniLM-L6 text encoder (batch 64)", "items": len(texts),
                     "ms per call (median)": 1e3 * dt, "p99 ms per call": "", "ms per item": 1e3 * dt / len(texts),
                     "throughput": f"{len(texts) / dt:.1f} texts/s",
                     "note": f"one timed call over all texts; model load {load_text:.1f} s"})
        print(rows[-1])
        posters = sorted(Path(args.posters).glob("*.jpg"), key=lambda p: p.name)[: args.images] \
            if args.images and Path(args.posters).is_dir() else []
        if posters:
            t0 = time.perf_counter()
            enc._image_model()
            enc.class_table()
            load_img = time.perf_counter() - t0
            enc.encode_images(posters[:2])  # warm
            t0 = time.perf_counter()
            enc.encode_images(posters)
            dt = time.perf_counter() - t0
            rows.append({"case": "EfficientNet-Lite0 + ConSE image encoder (batch 16)", "items": len(posters),
                         "ms per call (median)": 1e3 * dt, "p99 ms per call": "",
                         "ms per item": 1e3 * dt / len(posters),
                         "throughput": f"{len(posters) / dt:.2f} images/s",
                         "note": f"one timed call over all images, incl. JPEG decode + resize; model + "
                                 f"class table load {load_img:.1f} s"})
            print(rows[-1])
        else:
            print(f"no posters at {args.posters}: image throughput skipped")
    for r in knn_rows(args.pool, args.queries, args.k, 384):
        rows.append(r)
        print(r)
    if not args.no_write:
        update_section(
            "encoder", "Encoders and k-NN retrieval",
            "Offline-side costs: embedding new ads and finding their nearest retired ads. torch, BLAS and faiss "
            "on 1 thread. Encoder rows time one call over all items after a warm-up call (so no p99).",
            ["items", "ms per call (median)", "p99 ms per call", "ms per item", "throughput", "note"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
