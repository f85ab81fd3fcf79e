"""Driver side of training: an MLflow run, a Ray Train TorchTrainer, and the final checkpoint
copied to storage and logged as run artifacts (registry.py registers the run's MLflow Model)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from entityclip import storage
from entityclip.config import PipelineConfig, TrainConfig, flatten, to_dict
from entityclip.data.samples import TRAIN_COMPOSED_SPLIT
from entityclip.errors import ConfigError, TrackingError, TrainingInterrupted, find_user_error
from entityclip.models import build_model
from entityclip.models.entityclip import VariantSpec
from entityclip.paths import RunPaths, model_key
from entityclip.runtime import init_ray
from entityclip.models.checkpoint import META, WEIGHTS, load_pretrained, publish_checkpoint, save_checkpoint
from entityclip.tracking import Tracker


@dataclass(frozen=True)
class TrainingPaths:
    """What a training run reads and where it writes."""
    shards: str  # the training shards (data/shards.py)
    explanations: str
    root: str  # the run root: Ray Train keeps its run (and resume checkpoints) under it
    training: str  # each model's run state (<model key>.json) and fault-injection markers
    checkpoints: str  # the final checkpoint is published under it, as <model key>
    teacher: str | None = None  # the reinforcement teacher's stored embeddings, if any

    @classmethod
    def of(cls, paths: RunPaths, teacher: str | None = None) -> "TrainingPaths":
        return cls(paths.shards, paths.explanations, paths.root, paths.training, paths.checkpoints, teacher)


@dataclass
class TrainResult:
    checkpoint_uri: str
    run_id: str
    train_loss: float | None
    seconds: float
    metrics: dict  # the workers' final report: loss, time in data/compute/checkpoints, peak RSS, nodes


# Fault injection for operators and tests: the last worker SIGKILLs itself when it reaches this
# epoch, once per run (a restored or resumed run goes on).
KILL_WORKER_ENV = "ENTITYCLIP_KILL_WORKER_AT_EPOCH"


def _follow(future, tracker: Tracker, run_id: str, epochs: int, label: str, progress: bool) -> None:
    """An epoch progress bar on the driver, read from the run's `progress` tag (rank 0 sets it
    every epoch). After a restore from a checkpoint it steps back to the restored epoch."""
    with tqdm(total=epochs, desc=f"train ({label})", unit="epoch", disable=not progress) as bar:
        while not wait([future], timeout=2).done:
            try:
                state = json.loads(tracker.tags(run_id).get("progress", "null"))
            except TrackingError:
                continue  # a missed update is not worth failing training over
            if state and state["epoch"] != bar.n:
                bar.n = min(state["epoch"], epochs)
                bar.set_postfix(loss=f"{state['loss']:.3f}")




def check_train_config(cfg: PipelineConfig, rows: int) -> None:
    tc = cfg.train
    # The choices themselves are checked when the config loads (config.py); here, what they
    # need of each other and of the data.
    if tc.precision == "fp16" and not tc.use_gpu:
        raise ConfigError("train.precision=fp16 needs train.use_gpu=true; on CPU use bf16")
    if min(tc.num_workers, tc.batch_size, tc.grad_accum_steps, tc.epochs) < 1:
        raise ConfigError("train.num_workers, batch_size, grad_accum_steps and epochs must be at least 1")
    needed = tc.num_workers * tc.batch_size * tc.grad_accum_steps
    if rows < needed:
        raise ConfigError(f"the train split has {rows} samples, fewer than one optimizer step needs "
                          f"(num_workers x batch_size x grad_accum_steps = {needed})")


def ray_storage(root: str, local_dir: Path) -> tuple[str, object]:
    """Where Ray Train keeps checkpoints: beside the run on S3 (every node reaches it), else the
    local working folder."""
    if storage.is_s3(root):
        fs, path = storage.arrow_fs(storage.join(root, "ray_results"))
        return path, fs
    return str(local_dir.resolve()), None


def worker_group(tc: TrainConfig) -> dict:
    """TorchTrainer's scaling and torch settings for `tc`: the DDP workers, their resources and
    placement, and the process group's backend."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    return {"scaling_config": ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                            resources_per_worker=dict(tc.resources_per_worker),
                                            placement_strategy=tc.placement_strategy),
            "torch_config": TorchConfig(backend="nccl" if tc.use_gpu else "gloo")}


