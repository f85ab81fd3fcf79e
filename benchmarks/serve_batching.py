"""Ray Serve encoder batching: throughput and latency of text→image queries over HTTP with
request batching off (max_batch_size=1) and on, side by side in one run, on one run's
checkpoint and index (run command 1 of the README first, or pass --root).

    .venv/bin/python benchmarks/serve_batching.py [--root runs/default] [--requests 200] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from entityclip import storage
from entityclip.config import load_config
from entityclip.pipeline import RunPaths, start_serving


def load(url: str, texts: list[str], n: int, concurrency: int) -> tuple[float, list[float]]:
    def ask(i: int) -> float:
        start = time.perf_counter()
        r = requests.post(f"{url}/search/text", json={"text": texts[i % len(texts)], "k": 10}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(ask, range(min(n, 2 * concurrency))))  # warm-up
        start = time.perf_counter()
        latencies = list(pool.map(ask, range(n)))
    return n / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/default")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args()

    from ray import serve

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        cfg = load_config(None, [f"storage.root={args.root}", f"serve.max_batch_size={batch}",
                                 "serve.min_replicas=1", "serve.max_replicas=1"])
        texts = [s["text"] for s in storage.read_parquet(RunPaths.for_config(cfg).samples).to_pylist()]
        url = start_serving(cfg)
        rps, lat = load(url, texts, args.requests, args.concurrency)
        serve.delete("entityclip")
        q = statistics.quantiles(lat, n=20)
        rows.append((batch, rps, statistics.median(lat) * 1000, q[18] * 1000))
    base = rows[0][1]
    print(f"text→image over HTTP, {args.requests} requests, {args.concurrency} concurrent, 1 encoder replica")
    print(f"{'max_batch_size':>14} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'vs first':>9}")
    for batch, rps, p50, p95 in rows:
        print(f"{batch:>14} {rps:>8.1f} {p50:>8.1f} {p95:>8.1f} {rps / base:>8.2f}x")
    serve.shutdown()


if __name__ == "__main__":
    main()
