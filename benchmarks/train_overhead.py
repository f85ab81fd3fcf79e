"""Ray Train vs a plain single-process torch loop: same model, objective, data, epochs and total
batch, side by side in one run, and where the difference goes.

The Ray Train side is the product's own `entityclip train` path (run_training: MLflow run, Ray
Data streaming the shards, DDP workers, checkpoints, model registration). The peer is what a
user writes by hand: one process (torch's default threads, all cores), a DataLoader over the same
shard rows decoding, masking and tokenizing every epoch with the same function, AdamW with the
same schedule, a torch.save checkpoint as often. Between them, the same hand-written loop as
native torch DDP (no Ray): `train.num_workers` processes, gloo, one core's threads each, which
splits Ray Train's cost into what data parallelism costs on these cores and what Ray adds.
The peer decodes every epoch, as a torch Dataset over image files does; the Ray Train side
caches decoded rows in Ray's object store by default (`train.cache`, compare with
`--set train.cache=encoded`).
A last run, the floor, is Ray Train alone: the same worker group around a train function that
returns at once. No Ray Train run on the machine can start and end in less.

    .venv/bin/python benchmarks/train_overhead.py [--root runs/default] [--epochs 60] [--no-ddp] [--runs plain,ddp,ray,floor] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from process_memory import ProcessMemory  # noqa: E402

from entityclip import storage
from entityclip.config import load_config
from entityclip.data.shards import read_manifest
from entityclip.models import build_model
from entityclip.models.backbone import input_sizes
from entityclip.paths import RunPaths
from entityclip.runtime import free_port
from entityclip.train.ingest import MaskNames, attach_explanations, preprocess
from entityclip.train.loop import warmup_cosine
from entityclip.train.precision import autocast
from entityclip.train.objective import Objective


class ShardRows(Dataset):
    """The train split's rows (encoded image bytes, text, entities, explanation) in memory."""

    def __init__(self, shards: str, explanations: str):
        tables = [storage.read_parquet(storage.join(shards, f)) for f in read_manifest(shards)["splits"]["train"]["files"]]
        self.rows = [r for t in tables for r in attach_explanations(t, explanations).to_pylist()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def torch_loop(rank: int, world: int, cfg, paths: RunPaths, result_file: str | None = None) -> dict:
    """A hand-written loop; with world > 1, one of `world` native DDP processes (gloo, a
    DistributedSampler, cores split evenly), the global batch the same as Ray Train's."""
    tc = cfg.train
    if world > 1:
        # Spawned processes repeat torch's deprecation notice for all_gather on every step.
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model)
    objective = Objective(model, tc)
    trained = DistributedDataParallel(objective, static_graph=True) if world > 1 else objective
    image_size, context_length = input_sizes(cfg.model)
    batch = tc.batch_size * tc.num_workers // world  # the same global batch as Ray Train's workers together

    mask_names = MaskNames(tc.name_mask_prob, seed=tc.seed + rank)

    def collate(rows: list[dict]) -> dict:
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        return mask_names(preprocess(columns, image_size, context_length, tc.name_mask_prob > 0, model.uses_explanations,
                                     groups=tc.positives == "entities"))

    start = time.perf_counter()
    rows = ShardRows(paths.shards, paths.explanations)
    sampler = DistributedSampler(rows, world, rank, seed=tc.seed, drop_last=True) if world > 1 else None
    loader = DataLoader(rows, batch_size=batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        collate_fn=collate)
    steps = tc.epochs * len(loader)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    timings = {"data_s": 0.0, "compute_s": 0.0, "checkpoint_s": 0.0}
    loop_start = time.perf_counter()
    epoch_seconds = []
    with tempfile.TemporaryDirectory() as d:
        for epoch in range(tc.epochs):
            epoch_start = time.perf_counter()
            if sampler is not None:
                sampler.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(len(loader)):
                tick = time.perf_counter()
                b = next(batches)
                timings["data_s"] += time.perf_counter() - tick
                tick = time.perf_counter()
                with autocast(tc.precision, torch.device("cpu")):
                    loss = trained(b["image"], b["text_ids"], b.get("explanation_ids"), groups=b.get("group"))["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                timings["compute_s"] += time.perf_counter() - tick
            if rank == 0 and ((epoch + 1) % tc.checkpoint_every_epochs == 0 or epoch == tc.epochs - 1):
                tick = time.perf_counter()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(d) / "state.pt")
                timings["checkpoint_s"] += time.perf_counter() - tick
            epoch_seconds.append(time.perf_counter() - epoch_start)
    end = time.perf_counter()
    result = {"wall_s": end - start, "loop_s": end - loop_start, "samples": steps * batch * world,
              "final_loss": loss.item(), **timings, "allreduce_s": 0.0, "epoch_s": epoch_seconds}
    if world > 1:
        dist.destroy_process_group()
        if rank == 0:
            Path(result_file).write_text(json.dumps(result))
    return result


