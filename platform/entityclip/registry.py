"""The MLflow registry side of a matcher: each training run's model logged as an MLflow Model
(pyfunc flavour) and registered, one registered model per variant; model URIs resolved to
pinned versions; a version loaded back as a `Retriever` (what Serve deploys).

The MLflow Model of a run (run artifact path `model/`) holds, beside MLmodel:
  artifacts/checkpoint/        model.safetensors + model.json (model config, tokenizer)
  artifacts/index/             the gallery index (FAISS + tables), when it was built
  artifacts/entities.parquet   the knowledge engine's world, when that engine explains
  artifacts/lm/                the synthetic world's LM, when it explains (explain.model=world)
  artifacts/config.json        the run's full pipeline config (explanation engine, limits)

    model = mlflow.pyfunc.load_model("models:/entityclip-entityclip@champion")
    model.predict(pd.DataFrame({"text": ["Velmora Rovers lift the cup"]}))   # [1, D] float32
    model.predict(pd.DataFrame({"image_base64": [b64]}))                    # [1, D] float32

A model explained by the synthetic world's LM carries it (artifacts/lm/, 3 MB) and explains
text rows with transformers on it; one explained by another LLM (explain.engine vllm or hf with
a model folder of its own) does not carry it: `predict` then needs each text row's
`explanation` (Serve gets it from its Explainer deployment).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from entityclip import __version__, storage
from entityclip.config import PipelineConfig, ServeConfig, from_dict, to_dict
from entityclip.errors import ConfigError, InputError
from entityclip.explain.engines import uses_world_lm
from entityclip.paths import RunPaths
from entityclip.retrieval import Retriever, decode_base64
from entityclip.models.checkpoint import read_meta
from entityclip.tracking import Tracker

MODEL_PATH = "model"  # the run artifact path of the MLflow Model
INPUT_COLUMNS = ("text", "explanation", "image_base64")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


def registered_name(cfg: PipelineConfig) -> str:
    """One registered model per variant: its versions are that variant's history."""
    return f"{cfg.tracking.registered_model}-{cfg.model.variant}"


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, pinned (an alias may move; this does not)."""
    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve(tracker: Tracker, uri: str) -> ModelRef:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` → the version it names now."""
    match = MODEL_URI.match(uri or "")
    if match is None:
        raise ConfigError(f"model {uri!r} is not a registry URI: use models:/NAME/VERSION or models:/NAME@ALIAS")
    version, run_id = tracker.model_version(match["name"], match["version"], match["alias"])
    return ModelRef(match["name"], version, run_id)


class MatcherModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour: `predict` embeds each row's text (with its `explanation`, or one the
    packaged engine writes) or its `image_base64` image. `model_config` may set `explain`
    (False: no engine, callers pass explanations), `serve` (limits) and `info` (who answers)."""

    def load_context(self, context) -> None:
        artifacts, options = context.artifacts, context.model_config or {}
        cfg = from_dict(PipelineConfig, json.loads(Path(artifacts["config"]).read_text()))
        if options.get("serve"):
            cfg = replace(cfg, serve=from_dict(ServeConfig, options["serve"]))
        info = {"variant": cfg.model.variant, **options.get("info", {})}
        if "lm" in artifacts:
            cfg = replace(cfg, explain=replace(cfg.explain, model=artifacts["lm"]))
        explain = options.get("explain", True) and (cfg.explain.engine == "knowledge" or "lm" in artifacts)
        self.retriever = Retriever.from_parts(cfg, artifacts["checkpoint"], artifacts.get("index"),
                                              artifacts.get("entities", ""), info, explain)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        r = self.retriever
        if not set(model_input.columns) & set(INPUT_COLUMNS):
            # MLflow's signature check has already dropped columns it does not know.
            raise InputError(f"the input has none of the columns {list(INPUT_COLUMNS)}")
        rows = model_input.reindex(columns=list(INPUT_COLUMNS)).astype(object)
        rows = rows.where(rows.notna(), None)  # NaN and absent columns alike
        has_text, has_image = rows["text"].notna().to_numpy(), rows["image_base64"].notna().to_numpy()
        if (has_text == has_image).any():
            raise InputError("each row needs exactly one of text or image_base64")
        out = np.zeros((len(rows), r.model.model_cfg.embed_dim), dtype=np.float32)
        if has_text.any():
            texts = [r.check_text(t) for t in rows["text"][has_text]]
            explanations = [r.check_explanation(e) for e in rows["explanation"][has_text]]
            out[has_text] = r.embed_texts(texts, explanations)[0]
        if has_image.any():
            out[has_image] = r.embed_images([decode_base64(b, r.limits.max_image_bytes)
                                             for b in rows["image_base64"][has_image]])
        return out


def _signature(dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", name, required=False) for name in INPUT_COLUMNS])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def save_package(cfg: PipelineConfig, checkpoint: str, index: str | None, entities: str, out_dir: Path) -> Path:
    """Write the run's MLflow Model to `out_dir` (a new folder)."""
    with tempfile.TemporaryDirectory(prefix="entityclip-package-") as staging:
        parts = {"checkpoint": storage.download_dir(checkpoint, Path(staging) / "checkpoint")}
        if index:
            parts["index"] = storage.download_dir(index, Path(staging) / "index")
        if cfg.explain.engine == "knowledge" and storage.exists(entities):
            parts["entities"] = Path(staging) / "entities.parquet"
            parts["entities"].write_bytes(storage.read_bytes(entities))
        elif uses_world_lm(cfg.explain):
            parts["lm"] = storage.download_dir(RunPaths.for_config(cfg).world_lm, Path(staging) / "lm")
        parts["config"] = Path(staging) / "config.json"
        parts["config"].write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True))
        mlflow.pyfunc.save_model(
            str(out_dir), python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts={k: str(v) for k, v in parts.items()},
            signature=_signature(read_meta(checkpoint)["model"]["embed_dim"]),
            input_example=pd.DataFrame({"text": ["Velmora Rovers lift the cup"]}),
            # Declared, not inferred: inference would load the model in a subprocess.
            pip_requirements=[f"entityclip-platform=={__version__}"],
            # The options a loader may set (MLflow only passes on keys declared here).
            model_config={"explain": True, "serve": {}, "info": {}})
    return out_dir


def register_run(tracker: Tracker, run_id: str, cfg: PipelineConfig, checkpoint: str, index: str | None,
                 entities: str) -> ModelRef:
    """Log the run's MLflow Model under `model/` and register it as a new version."""
    with tempfile.TemporaryDirectory(prefix="entityclip-model-") as d:
        package = save_package(cfg, checkpoint, index, entities, Path(d) / MODEL_PATH)
        tracker.log_artifacts(run_id, package, MODEL_PATH)
    name = registered_name(cfg)
    return ModelRef(name, tracker.register_model(run_id, MODEL_PATH, name), run_id)


def load_retriever(tracker: Tracker, ref: ModelRef, serve: ServeConfig, explain: bool = True) -> Retriever:
    """Download a pinned version and load it through its pyfunc flavour, as any MLflow user
    would; its answers name the registered model and version."""
    # The whole download folder goes on return: everything is read into memory on load.
    with tempfile.TemporaryDirectory(prefix="entityclip-registry-") as d:
        local = tracker.download_version(ref.name, ref.version, d)
        model = mlflow.pyfunc.load_model(local, model_config={
            "explain": explain, "serve": to_dict(serve), "info": {"name": ref.name, "version": ref.version}})
        return model.unwrap_python_model().retriever
