"""In-process query latency of each trained variant of a run root, with and without its
re-ranker: what one `Retriever.search_text` call costs, side by side; and, for the first stage,
what one composed query (`Retriever.search_composed`: a test_composed reference image and its
text) costs, its few distinct texts explained once beforehand.

Each configuration answers the same unseen-entity texts once each, so every query is explained
afresh (no cache hits), then the same texts again with explanations cached, which leaves the
model's own cost. p50 / p99 of single calls, one thread.

    .venv/bin/python benchmarks/query_latency.py --root runs/default [--variants entityclip,filip]
        [--queries 55] [--k 10] [--rerankers mack,hosa] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from entityclip import Retriever, storage
from entityclip.config import load_config
from entityclip.errors import ConfigError
from entityclip.paths import RunPaths
from entityclip.rerank import DEFINING, check_runnable
from entityclip.models.checkpoint import load_model


def timed(search, queries: list[tuple]) -> list[float]:
    out = []
    for query in queries:
        start = time.perf_counter()
        search(*query)
        out.append(1000 * (time.perf_counter() - start))
    return out


def percentiles(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"p50_ms": statistics.median(ordered), "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def runnable(variant: str, reranker: str) -> bool:
    try:
        check_runnable(variant, reranker)
        return True
    except ConfigError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/default")
    parser.add_argument("--variants", help="comma-separated (default: every variant with an index)")
    parser.add_argument("--queries", type=int, default=55)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerankers", default="", help="training-free re-rankers to time too, e.g. mack,hosa")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    paths = RunPaths.for_config(load_config(None, [f"storage.root={args.root}"]))
    variants = args.variants.split(",") if args.variants else sorted(storage.list_children(storage.join(paths.root, "index")))
    samples = storage.read_parquet(paths.samples).to_pylist()
    texts = [(s["text"], args.k) for s in samples if s["split"] == "test_unseen"][:args.queries]
    composed = [(storage.read_bytes(s["reference_uri"]), s["text"], args.k)
                for s in samples if s["split"] == "test_composed"][:args.queries]
    rows = []
    for variant in variants:
        reranker = load_model(paths.checkpoint(variant)).reranker
        extra = [r for r in args.rerankers.split(",") if r and runnable(variant, r)]
        for rerank in ["none", *([reranker] if reranker else []), *extra]:
            retriever = Retriever.load(args.root, variant, rerank=rerank)
            retriever.search_text("warm-up query", args.k)
            fresh, cached = timed(retriever.search_text, texts), timed(retriever.search_text, texts)
            name = variant if rerank == "none" else f"{variant} +{rerank}"
            served = rerank == (reranker if reranker in DEFINING else "none")  # what serve.rerank=auto runs
            rows.append({"config": name, "served_by_default": served,
                         "explained": percentiles(fresh), "cached": percentiles(cached)})
            if rerank == "none" and composed:  # composed queries are never re-ranked
                timed(retriever.search_composed, composed)  # explains their texts
                rows[-1]["composed"] = percentiles(timed(retriever.search_composed, composed))
            print(f"{name}: {rows[-1]['explained']['p50_ms']:.1f} ms", flush=True)

    print(f"\nRetriever.search_text, k={args.k}, {len(texts)} unseen-entity texts, in-process, one thread")
    head = (f"{'configuration':<30} {'explained p50':>13} {'p99':>8} | {'cached p50':>10} {'p99':>8} | "
            f"{'composed p50':>12} {'p99':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        e, c = r["explained"], r["cached"]
        m = (f"{r['composed']['p50_ms']:>12.2f} {r['composed']['p99_ms']:>8.2f}" if "composed" in r
             else f"{'-':>12} {'-':>8}")
        print(f"{r['config']:<30} {e['p50_ms']:>13.1f} {e['p99_ms']:>8.1f} | {c['p50_ms']:>10.2f} {c['p99_ms']:>8.2f} | {m}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
