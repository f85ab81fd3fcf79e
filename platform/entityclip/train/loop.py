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
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from entityclip import storage
from entityclip.config import PipelineConfig, from_dict
from entityclip.errors import StorageError
from entityclip.models import build_model
from entityclip.train.checkpoint import load_pretrained, save_checkpoint
from entityclip.train.ingest import MaskNames
from entityclip.train.objective import Objective
from entityclip.train.precision import autocast, grad_scaler
from entityclip.train.tracking import Tracker

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


def train_loop_per_worker(config: dict) -> None:
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
    micro_batches = config["rows"] // world // tc.batch_size
    steps_per_epoch = micro_batches // tc.grad_accum_steps
    total_steps = max(1, tc.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps))
    scaler = grad_scaler(tc.precision, device)

    start_epoch = 0
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            state = load_train_state(Path(d) / TRAIN_STATE, device)
        model.load_state_dict(state["model"])
        for name, part in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            part.load_state_dict(state[name])
        start_epoch = state["epoch"] + 1

    tracker = Tracker(config["tracking_uri"]) if rank == 0 else None
    run_id = config["run_id"]
    shard = ray.train.get_dataset_shard("train")
    # Masking only helps a model that can fall back on the explanation.
    mask_names = MaskNames(tc.name_mask_prob if model.uses_explanations else 0.0, seed=tc.seed + rank)
    timings = {"data_s": 0.0, "compute_s": 0.0, "checkpoint_s": 0.0}
    # Steps already logged by an earlier attempt of this run (a restore re-runs them).
    logged = tracker.last_steps(run_id, "train/") if tracker else {}

    def log(metrics: dict[str, float], at: int) -> None:
        fresh = {k: v for k, v in metrics.items() if at > logged.get(k, -1)}
        if fresh:
            tracker.log_metrics(run_id, fresh, at)

    step = start_epoch * steps_per_epoch
    loop_start = time.perf_counter()
    for epoch in range(start_epoch, tc.epochs):
        if epoch == config.get("kill_at_epoch") and rank == world - 1 and not storage.exists(config["kill_marker"]):
            # Fault injection (trainer.KILL_WORKER_ENV), once per run: the marker outlives this process.
            storage.write_bytes(config["kill_marker"], b"")
            os.kill(os.getpid(), signal.SIGKILL)
        objective.train()
        batches = iter(shard.iter_torch_batches(
            batch_size=tc.batch_size, drop_last=True, device=device, collate_fn=mask_names,
            local_shuffle_buffer_size=tc.shuffle_buffer_rows or None, local_shuffle_seed=tc.seed + epoch))
        epoch_loss = 0.0
        for _ in range(steps_per_epoch):
            for micro in range(tc.grad_accum_steps):
                tick = time.perf_counter()
                batch = next(batches)
                timings["data_s"] += time.perf_counter() - tick
                tick = time.perf_counter()
                last_micro = micro == tc.grad_accum_steps - 1
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                sync = contextlib.nullcontext() if last_micro or world == 1 else objective.no_sync()
                with sync:
                    with autocast(tc.precision, device):
                        losses = objective(batch["image"], batch["text_ids"], batch.get("explanation_ids"),
                                           batch.get("teacher_image"), batch.get("teacher_text"), batch.get("group"))
                    scaler.scale(losses["loss"] / tc.grad_accum_steps).backward()
                timings["compute_s"] += time.perf_counter() - tick
            tick = time.perf_counter()
            if tc.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(objective.parameters(), tc.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            timings["compute_s"] += time.perf_counter() - tick
            step += 1
            epoch_loss += losses["loss"].item()
            if tracker and step % tc.log_every_steps == 0:
                metrics = {f"train/{k}": v.item() for k, v in losses.items()}
                metrics["train/lr"] = scheduler.get_last_lr()[0]
                metrics["train/logit_scale"] = model.logit_scale.item()
                log(metrics, step)
        for _ in batches:  # the partial accumulation left over: read so the shard's epoch ends
            pass
        metrics = {"epoch": epoch, "step": step, "train_loss": epoch_loss / max(1, steps_per_epoch)}
        if tracker:
            log({"train/epoch_loss": metrics["train_loss"]}, step)
            tracker.set_tags(run_id, {"progress": json.dumps({"epoch": epoch + 1, "loss": metrics["train_loss"]})})
        last = epoch == tc.epochs - 1
        if last:
            metrics.update(timings, loop_s=time.perf_counter() - loop_start,
                           **_worker_facts(model, step - start_epoch * steps_per_epoch, device))
        if last or (epoch + 1) % tc.checkpoint_every_epochs == 0:
            tick = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:  # the DDP replicas are identical: one copy is enough
                    save_checkpoint(model, d, {"train_loss": metrics["train_loss"]})
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                "epoch": epoch}, Path(d) / TRAIN_STATE)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
            timings["checkpoint_s"] += time.perf_counter() - tick
        else:
            ray.train.report(metrics)
