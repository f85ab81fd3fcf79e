"""Where a run keeps its artifacts under the storage root (local folder or s3:// prefix)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from entityclip import storage
from entityclip.config import PipelineConfig, TrainConfig
from entityclip.errors import StorageError


def model_key(cfg: PipelineConfig) -> str:
    """What a trained model's checkpoint, index and evaluation are named by under the root: its
    variant, with `-seed<N>` for a training seed other than the default, so that the seeds of
    one configuration (`--seeds`) sit side by side instead of overwriting each other."""
    seed = cfg.train.seed
    return cfg.model.variant if seed == TrainConfig.seed else f"{cfg.model.variant}-seed{seed}"


@dataclass(frozen=True)
class RunPaths:
    root: str
    local: Path  # this machine's working folder: MLflow's sqlite store, Ray Train results

    @classmethod
    def for_config(cls, cfg: PipelineConfig) -> "RunPaths":
        if storage.is_s3(cfg.storage.root):
            return cls(cfg.storage.root, Path("runs/.local").resolve())
        # Absolute: Ray workers, actors and jobs do not share the caller's working directory.
        local = storage.local_path(cfg.storage.root).resolve()
        return cls(str(local), local)

    @property
    def samples(self) -> str:
        return storage.join(self.root, "data", "samples.parquet")

    @property
    def shards(self) -> str:
        return storage.join(self.root, "data", "shards")

    @property
    def entities(self) -> str:
        return storage.join(self.root, "data", "entities.parquet")

    @property
    def world_lm(self) -> str:
        """The synthetic world's LM (`entityclip lm`): a Hugging Face model folder vLLM serves."""
        return storage.join(self.root, "lm")

    @property
    def explanations(self) -> str:
        return storage.join(self.root, "explanations.parquet")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.root, "checkpoints")

    def checkpoint(self, variant: str) -> str:
        return storage.join(self.checkpoints, variant)

    @property
    def training(self) -> str:
        """`<variant>.json` per variant: its last training run (Ray Train run name, MLflow run
        id, running or finished), what `entityclip train --resume` continues."""
        return storage.join(self.root, "training")

    def index(self, variant: str) -> str:
        return storage.join(self.root, "index", variant)

    def evaluation(self, variant: str) -> str:
        return storage.join(self.root, "eval", f"{variant}.json")

    def query_results(self, variant: str) -> str:
        """Every test query's result of `evaluation(variant)` (evaluate.QueryResults)."""
        return storage.join(self.root, "eval", f"{variant}.queries.parquet")


def require(uri: str, stage: str) -> str:
    """`uri`, or a StorageError naming the stage that writes it."""
    if not storage.exists(uri):
        raise StorageError(f"{uri} does not exist: run `entityclip {stage}` first")
    return uri
