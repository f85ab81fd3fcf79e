"""Explanation engines side by side on the same prompts, each through the product's explain stage
(Ray Data, one engine actor, the same batch size, greedy, the same max tokens):

- vllm: vLLM engine actors through `ray.data.llm` (.venv-llm's interpreter), the default
- hf: transformers `generate`, batched, left-padded: what a user writes by hand without vLLM
- knowledge: the CPU engine that reads the synthetic world's records (no LLM)

The prompts are news sentences about the world's entities in the data's own phrasing (one or
two names, an event, a city: `data.synthetic.caption`), as many as `--rows`, all distinct. For
each engine, a short run (`--warmup-rows`) measures start-up (actor, model load, engine start,
one batch), then a full run; throughput is the full run's extra rows over its extra seconds, so
start-up is not counted twice (Ray Data's LLM processor returns rows in bursts, so the time to
the first written chunk would not measure start-up). Tokens are those of the written explanations counted with the
LM's own tokenizer, the same count for every engine. Peak RSS is the engine actor's process
(Ray Data's MapWorker) with the processes it starts (vLLM's engine core), sampled every 0.2 s. Every run writes to a fresh output, so nothing
comes from the explanation cache.

    .venv/bin/python benchmarks/explain_throughput.py [--root runs/default] [--rows 16384] [--json FILE]

The root needs the data stage and the world LM (`entityclip data`, `entityclip lm`); both are
made when missing.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa

from entityclip import storage
from entityclip.config import load_config
from entityclip.data.synthetic import caption
from entityclip.explain.engines import run_explain_config
from entityclip.explain.stage import run_explain
from entityclip.paths import RunPaths
from entityclip.pipeline import stage_data, stage_lm
from entityclip.runtime import init_ray

ENGINES = ("vllm", "hf", "knowledge")


class PeakEngineRSS:
    """Samples /proc for the engine actors' processes (Ray Data map actors, titled
    "ray::MapWorker(...)") with the processes they start (vLLM's engine core runs in a child
    process), and keeps the largest resident set of one actor and its children seen."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak_kb, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        parent, rss, actors = {}, {}, []
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit():
                    continue
                pid = int(proc.name)
                fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
                parent[pid], rss[pid] = int(fields["PPid"]), int(fields.get("VmRSS", "0 kB").split()[0])
                if (proc / "cmdline").read_bytes().startswith(b"ray::MapWorker"):
                    actors.append(pid)
            except (OSError, KeyError, ValueError):  # the process ended between listing and reading
                continue

        def under(pid: int, actor: int) -> bool:
            while pid > 1:
                if pid == actor:
                    return True
                pid = parent.get(pid, 0)
            return False

        for actor in actors:
            self.peak_kb = max(self.peak_kb, sum(kb for pid, kb in rss.items() if under(pid, actor)))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> "PeakEngineRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prompts(entities_uri: str, n: int, out: Path, seed: int) -> str:
    """n distinct samples {sample_id, text, entities} in the data's phrasing, as a samples table."""
    rng, names, rows, seen = random.Random(seed), [r["name"] for r in storage.read_parquet(entities_uri).to_pylist()], [], set()
    while len(rows) < n:
        named = rng.sample(names, 2 if rng.random() < 0.3 else 1)
        text = caption([SimpleNamespace(name=x) for x in named], rng)
        if text not in seen:
            seen.add(text)
            rows.append({"sample_id": f"p{len(rows):06d}", "text": text, "entities": named})
    storage.write_parquet(str(out), pa.Table.from_pylist(rows))
    return str(out)


def timed_run(cfg, samples: str, entities: str, out: Path):
    """(wall seconds, peak engine RSS in MB, the explanations written)."""
    with PeakEngineRSS() as rss:
        start = time.time()
        stats = run_explain(cfg, samples, entities, str(out), progress=False)
        wall = time.time() - start
    return wall, rss.peak_kb / 1024, [r["explanation"] for r in storage.read_parquet(stats.output).to_pylist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="run root with the synthetic data and world LM (default: the config's)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--rows", type=int, default=16384,
                        help="distinct prompts in the full run (fewer: start-up noise outweighs the difference)")
    parser.add_argument("--warmup-rows", type=int, default=8, help="prompts in the start-up run")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    overrides = [f"storage.root={args.root}"] if args.root else []
    cfg = load_config(args.config, overrides + ["explain.engine=vllm", "explain.model=world"])
    paths = RunPaths.for_config(cfg)
    if not storage.exists(paths.samples):
        stage_data(cfg, progress=False)
    stage_lm(cfg)  # kept when already trained on this world
    init_ray()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.world_lm)
    rows = []
    with tempfile.TemporaryDirectory(prefix="explain-bench-") as tmp:
        full = prompts(paths.entities, args.rows, Path(tmp) / "full.parquet", seed=1)
        warm = prompts(paths.entities, args.warmup_rows, Path(tmp) / "warm.parquet", seed=2)
        n_full, n_warm = storage.read_parquet(full).num_rows, storage.read_parquet(warm).num_rows
        for engine in args.engines.split(","):
            ecfg = run_explain_config(replace(cfg, explain=replace(cfg.explain, engine=engine)))
            startup, _, _ = timed_run(ecfg, warm, paths.entities, Path(tmp) / f"{engine}-warm.parquet")
            wall, rss_mb, texts = timed_run(ecfg, full, paths.entities, Path(tmp) / f"{engine}-full.parquet")
            tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
            steady = wall - startup
            if steady <= 0:  # machine noise larger than the extra work: no throughput to report
                raise SystemExit(f"{engine}: the {n_full}-row run took no longer than the {n_warm}-row start-up run "
                                 f"({wall:.1f} s vs {startup:.1f} s); raise --rows")
            rows.append({"engine": engine, "rows": n_full, "startup_s": round(startup, 1), "wall_s": round(wall, 1),
                         "rows_per_s": round((n_full - n_warm) / steady, 1),
                         "tokens_per_s": round(tokens * (n_full - n_warm) / n_full / steady, 0),
                         "peak_rss_mb": round(rss_mb), "texts": texts})
            print(f"{engine}: {rows[-1]['rows_per_s']} rows/s", flush=True)

    by = {r["engine"]: r for r in rows}
    header = ["engine", "rows", "start-up s", "wall s", "rows/s", "tokens/s", "peak RSS MB", "tokens/s vs hf", "same text as vllm"]
    print(f"\n{n_full} distinct prompts, batch {cfg.explain.batch_size}, max {cfg.explain.max_tokens} new tokens, greedy, "
          f"one engine actor; world LM {paths.world_lm}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        vs_hf = f"{r['tokens_per_s'] / by['hf']['tokens_per_s']:.2f}x" if "hf" in by and by["hf"]["tokens_per_s"] else "-"
        same = (f"{sum(a == b for a, b in zip(r['texts'], by['vllm']['texts'])) / len(r['texts']):.1%}"
                if "vllm" in by else "-")
        print(f"| {r['engine']} | {r['rows']} | {r['startup_s']} | {r['wall_s']} | {r['rows_per_s']} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']} | {vs_hf} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "texts"} for r in rows], indent=2))


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
