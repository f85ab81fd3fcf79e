"""The per-worker training loop that Ray Train runs on every DDP worker.

Each worker streams its share of the train split from Ray Data (train/ingest.py), steps with
global-batch negatives (train/objective.py), autocast precision, gradient accumulation and
clipping. A Ray Train checkpoint every `checkpoint_every_epochs` epochs lets a failed or
interrupted run resume where it stopped. Rank 0 logs metrics to MLflow and the run's `progress`
tag every epoch; steps re-run after a restore keep the values first logged (MLflow cannot take
a value back), so every metric has one value per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import resource
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from entityclip import storage
from entityclip.config import PipelineConfig, from_dict
from entityclip.errors import StorageError
from entityclip.models import EntityCLIP, build_model
from entityclip.models.checkpoint import load_pretrained, save_checkpoint
from entityclip.models.cora import SceneGraphs
from entityclip.train.ingest import MaskNames
from entityclip.train.objective import Objective
from entityclip.train.precision import autocast, grad_scaler
from entityclip.tracking import Tracker

TRAIN_STATE = "train_state.pt"


def warmup_cosine(total_steps: int):
    """LR multiplier: linear warmup over the first 5% of steps, then cosine to zero."""
    warmup = max(1, total_steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total_steps))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _worker_facts(model: torch.nn.Module, steps: int, device: torch.device) -> dict:
    """Across workers: the largest peak RSS, the nodes they ran on, and the cost of the gradient
    all-reduce (timed on a buffer of the model's size, times the optimizer steps taken)."""
    rss = peak_rss_mb()
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"worker_peak_rss_mb": rss, "worker_nodes": [node], "allreduce_s": 0.0}
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    peak = torch.tensor([rss], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    buffer = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad), device=device)
    dist.all_reduce(buffer)  # warm
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(buffer)
    return {"worker_peak_rss_mb": peak.item(), "worker_nodes": sorted(set(nodes)),
            "allreduce_s": (time.perf_counter() - start) / 5 * steps}


def load_train_state(path: Path, device: torch.device) -> dict:
    """A resume checkpoint's training state. Tensors and plain values only (`weights_only`): a
    pickle that would run code is refused, so whoever can write the run root's storage cannot
    run code in the workers."""
    try:
        return torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError:
        raise StorageError(f"{path.name}: refused to load, it holds objects other than tensors and "
                           "plain values (a pickle that could run code)") from None


@dataclass
class Worker:
    """One DDP worker's training state: the model, its DDP-wrapped objective and optimizer."""
    cfg: PipelineConfig
    rank: int
    world: int
    device: torch.device
    model: EntityCLIP
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int

    def state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch}


def set_up(config: dict) -> Worker:
    cfg: PipelineConfig = from_dict(PipelineConfig, config["pipeline"])
    tc = cfg.train
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(tc.seed)
    # As many threads as reserved cores: no oversubscription when workers share a machine.
    torch.set_num_threads(max(1, int(tc.resources_per_worker.get("CPU", 1))))
    device = ray.train.torch.get_device()
    model = build_model(cfg.model)
    if cfg.model.pretrained and rank == 0:  # wrapping in DDP broadcasts rank 0's weights
        load_pretrained(model, cfg.model.pretrained)
    # Some parameters may never get a gradient (e.g. the ITM head when itm_weight is 0). Every
    # step uses the same ones, so a static graph finds them once instead of searching the graph
    # every step (5% faster here); DDP's no_sync, which accumulation needs, requires the search.
    ddp = {"static_graph": True} if tc.grad_accum_steps == 1 else {"find_unused_parameters": True}
    objective = ray.train.torch.prepare_model(Objective(model, tc, config.get("teacher_scale")),
                                              parallel_strategy_kwargs=ddp)
    steps_per_epoch = config["rows"] // world // tc.batch_size // tc.grad_accum_steps
    optimizer = torch.optim.AdamW(objective.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(1, tc.epochs * steps_per_epoch)))
    return Worker(cfg, rank, world, device, model, objective, optimizer, scheduler,
                  grad_scaler(tc.precision, device), steps_per_epoch)


def resume(worker: Worker) -> int:
    """Restore the run's last Ray Train checkpoint, if any; returns the epoch to start at."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        state = load_train_state(Path(d) / TRAIN_STATE, worker.device)
    worker.model.load_state_dict(state["model"])
    for name in ("optimizer", "scheduler", "scaler"):
        getattr(worker, name).load_state_dict(state[name])
    return state["epoch"] + 1


class MetricLog:
    """Rank 0's MLflow logging. Steps that an earlier attempt of this run already logged keep
    their first values (a restore re-runs them; MLflow cannot take a value back)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracker, self.run_id = Tracker(tracking_uri), run_id
        self.logged = self.tracker.last_steps(run_id, "train/")

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if fresh:
            self.tracker.log_metrics(self.run_id, fresh, step)

    def epoch(self, epoch: int, step: int, loss: float) -> None:
        self.metrics({"train/epoch_loss": loss}, step)
        self.tracker.set_tags(self.run_id, {"progress": json.dumps({"epoch": epoch + 1, "loss": loss})})


