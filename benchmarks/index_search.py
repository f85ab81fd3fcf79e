"""Vector search at gallery scale: FAISS flat / IVF / HNSW (vector_index.py, what the platform
serves with) against numpy brute force (what a user would write by hand), side by side.

Two galleries: random unit vectors (`--gallery random`, default 512-d, each query a gallery
item plus noise), the approximate indexes' degenerate case; and `--gallery clustered`, grown
from a trained run's own image embeddings with their same-entity spread (big_gallery.py) and
queried with that run's text embeddings, as online retrieval is. One query at a time. Prints
build seconds, index memory (its serialized size), per-query latency (p50 / p99 ms), speed-up
over numpy and recall@10 against the exact top 10, for each `--nprobe` / `--ef` setting.

    .venv/bin/python benchmarks/index_search.py [--sizes 100000,1000000] [--dim 512]
        [--gallery random|clustered --root runs/scale --config configs/scale.yaml]
        [--queries 200] [--nprobe 16] [--ef 64] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from entityclip import vector_index
from entityclip.config import IndexConfig, load_config

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


def clustered(root: str, config: str | None, sizes: list[int], queries: int, rng: np.random.Generator):
    """For each size: (gallery, queries) from the run's index (big_gallery.py's neighbours)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from big_gallery import clustered_vectors, same_entity_cosine

    from entityclip.index import EmbeddingIndex
    from entityclip.paths import RunPaths, model_key

    cfg = load_config(config, [f"storage.root={root}"])
    index = EmbeddingIndex.load(RunPaths.for_config(cfg).index(model_key(cfg)))
    own, cosine = index.embeddings["images"], same_entity_cosine(index)
    texts = index.embeddings["texts"]
    print(f"clustered gallery from {root}: {len(own):,} images, same-entity cosine {cosine:.3f}", flush=True)
    extra, _ = clustered_vectors(own, max(sizes) - len(own), cosine)
    everything = np.concatenate([own, extra])
    picks = texts[rng.choice(len(texts), min(queries, len(texts)), replace=False)]
    return {n: (everything[:n], picks) for n in sizes}


def random_galleries(sizes: list[int], dim: int, queries: int, rng: np.random.Generator):
    for n in sizes:
        gallery = unit_vectors(n, dim, rng)
        # Queries near gallery items, as real queries are near their matches.
        picks = gallery[rng.choice(n, queries, replace=False)] + 0.5 * unit_vectors(queries, dim, rng)
        yield n, (gallery, picks / np.linalg.norm(picks, axis=1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--gallery", choices=("random", "clustered"), default="random")
    parser.add_argument("--root", help="--gallery clustered: a trained run root with its index")
    parser.add_argument("--config", default=None, help="--gallery clustered: the run's config")
    parser.add_argument("--dim", type=int, default=512, help="--gallery random: dimensions")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--ivf-nlist", type=int, default=IndexConfig.ivf_nlist)
    parser.add_argument("--nprobe", default=str(IndexConfig.ivf_nprobe), help="IVF cells searched, a list")
    parser.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    parser.add_argument("--ef", default=str(IndexConfig.hnsw_ef_search), help="HNSW efSearch, a list")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.gallery == "clustered":
        if not args.root:
            parser.error("--gallery clustered needs --root")
        galleries = clustered(args.root, args.config, sizes, args.queries, rng).items()
    else:
        galleries = random_galleries(sizes, args.dim, args.queries, rng)
    settings = {"flat": [None], "ivf": [int(x) for x in args.nprobe.split(",")], "hnsw": [int(x) for x in args.ef.split(",")]}
    rows = []
    for n, (gallery, queries) in galleries:
        exact, numpy_ms = timed(lambda q: numpy_search(gallery, q, K), queries)
        rows.append({"n": n, "method": "numpy brute force", "build_s": 0.0, "memory_mb": gallery.nbytes / 2**20,
                     "p50_ms": float(np.median(numpy_ms)), "p99_ms": float(np.percentile(numpy_ms, 99)), "recall_at_10": 1.0})
        for kind in args.kinds.split(","):
            cfg = IndexConfig(kind=kind, ivf_nlist=args.ivf_nlist, hnsw_m=args.hnsw_m)
            start = time.perf_counter()
            index = vector_index.build_faiss(gallery, cfg)
            build_s = time.perf_counter() - start
            memory_mb = faiss.serialize_index(index).nbytes / 2**20
            print(f"n={n:,} {kind}: built in {build_s:.1f} s", flush=True)
            for setting in settings[kind]:
                if kind == "ivf":
                    index.nprobe = setting
                    method = f"faiss ivf nlist={index.nlist} nprobe={setting}"
                elif kind == "hnsw":
                    index.hnsw.efSearch = setting
                    method = f"faiss hnsw M={args.hnsw_m} efSearch={setting}"
                else:
                    method = "faiss flat"
                found, ms = timed(lambda q, index=index: vector_index.search(index, q, K)[1][0], queries)
                rows.append({"n": n, "method": method, "build_s": build_s, "memory_mb": memory_mb,
                             "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                             "recall_at_10": recall(found, exact)})
            del index

    what = "text queries against a clustered image gallery" if args.gallery == "clustered" else f"{args.dim}-d random unit vectors"
    print(f"\n{args.queries} single queries, top {K}, {what}")
    print("| gallery | method | build s | memory MB | p50 ms | p99 ms | vs numpy | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["n"] == r["n"] and b["method"] == "numpy brute force")
        print(f"| {r['n']:,} | {r['method']} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {base['p50_ms'] / r['p50_ms']:.1f}x | {r['recall_at_10']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
