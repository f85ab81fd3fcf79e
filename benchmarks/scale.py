"""How each stage's time and memory grow with data: the pipeline's stages on the synthetic world
at several multiples of the default world (96 entities, 576 samples), one Ray instance for all.

Per stage and size: wall seconds, rows and rows/s (what a row is, per stage, is printed under
the table), the peak RSS of each kind of process (benchmarks/process_memory.py: driver, Ray
Data workers, vLLM engine with its children, Train workers, Serve replicas, Ray's daemons) and
the object store's peak, and the CPU seconds all processes used (Ray's daemons' share apart).
Then, per stage, the exponent b of a least-squares fit
seconds ~ size^b (and of its largest process's MB ~ size^b): 1 is linear, 0 is a fixed cost.
Fixed costs (process start, model load) flatten the fit at small sizes, so the exponent
between the two largest sizes is given too. A log-log PNG shows time and memory against size,
one line per stage.

The model, epochs and world-LM steps stay fixed across sizes (only the data grows); defaults
keep a 1x/4x/16x run to about 15 minutes on 2 cores.

    .venv/bin/python benchmarks/scale.py [--sizes 1,4,16] [--epochs 3] [--lm-steps 300]
        [--queries 256] [--png docs/scale.png] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from process_memory import OBJECT_STORE, SPILLED, SUMMED, ProcessMemory  # noqa: E402

from entityclip import storage  # noqa: E402
from entityclip.config import load_config  # noqa: E402
from entityclip.paths import RunPaths  # noqa: E402

DEFAULT_ENTITIES = 96
# What one row is in each stage's rows/s.
ROWS = {"data": "samples generated and sharded", "lm": "entities it learns (steps fixed)",
        "explain": "samples explained", "train": "training rows x epochs", "index": "samples embedded (image + text)",
        "evaluate": "test queries, each against the whole gallery", "register": "samples in the logged index",
        "serve": "text queries answered over HTTP (after deploy)"}
# The process kind whose memory a stage is about (the one that should stay flat where it streams).
MAIN_KIND = {"data": "Ray Data workers", "lm": "world-LM trainer", "explain": "vLLM engine", "train": "Train workers",
             "index": "Ray Data workers", "evaluate": "driver", "register": "driver", "serve": "Serve replicas"}


@dataclass
class StageRun:
    stage: str
    size: int
    seconds: float
    rows: int
    memory_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process kind

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def config_for(size: int, root: str, args):
    # The size last: it is what this benchmark varies.
    overrides = [f"train.epochs={args.epochs}", f"explain.world_lm_steps={args.lm_steps}", *args.set,
                 f"storage.root={root}", f"data.num_entities={args.base_entities * size}"]
    return load_config(args.config, overrides)


def serve_queries(cfg, n: int, clients: int) -> int:
    """Deploy, answer `n` text queries from `clients` threads, take the app down; returns how
    many answered (ServeClient: the platform's own client, with its retries)."""
    from ray import serve

    from entityclip.serving.app import APP_NAME
    from entityclip.serving.client import ServeClient
    from entityclip.serving.deploy import start_serving

    texts = [r["text"] for r in storage.read_parquet(RunPaths.for_config(cfg).samples).to_pylist()]
    client = ServeClient(start_serving(cfg))
    try:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda i: client.search_text(texts[i % len(texts)], 10), range(n)))
    finally:
        serve.delete(APP_NAME)
    return sum(1 for a in answers if a.get("results"))