def native_ddp(cfg, paths: RunPaths) -> dict:
    """torch's own DDP, no Ray: `num_workers` processes spawned here; wall time includes their
    start (imports, process group) as Ray Train's does."""
    world = cfg.train.num_workers
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as d:
        result_file = f"{d}/rank0.json"
        start = time.perf_counter()
        torch.multiprocessing.spawn(torch_loop, args=(world, cfg, paths, result_file), nprocs=world)
        wall = time.perf_counter() - start
        result = json.loads(Path(result_file).read_text())
    return {**result, "wall_s": wall}


def ray_train(cfg, paths: RunPaths) -> dict:
    from entityclip.runtime import init_ray
    from entityclip.tracking import Tracker
    from entityclip.train.trainer import TrainingPaths, run_training

    init_ray()  # a running cluster is the norm; its start is not training overhead
    with tempfile.TemporaryDirectory() as d:
        tracker = Tracker(f"sqlite:///{d}/mlflow.db")
        # The final checkpoint goes to scratch: the run root's own stays as it was.
        result = run_training(cfg, replace(TrainingPaths.of(paths), checkpoints=f"{d}/checkpoints"), tracker,
                              Path(d) / "ray_results", progress=False)
    m = result.metrics
    steps_per_worker = m["step"]
    return {"wall_s": result.seconds, "loop_s": m["loop_s"], "final_loss": m["train_loss"],
            "samples": steps_per_worker * cfg.train.batch_size * cfg.train.num_workers,
            **{k: m[k] for k in ("data_s", "compute_s", "checkpoint_s", "allreduce_s", "worker_peak_rss_mb", "epoch_s",
                                 "dataset_s", "fit_s", "fit_started", "train_fn_entered", "loop_started")}}


FLOOR = "Ray Train floor (train function returns at once)"


def _enter_and_return(config: dict) -> None:
    """The floor's train function: rank 0 notes when it ran, and every worker returns."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["stamp"]).write_text(repr(time.time()))


def ray_train_floor(cfg) -> dict:
    """Ray Train itself: the product's worker group (workers, resources, placement, process group)
    around a train function that returns at once; no data, model, MLflow or checkpoint. What any
    Ray Train run pays on this machine before and after its own work."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from entityclip.runtime import init_ray
    from entityclip.train.trainer import worker_group

    init_ray()
    with tempfile.TemporaryDirectory() as d:
        trainer = TorchTrainer(_enter_and_return, train_loop_config={"stamp": f"{d}/entered"},
                               run_config=RunConfig(name="floor", storage_path=d), **worker_group(cfg.train))
        start = time.time()
        trainer.fit()
        end = time.time()
        entered = float(Path(f"{d}/entered").read_text())
    return {"wall_s": end - start, "to_train_fn_s": entered - start, "after_s": end - entered}


