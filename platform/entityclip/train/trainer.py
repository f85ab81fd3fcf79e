"""Driver side of training: an MLflow run, a Ray Train TorchTrainer, and the final checkpoint
copied to storage, logged as run artifacts and registered as a model version."""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from entityclip import storage
from entityclip.config import PipelineConfig, flatten, to_dict
from entityclip.errors import TrackingError
from entityclip.models import build_model
from entityclip.train.checkpoint import META, WEIGHTS, init_from, save_checkpoint
from entityclip.train.tracking import Tracker


@dataclass
class TrainResult:
    checkpoint_uri: str
    run_id: str
    model_version: str
    train_loss: float | None
    seconds: float


def _follow(future, tracker: Tracker, run_id: str, epochs: int, label: str, progress: bool) -> None:
    """An epoch progress bar on the driver, read from the run's metrics (the workers log them)."""
    with tqdm(total=epochs, desc=f"train ({label})", unit="epoch", disable=not progress) as bar:
        while not future.done():
            time.sleep(2)
            try:
                history = tracker.metric_history(run_id, "train/epoch_loss")
            except TrackingError:
                continue  # a missed update is not worth failing training over
            if len(history) > bar.n:
                bar.update(len(history) - bar.n)
                bar.set_postfix(loss=f"{history[-1].value:.3f}")


def _fit(cfg: PipelineConfig, tracker: Tracker, run_id: str, paths: dict, ray_dir: Path, run_name: str,
         progress: bool) -> tuple[Path, float]:
    """Run DDP training; returns a local directory holding the final model checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from entityclip.train.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": to_dict(cfg), "run_id": run_id, "tracking_uri": tracker.uri,
                           "samples_uri": paths["samples"], "explanations_uri": paths["explanations"]},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=False),
        run_config=RunConfig(name=run_name, storage_path=str(ray_dir.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(trainer.fit)
        _follow(future, tracker, run_id, cfg.train.epochs, cfg.model.variant, progress)
        result = future.result()
    if result.error:
        raise result.error
    out = Path(tempfile.mkdtemp(prefix="entityclip-final-"))
    with result.checkpoint.as_directory() as d:
        for name in (WEIGHTS, META):
            shutil.copy(Path(d) / name, out / name)
    return out, float(result.metrics.get("train_loss", float("nan")))


def run_training(cfg: PipelineConfig, paths: dict, tracker: Tracker, ray_dir: Path, progress: bool = True) -> TrainResult:
    """Train `cfg.model.variant` (or just package it, for the untrained zero-shot baseline)."""
    start = time.time()
    run_name = f"{cfg.model.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracker.start_run(cfg.tracking.experiment, run_name, flatten(cfg))
    tracker.set_tags(run_id, {"variant": cfg.model.variant, "stage": "train"})
    try:
        model = build_model(cfg.model)
        if model.trainable:
            local, train_loss = _fit(cfg, tracker, run_id, paths, ray_dir, run_name, progress)
        else:
            if cfg.model.init_checkpoint:
                init_from(model, cfg.model.init_checkpoint)
            local, train_loss = save_checkpoint(model, tempfile.mkdtemp(prefix="entityclip-final-")), None
        checkpoint_uri = storage.join(paths["checkpoints"], cfg.model.variant)
        storage.upload_dir(local, checkpoint_uri)
        tracker.log_artifacts(run_id, local, "checkpoint")
        version = tracker.register_model(run_id, "checkpoint", f"{cfg.tracking.registered_model}-{cfg.model.variant}")
        shutil.rmtree(local, ignore_errors=True)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id)  # evaluation metrics can still be logged to a finished run
    return TrainResult(checkpoint_uri, run_id, version, train_loss, time.time() - start)