def run_size(size: int, args, memory: ProcessMemory) -> list[StageRun]:
    """Every stage of `args.stages` on a fresh run root of `size` times the base world."""
    from entityclip.explain.engines import uses_world_lm
    from entityclip.pipeline import (stage_data, stage_evaluate, stage_explain, stage_index, stage_lm,
                                     stage_register, stage_train)

    runs: list[StageRun] = []
    with tempfile.TemporaryDirectory(prefix=f"scale-{size}x-") as root:
        cfg = config_for(size, root, args)
        paths = RunPaths.for_config(cfg)
        samples = lambda: storage.read_parquet(paths.samples).num_rows  # noqa: E731
        done: dict = {}
        test_rows = lambda: done["data"].get("test_seen_rows", 0) + done["data"].get("test_unseen_rows", 0)  # noqa: E731
        # stage: (what it runs, how many rows it handled)
        stages = {
            "data": (lambda: stage_data(cfg, False), samples),
            "lm": (lambda: stage_lm(cfg, False), lambda: cfg.data.num_entities),
            "explain": (lambda: stage_explain(cfg, False), samples),
            "train": (lambda: stage_train(cfg, False), lambda: done["data"]["train_rows"] * cfg.train.epochs),
            "index": (lambda: stage_index(cfg), samples),
            "evaluate": (lambda: stage_evaluate(cfg, done["train"].run_id), test_rows),
            "register": (lambda: stage_register(cfg, done["train"].run_id), samples),
            "serve": (lambda: serve_queries(cfg, args.queries, args.clients), lambda: done["serve"]),
        }
        for stage in args.stages.split(","):
            if stage == "lm" and not uses_world_lm(cfg.explain):
                continue
            run, rows = stages[stage]
            memory.take()  # peaks from here on belong to this stage
            start = time.perf_counter()
            done[stage] = run()
            seconds = time.perf_counter() - start
            interval = memory.take()
            runs.append(StageRun(stage, size, round(seconds, 2), rows(), interval.memory_mb, interval.cpu_s))
            print(f"  {size}x {stage}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return runs


def exponent(sizes: list[float], values: list[float]) -> float | None:
    """b of the least-squares line log(value) = a + b log(size); None for fewer than two sizes."""
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v > 0]
    if len(points) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def growth(runs: list[StageRun]) -> dict[str, dict]:
    """Per stage: the exponents of time and of the main process kind's memory, fitted over all
    sizes and between the two largest (where fixed costs weigh least)."""
    out = {}
    for stage in dict.fromkeys(r.stage for r in runs):
        mine = [r for r in runs if r.stage == stage]
        kind = MAIN_KIND[stage]
        sizes, seconds, mb = [r.size for r in mine], [r.seconds for r in mine], [r.memory_mb.get(kind, 0) for r in mine]
        out[stage] = {"time_exponent": exponent(sizes, seconds), "time_exponent_largest": exponent(sizes[-2:], seconds[-2:]),
                      "memory_kind": kind, "memory_exponent": exponent(sizes, mb),
                      "memory_exponent_largest": exponent(sizes[-2:], mb[-2:])}
    return out


def plot(runs: list[StageRun], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for stage in dict.fromkeys(r.stage for r in runs):
        mine = [r for r in runs if r.stage == stage]
        sizes = [r.size for r in mine]
        left.plot(sizes, [r.seconds for r in mine], marker="o", label=stage)
        right.plot(sizes, [r.memory_mb.get(MAIN_KIND[stage], float("nan")) for r in mine], marker="o",
                   label=f"{stage}: {MAIN_KIND[stage]}")
    for ax, title, unit in ((left, "wall time per stage", "seconds"), (right, "peak RSS of the stage's main process", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"data size (x the default world: {DEFAULT_ENTITIES} entities, 576 samples)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def print_tables(runs: list[StageRun], rates: dict[str, dict]) -> None:
    kinds = sorted({k for r in runs for k in r.memory_mb if k not in (OBJECT_STORE, SPILLED)})
    header = ["stage", "size", "wall s", "rows", "rows/s", *[f"{k} MB" for k in kinds], "object store MB",
              "CPU s (Ray daemons)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in runs:
        mem = [f"{r.memory_mb[k]:.0f}" if k in r.memory_mb else "-" for k in kinds]
        print(f"| {r.stage} | {r.size}x | {r.seconds:.1f} | {r.rows:,} | {r.rows_per_s:,.1f} | " + " | ".join(mem)
              + f" | {r.memory_mb.get(OBJECT_STORE, 0):.0f} | {sum(r.cpu_s.values()):.0f} ({sum(v for k, v in r.cpu_s.items() if k in SUMMED):.0f}) |")
    print()
    print("| stage | a row is | time exponent: all sizes / two largest | memory exponent: all / two largest (process) |")
    print("|---|---|---:|---|")
    fmt = lambda b: "-" if b is None else f"{b:.2f}"  # noqa: E731
    for stage, g in rates.items():
        print(f"| {stage} | {ROWS[stage]} | {fmt(g['time_exponent'])} / {fmt(g['time_exponent_largest'])} | "
              f"{fmt(g['memory_exponent'])} / {fmt(g['memory_exponent_largest'])} ({g['memory_kind']}) |")


def measure(args) -> list[StageRun]:
    runs: list[StageRun] = []
    with ProcessMemory() as memory:
        for size in (int(s) for s in args.sizes.split(",")):
            runs += run_size(size, args, memory)
    return runs


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16", help="multiples of the base world's entities")
    parser.add_argument("--base-entities", type=int, default=DEFAULT_ENTITIES, help="the 1x world's entities")
    parser.add_argument("--stages", default=",".join(ROWS), help="which stages, in order (each needs the ones before)")
    parser.add_argument("--config", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lm-steps", type=int, default=300, help="world-LM steps (fixed across sizes)")
    parser.add_argument("--queries", type=int, default=256, help="text queries sent to Serve per size")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--png", default="scale.png", help="where the log-log plot goes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    from entityclip.runtime import init_ray

    init_ray()  # a running cluster is the norm; its start is no stage's cost
    runs = measure(args)
    rates = growth(runs)
    print_tables(runs, rates)
    plot(runs, args.png)
    print(f"\nplot: {args.png}")
    if args.json:
        print(json.dumps({"runs": [r.__dict__ for r in runs], "growth": rates}, indent=2))


if __name__ == "__main__":
    main()
