"""Online retrieval under load: the Ray Serve app against a bare uvicorn process around the same
`Retriever` (benchmarks/bare_server.py, the server a user would write by hand), side by side.

Closed-loop `POST /search/text` load at each concurrency level, N requests per level, the two
servers alternating (which goes first flips per level). Prints req/s, p50, p99 and non-2xx for
both, the Serve/bare throughput ratio and the most Serve replicas seen running.

    .venv/bin/python benchmarks/serve_load.py [--root runs/default] [--concurrency 1,16,64]
        [--requests 400] [--set serve.max_batch_size=1 ...] [--json rows.json]

The bare server serves the same `model.variant` with the same `serve.rerank` (e.g. `--set
model.variant=filip` or `--set serve.rerank=itm` to measure what re-ranking costs).

Without an index under --root it first runs the pipeline (README command 1, without serving).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import requests

from entityclip import publish, storage
from entityclip.config import load_config
from entityclip.paths import RunPaths
from entityclip.pipeline import run_pipeline
from entityclip.serving.deploy import start_serving
from entityclip.runtime import free_port

HERE = Path(__file__).resolve().parent


async def closed_loop(url: str, texts: list[str], n: int, concurrency: int) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last one answered."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    counter = iter(range(n))
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/search/text", json={"text": texts[i % len(texts)], "k": 10}) as r:
                    await r.read()
                    status = str(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            if status == "200":
                latencies.append(time.perf_counter() - start)
            else:
                failures[status] = failures.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {"req_s": n / elapsed, "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "non_2xx": sum(failures.values()), "failures": failures}


class ReplicaWatch:
    """Polls Serve for the number of RUNNING retrieval replicas; remembers the most seen."""

    def __init__(self, app: str, period_s: float = 0.5):
        self.app, self.period_s, self.max_seen, self._stop = app, period_s, 0, threading.Event()

    def running(self) -> int:
        from ray import serve

        # The retrieval replicas only: an Explainer deployment (LLM engines) does not autoscale with them.
        deployment = serve.status().applications[self.app].deployments["RetrievalServer"]
        return deployment.replica_states.get("RUNNING", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_seen = max(self.max_seen, self.running())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "ReplicaWatch":
        self.max_seen = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_bare(root: str, port: int, variant: str, rerank: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HERE / "bare_server.py"), "--root", root, "--port", str(port),
                             "--variant", variant, "--rerank", rerank])
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the bare server exited")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the bare server did not come up in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/default")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=400, help="requests per level and server")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override for the Serve app, e.g. serve.autoscaling.max_replicas=2")
    parser.add_argument("--no-bare", action="store_true", help="load Serve alone (no bare-server peer)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    cfg = load_config(None, [f"storage.root={args.root}", f"serve.port={free_port()}", *args.overrides])
    paths = RunPaths.for_config(cfg)
    if not storage.exists(storage.join(publish.current(paths.index(cfg.model.variant)), "texts.faiss")):
        print(f"no index under {paths.root}: running the pipeline first", flush=True)
        run_pipeline(cfg, [cfg.model.variant], serve_query=False)
    texts = [s["text"] for s in storage.read_parquet(paths.samples).to_pylist()]
    serve_url = start_serving(cfg)
    from ray import serve  # after start_serving: Serve reads its settings from the environment on import

    urls, bare = {"serve": serve_url}, None
    if not args.no_bare:
        bare_port = free_port()
        bare = start_bare(paths.root, bare_port, cfg.model.variant, cfg.serve.rerank)
        urls["bare"] = f"http://127.0.0.1:{bare_port}"
    watch = ReplicaWatch("entityclip")
    rows = []
    try:
        for url in urls.values():  # warm-up: caches, lazy imports, connections
            asyncio.run(closed_loop(url, texts, 100, 8))
        for level, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
            row = {"concurrency": concurrency, "requests": args.requests}
            for name in sorted(urls, reverse=level % 2 == 0):  # serve first on even levels
                with watch:
                    result = asyncio.run(closed_loop(urls[name], texts, args.requests, concurrency))
                row[name] = result
                if name == "serve":
                    row["max_replicas_seen"] = watch.max_seen
            row["serve_vs_bare"] = row["serve"]["req_s"] / row["bare"]["req_s"] if bare else float("nan")
            rows.append(row)
            print(f"concurrency {concurrency}: " + ", ".join(f"{n} {row[n]['req_s']:.1f} req/s" for n in urls), flush=True)
    finally:
        if bare:
            bare.terminate()
        serve.shutdown()

    print(f"\nPOST /search/text, {args.requests} requests per level, closed loop; "
          f"{os.cpu_count()} cores; overrides: {args.overrides or 'none'}")
    head = (f"{'conc':>5} | {'serve req/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} | "
            f"{'bare req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} | {'serve/bare':>10} {'replicas':>8}")
    print(head)
    print("-" * len(head))
    nothing = {"req_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"), "non_2xx": "-"}
    for r in rows:
        s, b = r["serve"], r.get("bare", nothing)
        print(f"{r['concurrency']:>5} | {s['req_s']:>11.1f} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['non_2xx']:>7} | "
              f"{b['req_s']:>10.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f} {b['non_2xx']:>7} | "
              f"{r['serve_vs_bare']:>9.2f}x {r['max_replicas_seen']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