def steady_epoch(epoch_seconds: list[float]) -> float:
    """The median epoch after the first (which warms caches and, in Ray Train, the data pipeline)."""
    later = epoch_seconds[1:] or epoch_seconds
    return statistics.median(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/default", help="a run root after `entityclip data` and `explain`")
    parser.add_argument("--config", default=None)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--no-ddp", action="store_true", help="leave out the native torch DDP row")
    parser.add_argument("--runs", default="plain,ddp,ray,floor",
                        help="which of plain, ddp, ray to run (the first is the ratio's base), and floor: Ray Train "
                             "around a train function that returns at once")
    parser.add_argument("--ray-caches", default="", help="Ray Train once per train.cache listed (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"storage.root={args.root}", f"train.epochs={args.epochs}", *args.set])
    paths = RunPaths.for_config(cfg)
    wanted = args.runs.split(",")
    if unknown := set(wanted) - {"plain", "ddp", "ray", "floor"}:
        sys.exit(f"--runs: no run called {', '.join(sorted(unknown))}; choose from plain, ddp, ray, floor")
    trains = {"plain", "ddp", "ray"} & set(wanted)  # the floor reads no data
    if trains and not (storage.exists(storage.join(paths.shards, "manifest.json")) and storage.exists(paths.explanations)):
        sys.exit(f"{args.root} has no shards or explanations: run `entityclip data` and `entityclip explain` first")
    runs = {}
    if "plain" in wanted:
        runs["plain torch loop (1 process)"] = lambda: torch_loop(0, 1, cfg, paths)
    if "ddp" in wanted and not args.no_ddp and cfg.train.num_workers > 1:
        runs[f"native torch DDP ({cfg.train.num_workers} processes)"] = lambda: native_ddp(cfg, paths)
    if "ray" in wanted:
        for cache in args.ray_caches.split(",") if args.ray_caches else [cfg.train.cache]:
            ray_cfg = replace(cfg, train=replace(cfg.train, cache=cache))
            runs[f"Ray Train ({cfg.train.num_workers} workers, cache={cache})"] = lambda c=ray_cfg: ray_train(c, paths)
    results, processes, floor = {}, {}, None
    with ProcessMemory() as memory:
        for name, run in runs.items():
            memory.take()
            results[name] = run()
            processes[name] = memory.take()
        if "floor" in wanted:
            memory.take()
            floor = ray_train_floor(cfg)
            processes[FLOOR] = memory.take()
    if results:
        print_table(cfg, args.epochs, results)
    if floor:
        report_floor(floor)
    print("\nWhere the CPU went during each run (CPU seconds by process kind; peak MB without shared memory):")
    for name, interval in processes.items():
        print(f"  {name}: " + ", ".join(f"{kind} {seconds:.1f} s / {interval.memory_mb.get(kind, 0):.0f} MB"
                                          for kind, seconds in sorted(interval.cpu_s.items(), key=lambda x: -x[1]) if seconds >= 0.1))
    if args.json:
        print(json.dumps({name: {**r, "cpu_s": processes[name].cpu_s, "memory_mb": processes[name].memory_mb}
                          for name, r in {**results, **({FLOOR: floor} if floor else {})}.items()}, indent=2))


def print_table(cfg, epochs: int, results: dict) -> None:
    """The runs side by side (the first is the ratios' base), then where each Ray Train run's
    fixed seconds went."""
    base = next(iter(results.values()))["wall_s"]
    print(f"{cfg.model.variant}, {epochs} epochs, global batch {cfg.train.batch_size * cfg.train.num_workers}, "
          f"{cfg.train.precision}, {torch.get_num_threads()} CPU threads available")
    header = ("", "wall s", "ratio", "samples/s", "start-up+end s", "steady epoch s", "epoch vs DDP", "data wait s",
              "compute s", "allreduce s*", "checkpoint s", "final loss")
    ddp = next((r for name, r in results.items() if name.startswith("native")), None)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in results.items():
        r["steady_epoch_s"] = steady_epoch(r["epoch_s"])
        vs_ddp = f"{r['steady_epoch_s'] / steady_epoch(ddp['epoch_s']):.3f}x" if ddp else "-"
        cells = [name, f"{r['wall_s']:.1f}", f"{r['wall_s'] / base:.2f}x", f"{r['samples'] / r['wall_s']:.0f}",
                 f"{r['wall_s'] - r['loop_s']:.1f}", f"{r['steady_epoch_s']:.2f}", vs_ddp, f"{r['data_s']:.1f}",
                 f"{r['compute_s']:.1f}", f"{r['allreduce_s']:.1f}", f"{r['checkpoint_s']:.1f}", f"{r['final_loss']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    print("steady epoch: the median epoch after the first (checkpoint epochs included, as both write them); "
          "start-up+end: wall time outside the epochs.")
    print("* allreduce: a gradient-sized all-reduce timed after training, times the steps; it runs inside "
          "backward (compute s), overlapped.")
    for name, ray_result in results.items():
        if name.startswith("Ray Train"):
            report_fixed(name, ray_result)


def report_floor(r: dict) -> None:
    print(f"{FLOOR}: {r['wall_s']:.1f} s in fit: {r['to_train_fn_s']:.1f} until rank 0's train function ran, "
          f"{r['after_s']:.1f} after it returned. No Ray Train run here can start and end in less.")


def report_fixed(name: str, r: dict) -> None:
    """Where a Ray Train run's seconds outside its epochs went, and its workers' peak RSS."""
    to_fn, fn_to_loop = r["train_fn_entered"] - r["fit_started"], r["loop_started"] - r["train_fn_entered"]
    print(f"{name}: {r['wall_s'] - r['loop_s']:.1f} fixed seconds: {r['dataset_s']:.1f} building the training dataset; "
          f"in fit, {to_fn:.1f} until rank 0's train function ran (controller, placement group, worker processes, "
          f"their imports), {fn_to_loop:.1f} from there to its loop (model, DDP, resume, MLflow), "
          f"{r['fit_s'] - r['loop_s'] - to_fn - fn_to_loop:.1f} after it (last report, shutdown); "
          f"{r['wall_s'] - r['fit_s'] - r['dataset_s']:.1f} around fit (MLflow run, checkpoint publish); "
          f"peak RSS per worker {r['worker_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
