"""Vector search at gallery scale: FAISS flat / IVF / HNSW (vector_index.py, what the platform
serves with) against numpy brute force (what a user would write by hand), side by side.

Random unit vectors (default 512-d, like ViT-B-32 embeddings), one query at a time as online
retrieval sends them. Prints build seconds, per-query latency (p50 / p99 ms), speed-up over
numpy, and recall@10 against the exact top 10.

    .venv/bin/python benchmarks/index_search.py [--sizes 100000,1000000] [--dim 512]
        [--queries 200] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from entityclip import vector_index
from entityclip.config import IndexConfig

K = 10


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 512 float64 would need 4 GB at once
        x = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start:start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_search(gallery: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = gallery @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def timed(search, queries: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    ids, seconds = [], []
    for q in queries:
        start = time.perf_counter()
        ids.append(search(q))
        seconds.append(time.perf_counter() - start)
    return ids, 1000 * np.array(seconds)


def recall(found: list[np.ndarray], exact: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / K for f, e in zip(found, exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        gallery = unit_vectors(n, args.dim, rng)
        # Queries near gallery items, as real queries are near their matches.
        picks = gallery[rng.choice(n, args.queries, replace=False)]
        queries = picks + 0.5 * unit_vectors(args.queries, args.dim, rng)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact, numpy_ms = timed(lambda q: numpy_search(gallery, q, K), queries)
        rows.append({"n": n, "method": "numpy brute force", "build_s": 0.0, "p50_ms": float(np.median(numpy_ms)),
                     "p99_ms": float(np.percentile(numpy_ms, 99)), "recall_at_10": 1.0})
        for kind in args.kinds.split(","):
            cfg = IndexConfig(kind=kind)
            start = time.perf_counter()
            index = vector_index.build_faiss(gallery, cfg)
            build_s = time.perf_counter() - start
            found, ms = timed(lambda q, index=index: vector_index.search(index, q, K)[1][0], queries)
            params = {"flat": "", "ivf": f" nlist={cfg.ivf_nlist} nprobe={cfg.ivf_nprobe}",
                      "hnsw": f" M={cfg.hnsw_m} efSearch={cfg.hnsw_ef_search}"}[kind]
            rows.append({"n": n, "method": f"faiss {kind}{params}", "build_s": build_s,
                         "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                         "recall_at_10": recall(found, exact)})
            print(f"n={n:,} {kind}: built in {build_s:.1f} s", flush=True)
            del index

    print(f"\n{args.queries} single queries, top {K}, {args.dim}-d unit vectors")
    head = f"{'gallery':>9} | {'method':<34} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs numpy':>9} {'recall@10':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = next(b for b in rows if b["n"] == r["n"] and b["method"] == "numpy brute force")
        print(f"{r['n']:>9,} | {r['method']:<34} {r['build_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{base['p50_ms'] / r['p50_ms']:>8.1f}x {r['recall_at_10']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