def optimizer_step(worker: Worker, batches, timings: dict[str, float]) -> dict[str, torch.Tensor]:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the last one's losses."""
    tc = worker.cfg.train
    for micro in range(tc.grad_accum_steps):
        tick = time.perf_counter()
        batch = next(batches)
        timings["data_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        last_micro = micro == tc.grad_accum_steps - 1
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        sync = contextlib.nullcontext() if last_micro or worker.world == 1 else worker.objective.no_sync()
        with sync:
            with autocast(tc.precision, worker.device):
                losses = worker.objective(batch["image"], batch["text_ids"], batch.get("explanation_ids"),
                                          batch.get("teacher_image"), batch.get("teacher_text"), batch.get("group"),
                                          batch.get("reference"), batch.get("composed"),
                                          SceneGraphs.from_arrays(batch) if "graph_nodes" in batch else None)
            worker.scaler.scale(losses["loss"] / tc.grad_accum_steps).backward()
        timings["compute_s"] += time.perf_counter() - tick
    tick = time.perf_counter()
    if tc.grad_clip_norm:
        worker.scaler.unscale_(worker.optimizer)
        torch.nn.utils.clip_grad_norm_(worker.objective.parameters(), tc.grad_clip_norm)
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.optimizer.zero_grad(set_to_none=True)
    worker.scheduler.step()
    timings["compute_s"] += time.perf_counter() - tick
    return losses


def report(worker: Worker, epoch: int, metrics: dict, with_checkpoint: bool) -> float:
    """Report the epoch to Ray Train, with a checkpoint (model and resume state, written by
    rank 0: the DDP replicas are identical) when asked; returns the seconds it took."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return 0.0
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if worker.rank == 0:
            save_checkpoint(worker.model, d, {"train_loss": metrics["train_loss"]})
            torch.save(worker.state(epoch), Path(d) / TRAIN_STATE)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
    return time.perf_counter() - tick


def fault_hooks(config: dict) -> list:
    """Called at the start of each epoch with (epoch, worker). Fault injection for the resume
    tests (trainer.KILL_WORKER_ENV): SIGKILL the last worker at that epoch, once per run (a
    marker in storage outlives the process)."""
    at, marker = config.get("kill_at_epoch"), config.get("kill_marker")
    if at is None:
        return []

    def kill_once(epoch: int, worker: Worker) -> None:
        if epoch == at and worker.rank == worker.world - 1 and not storage.exists(marker):
            storage.write_bytes(marker, b"")
            os.kill(os.getpid(), signal.SIGKILL)

    return [kill_once]


def train_loop_per_worker(config: dict) -> None:
    entered = time.time()  # wall clock: the driver sets these against its own (train_overhead.py)
    worker = set_up(config)
    tc = worker.cfg.train
    start_epoch = resume(worker)
    log = MetricLog(config["tracking_uri"], config["run_id"]) if worker.rank == 0 else None
    hooks = fault_hooks(config)
    shard = ray.train.get_dataset_shard("train")
    # Masking only helps a model that can fall back on the explanation.
    mask_names = MaskNames(tc.name_mask_prob if worker.model.uses_explanations else 0.0, seed=tc.seed + worker.rank)
    timings = {"data_s": 0.0, "compute_s": 0.0, "checkpoint_s": 0.0}
    step = start_epoch * worker.steps_per_epoch
    loop_start = time.perf_counter()
    epoch_seconds = []  # each epoch's wall time, its report included (the last one's is not known yet)
    for epoch in range(start_epoch, tc.epochs):
        epoch_start = time.perf_counter()
        for hook in hooks:
            hook(epoch, worker)
        worker.objective.train()
        batches = iter(shard.iter_torch_batches(
            batch_size=tc.batch_size, drop_last=True, device=worker.device, collate_fn=mask_names,
            local_shuffle_buffer_size=tc.shuffle_buffer_rows or None, local_shuffle_seed=tc.seed + epoch))
        epoch_loss = 0.0
        for _ in range(worker.steps_per_epoch):
            losses = optimizer_step(worker, batches, timings)
            step += 1
            epoch_loss += losses["loss"].item()
            if log and step % tc.log_every_steps == 0:
                log.metrics({**{f"train/{k}": v.item() for k, v in losses.items()},
                             "train/lr": worker.scheduler.get_last_lr()[0],
                             "train/logit_scale": worker.model.logit_scale.item()}, step)
        for _ in batches:  # the partial accumulation left over: read so the shard's epoch ends
            pass
        metrics = {"epoch": epoch, "step": step, "train_loss": epoch_loss / max(1, worker.steps_per_epoch)}
        if log:
            log.epoch(epoch, step, metrics["train_loss"])
        last = epoch == tc.epochs - 1
        if last:
            metrics.update(timings, loop_s=time.perf_counter() - loop_start, epoch_s=epoch_seconds,
                           train_fn_entered=entered, loop_started=time.time() - (time.perf_counter() - loop_start),
                           **_worker_facts(worker.model, step - start_epoch * worker.steps_per_epoch, worker.device))
        timings["checkpoint_s"] += report(worker, epoch, metrics, last or (epoch + 1) % tc.checkpoint_every_epochs == 0)
        epoch_seconds.append(time.perf_counter() - epoch_start)
