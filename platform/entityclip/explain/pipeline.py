"""The explain stage: Ray Data shards unexplained samples across engine actors.

Resumable and cached: results stream back in chunks that are written to
`explanations.parts/` as they arrive; a rerun skips every key already explained by the same
engine and model (in the parts or in a previous `explanations.parquet`), and the final table is
written atomically only when every sample has an explanation.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from entityclip import storage
from entityclip.config import ExplainConfig
from entityclip.explain.engines import ExplainRequest, engine_model_name, make_engine, vllm_runtime_env
from entityclip.explain.prompts import PROMPT_VERSION, explanation_key

EXPLANATIONS_SCHEMA = pa.schema([
    ("key", pa.string()), ("sample_id", pa.string()), ("explanation", pa.string()),
    ("engine", pa.string()), ("model", pa.string()), ("prompt_version", pa.string()),
])


class ExplainActor:
    """Ray Data callable class: builds its engine once (one LLM per actor), then maps batches."""

    def __init__(self, cfg: dict, entities_uri: str):
        self.engine = make_engine(ExplainConfig(**cfg), entities_uri)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = [ExplainRequest(str(t), tuple(e)) for t, e in zip(batch["text"], batch["entities"])]
        return {"key": batch["key"], "explanation": np.array(self.engine.explain(requests), dtype=object)}


@dataclass
class ExplainStats:
    samples: int
    unique_inputs: int
    cached: int
    generated: int
    output: str


def _load_cache(out_uri: str, parts_uri: str, engine: str, model: str) -> dict[str, str]:
    """key → explanation from earlier complete or partial runs by the same engine and model."""
    cache: dict[str, str] = {}
    sources = ([out_uri] if storage.exists(out_uri) else []) + storage.list_uris(parts_uri)
    for uri in sources:
        for row in storage.read_parquet(uri).to_pylist():
            if row.get("engine") == engine and row.get("model") == model and row.get("prompt_version") == PROMPT_VERSION:
                cache[row["key"]] = row["explanation"]
    return cache


def run_explain(cfg: ExplainConfig, samples_uri: str, entities_uri: str, out_uri: str,
                progress: bool = True) -> ExplainStats:
    samples = storage.read_parquet(samples_uri).to_pylist()
    model = engine_model_name(cfg, entities_uri)
    parts_uri = out_uri.removesuffix(".parquet") + ".parts"
    keys = [explanation_key(s["text"], s["entities"]) for s in samples]
    cache = _load_cache(out_uri, parts_uri, cfg.engine, model)

    todo: dict[str, dict] = {}
    for key, s in zip(keys, samples):
        if key not in cache and key not in todo:
            todo[key] = {"key": key, "text": s["text"], "entities": list(s["entities"])}
    generated = 0
    if todo:
        ds = ray.data.from_items(list(todo.values())).map_batches(
            ExplainActor,
            fn_constructor_kwargs={"cfg": asdict(cfg), "entities_uri": entities_uri},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_gpus=cfg.num_gpus_per_actor or None,
            runtime_env=vllm_runtime_env(cfg) if cfg.engine == "vllm" else None,
        )
        with tqdm(total=len(todo), desc=f"explain ({cfg.engine})", disable=not progress) as bar:
            for chunk in ds.iter_batches(batch_size=cfg.chunk_size, batch_format="numpy"):
                # Parts are keyed by input; sample ids are attached in the final table.
                rows = [{"key": k, "sample_id": "", "explanation": str(e), "engine": cfg.engine,
                         "model": model, "prompt_version": PROMPT_VERSION}
                        for k, e in zip(chunk["key"], chunk["explanation"])]
                storage.write_parquet(storage.join(parts_uri, f"part-{uuid.uuid4().hex[:12]}.parquet"),
                                      pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA))
                cache.update((r["key"], r["explanation"]) for r in rows)
                generated += len(rows)
                bar.update(len(rows))

    missing = [k for k in keys if k not in cache]
    if missing:  # never pass a partial table off as complete
        raise RuntimeError(f"{len(missing)} samples have no explanation after the explain stage")
    final = [{"key": k, "sample_id": s["sample_id"], "explanation": cache[k], "engine": cfg.engine,
              "model": model, "prompt_version": PROMPT_VERSION} for k, s in zip(keys, samples)]
    storage.write_parquet(out_uri, pa.Table.from_pylist(final, schema=EXPLANATIONS_SCHEMA))
    for uri in storage.list_uris(parts_uri):
        storage.delete(uri)
    return ExplainStats(len(samples), len(set(keys)), len(set(keys)) - generated, generated, out_uri)
