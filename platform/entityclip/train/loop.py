"""The per-worker training loop that Ray Train runs on every DDP worker.

Each worker loads the train pairs and reads its shard through a DistributedSampler (open_clip's
approach); rank 0 logs per-step metrics to MLflow. A Ray Train checkpoint every
`checkpoint_every_epochs` epochs lets a failed or interrupted run resume where it stopped.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler

from entityclip.config import PipelineConfig, from_dict
from entityclip.data.pairs import PairDataset, load_pairs
from entityclip.models import build_model
from entityclip.train.checkpoint import init_from, save_checkpoint
from entityclip.train.objective import Objective
from entityclip.train.tracking import Tracker

TRAIN_STATE = "train_state.pt"


def make_collate(model):
    def collate(batch):
        images, texts, explanations = zip(*batch)
        expl_ids = model.tokenize(list(explanations)) if model.uses_explanations else None
        return torch.stack(images), model.tokenize(list(texts)), expl_ids

    return collate


def train_loop_per_worker(config: dict) -> None:
    cfg: PipelineConfig = from_dict(PipelineConfig, config["pipeline"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(1)  # one core per worker: no oversubscription on small machines

    model = build_model(cfg.model)
    if cfg.model.init_checkpoint:
        init_from(model, cfg.model.init_checkpoint)
    objective = ray.train.torch.prepare_model(
        Objective(model, cfg.train), parallel_strategy_kwargs={"find_unused_parameters": True})

    dataset = PairDataset(load_pairs(config["samples_uri"], config["explanations_uri"], ["train"]), model.image_size,
                          # Masking only helps a model that can fall back on the explanation.
                          name_mask_prob=cfg.train.name_mask_prob if model.uses_explanations else 0.0,
                          seed=cfg.train.seed + rank)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=make_collate(model))
    total_steps = max(1, cfg.train.epochs * len(loader))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine to zero
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total_steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / total_steps)))

    start_epoch = 0
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1

    tracker = Tracker(config["tracking_uri"]) if rank == 0 else None
    run_id = config["run_id"]
    step = start_epoch * len(loader)
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        objective.train()
        epoch_loss, batches = 0.0, 0
        for images, ids, expl_ids in loader:
            losses = objective(images, ids, expl_ids)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            step += 1
            batches += 1
            epoch_loss += losses["loss"].item()
            if tracker and step % cfg.train.log_every_steps == 0:
                metrics = {f"train/{k}": v.item() for k, v in losses.items()}
                metrics["train/lr"] = scheduler.get_last_lr()[0]
                metrics["train/logit_scale"] = model.logit_scale.item()
                tracker.log_metrics(run_id, metrics, step)
        metrics = {"epoch": epoch, "step": step, "train_loss": epoch_loss / max(1, batches)}
        if tracker:
            tracker.log_metrics(run_id, {"train/epoch_loss": metrics["train_loss"]}, step)
        last = epoch == cfg.train.epochs - 1
        if last or (epoch + 1) % cfg.train.checkpoint_every_epochs == 0:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:  # the DDP replicas are identical: one copy is enough
                    save_checkpoint(model, d, {"train_loss": metrics["train_loss"]})
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "epoch": epoch}, Path(d) / TRAIN_STATE)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