def _fit(cfg: PipelineConfig, tracker: Tracker, run_id: str, training_paths: TrainingPaths, ray_dir: Path, run_name: str,
         spec: VariantSpec, progress: bool, out: Path) -> dict:
    """Run DDP training and copy the final model checkpoint into the folder `out`; returns the
    final metrics (loss, timings, worker facts)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from entityclip.data.shards import split_rows
    from entityclip.train.ingest import training_dataset
    from entityclip.train.loop import train_loop_per_worker
    from entityclip.train.reinforce import teacher_scale

    tc = cfg.train
    rows = split_rows(training_paths.shards, "train")
    check_train_config(cfg, rows)
    if spec.composed:
        rows += split_rows(training_paths.shards, TRAIN_COMPOSED_SPLIT)
    tick = time.perf_counter()
    dataset = training_dataset(training_paths.shards, training_paths.explanations, cfg.model, tc, spec,
                               training_paths.teacher)
    dataset_s = time.perf_counter() - tick
    storage_path, storage_fs = ray_storage(training_paths.root, ray_dir)
    kill_at = os.environ.get(KILL_WORKER_ENV)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": to_dict(cfg), "run_id": run_id, "tracking_uri": tracker.uri, "rows": rows,
                           "kill_at_epoch": int(kill_at) if kill_at else None,
                           "teacher_scale": teacher_scale(training_paths.teacher) if training_paths.teacher else None,
                           "kill_marker": storage.join(training_paths.training, f"{run_name}.worker-killed")},
        **worker_group(tc),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    tick, fit_started = time.perf_counter(), time.time()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(trainer.fit)
        _follow(future, tracker, run_id, tc.epochs, cfg.model.variant, progress)
        try:
            result = future.result()
            if result.error:
                raise result.error
        except TrainingFailedError as exc:
            if find_user_error(exc):  # bad data or config inside a worker: resuming cannot help
                raise
            raise TrainingInterrupted(f"training run {run_name} failed ({str(exc).strip().splitlines()[0][:200]}); "
                                      "`entityclip train --resume` continues it from its last checkpoint") from None
    fit_s = time.perf_counter() - tick
    with result.checkpoint.as_directory() as d:
        for name in (WEIGHTS, META):
            shutil.copy(Path(d) / name, out / name)
    # Where a run's fixed seconds go: building (and caching) the data, and Ray Train's fit
    # around the workers' loop (controller, worker processes, their imports, the final report).
    return {**result.metrics, "dataset_s": dataset_s, "fit_s": fit_s, "fit_started": fit_started}


def _begin(cfg: PipelineConfig, tracker: Tracker, state_uri: str, resume: bool) -> tuple[str, str]:
    """(Ray Train run name, MLflow run id): a new run, or the interrupted one to resume."""
    if not resume:
        # Unique even for runs started in the same second (sweep trials): a Ray Train run of the
        # same name would restore the other's checkpoints.
        run_name = f"{model_key(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        run_id = tracker.start_run(cfg.tracking.experiment, run_name, flatten(cfg))
        tracker.set_tags(run_id, {"variant": cfg.model.variant, "stage": "train"})
        storage.write_json(state_uri, {"run_name": run_name, "run_id": run_id, "status": "running"})
        return run_name, run_id
    state = storage.read_json(state_uri) if storage.exists(state_uri) else {"status": "none"}
    if state["status"] != "running":
        raise ConfigError(f"no interrupted training of {cfg.model.variant} to resume ({state_uri}: {state['status']})")
    logged = tracker.params(state["run_id"])
    changed = sorted(k for k, v in flatten(cfg).items()
                     if k.startswith(("model.", "train.", "data.")) and logged.get(k) != str(v)[:6000])
    if changed:
        raise ConfigError(f"resume with the config run {state['run_name']} started with; these differ: {changed[:5]}")
    tracker.reopen_run(state["run_id"])
    return state["run_name"], state["run_id"]


def run_training(cfg: PipelineConfig, training_paths: TrainingPaths, tracker: Tracker, ray_dir: Path, progress: bool = True,
                 resume: bool = False) -> TrainResult:
    """Train `cfg.model.variant` (or just package it, for the untrained zero-shot baseline);
    `resume` continues the variant's interrupted run: same Ray Train run, same MLflow run."""
    start = time.time()
    state_uri = storage.join(training_paths.training, f"{model_key(cfg)}.json")
    run_name, run_id = _begin(cfg, tracker, state_uri, resume)
    try:
        model = build_model(cfg.model)
        with tempfile.TemporaryDirectory(prefix="entityclip-final-") as d:
            local = Path(d)
            if model.trainable:
                init_ray()  # after _begin: a resume that cannot go ahead says so without starting Ray
                final = _fit(cfg, tracker, run_id, training_paths, ray_dir, run_name, model.spec, progress, local)
                train_loss = final.get("train_loss")
                tracker.log_metrics(run_id, {"train/worker_peak_rss_mb": final["worker_peak_rss_mb"]})
                tracker.set_tags(run_id, {"worker_nodes": ",".join(final["worker_nodes"])})
            else:
                if cfg.model.pretrained:
                    load_pretrained(model, cfg.model.pretrained)
                final, train_loss = {}, None
                save_checkpoint(model, local)
            checkpoint_uri = storage.join(training_paths.checkpoints, model_key(cfg))
            publish_checkpoint(local, checkpoint_uri)
            tracker.log_artifacts(run_id, local, "checkpoint")
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id)  # evaluation metrics can still be logged to a finished run
    storage.write_json(state_uri, {"run_name": run_name, "run_id": run_id, "status": "finished"})
    return TrainResult(checkpoint_uri, run_id, train_loss, time.time() - start, final)
