"""The explain stage: Ray Data shards unexplained samples across engine actors: vLLM engines
through Ray Data's LLM processor (`ray.data.llm`), the CPU engines through a map over
`ExplainActor`s.

Resumable and cached: results stream back in chunks that are written to
`explanations.parts/` as they arrive; a rerun skips every key already explained by the same
engine and model (in the parts or in a previous `explanations.parquet`), and the final table is
written atomically only when every sample has an explanation.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from entityclip import storage
from entityclip.config import ExplainConfig
from entityclip.explain.engines import (ExplainRequest, engine_model_name, local_model, make_engine,
                                       sampling_params, vllm_engine_kwargs, vllm_runtime_env)
from entityclip.explain.hygiene import NO_EXPLANATION, clean_explanation
from entityclip.explain.prompts import PROMPT_VERSION, explanation_key, fit_prompt
from entityclip.runtime import quiet, quiet_logs

# Fault injection for the resume test: the stage kills its own process (SIGKILL, nothing
# cleaned up) after writing this many chunks.
CRASH_AFTER_CHUNKS_ENV = "ENTITYCLIP_EXPLAIN_CRASH_AFTER_CHUNKS"

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


@functools.lru_cache(maxsize=2)
def _encoder(model: str):
    """The model's own tokenizer as text -> token ids (loaded once per Ray worker process). It
    remembers its last text: fitting a prompt ends by counting the prompt it returns."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return functools.lru_cache(maxsize=1)(lambda text: tuple(tokenizer(text)["input_ids"]))


def vllm_processor(explain_cfg: ExplainConfig):
    """Ray Data's vLLM processor over rows {key, text, entities} → {key, explanation}: prompts
    fitted to the window (in the platform's environment), generation in vLLM engine actors
    (their own interpreter, placed on a CPU or GPU bundle), then the clean-up rules."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    model = explain_cfg.model
    budget, params, max_chars = explain_cfg.max_model_len - explain_cfg.max_tokens, sampling_params(explain_cfg), explain_cfg.max_explanation_chars
    if explain_cfg.num_gpus_per_actor:
        placement = {"bundle_per_worker": {"GPU": explain_cfg.num_gpus_per_actor, "CPU": 1}}
    else:  # the default bundle asks for a GPU and would never be scheduled here
        placement = {"bundles": [{"CPU": 1}] * explain_cfg.tensor_parallel_size}

    def prepare(row: dict) -> dict:
        encode = _encoder(model)
        prompt, _ = fit_prompt(row["text"], list(row["entities"]), lambda text: len(encode(text)), budget)
        # Token ids, not text: the prompt was tokenized to fit it, and vLLM's front end, which
        # shares the engine actor's CPU, need not do it again.
        return {"key": row["key"], "names": list(row["entities"]), "tokenized_prompt": list(encode(prompt)),
                "sampling_params": params}

    def finish(row: dict) -> dict:
        return {"key": row["key"], "explanation": clean_explanation(row["generated_text"], list(row["names"]), max_chars)}

    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=vllm_engine_kwargs(explain_cfg), batch_size=explain_cfg.batch_size,
        concurrency=explain_cfg.num_actors, runtime_env=vllm_runtime_env(explain_cfg), placement_group_config=placement,
        # Plain completion prompts, tokenized in `prepare`; vLLM detokenizes inside the engine.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False)
    # build_processor calls ray.init again: it says so, and resets Ray's loggers to INFO.
    with quiet("ray._private.worker"):
        processor = build_processor(config, preprocess=prepare, postprocess=finish)
    quiet_logs()
    return processor


def explained(explain_cfg: ExplainConfig, rows: list[dict], entities_uri: str) -> ray.data.Dataset:
    """Rows {key, text, entities} → a dataset of {key, explanation}, streamed by the engine."""
    if explain_cfg.engine != "knowledge":
        local_model(explain_cfg)  # before any actor starts: a bad model is a config error, said once
    ds = ray.data.from_items(rows)
    if explain_cfg.engine == "vllm":
        return vllm_processor(explain_cfg)(ds)
    return ds.map_batches(
        ExplainActor, fn_constructor_kwargs={"cfg": asdict(explain_cfg), "entities_uri": entities_uri},
        batch_size=explain_cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=explain_cfg.num_actors),
        num_gpus=explain_cfg.num_gpus_per_actor or None)


@dataclass
class ExplainStats:
    samples: int
    unique_inputs: int
    cached: int
    generated: int
    output: str
    no_explanation: int = 0  # generations the clean-up rules left empty (explain/hygiene.py)
    seconds: float = 0.0  # from the start of generation to the written table


def _load_cache(out_uri: str, parts_uri: str, engine: str, model: str) -> dict[str, str]:
    """key → explanation from earlier complete or partial runs by the same engine and model."""
    cache: dict[str, str] = {}
    sources = ([out_uri] if storage.exists(out_uri) else []) + storage.list_uris(parts_uri)
    for uri in sources:
        for row in storage.read_parquet(uri).to_pylist():
            if row.get("engine") == engine and row.get("model") == model and row.get("prompt_version") == PROMPT_VERSION:
                cache[row["key"]] = row["explanation"]
    return cache


def run_explain(explain_cfg: ExplainConfig, samples_uri: str, entities_uri: str, out_uri: str,
                progress: bool = True) -> ExplainStats:
    samples = storage.read_parquet(samples_uri).to_pylist()
    model = engine_model_name(explain_cfg, entities_uri)
    parts_uri = out_uri.removesuffix(".parquet") + ".parts"
    keys = [explanation_key(s["text"], s["entities"]) for s in samples]
    cache = _load_cache(out_uri, parts_uri, explain_cfg.engine, model)

    todo: dict[str, dict] = {}
    for key, s in zip(keys, samples):
        if key not in cache and key not in todo:
            todo[key] = {"key": key, "text": s["text"], "entities": list(s["entities"])}
    generated, start, chunks = 0, time.time(), 0
    crash_after = int(os.environ.get(CRASH_AFTER_CHUNKS_ENV, 0))
    if todo:
        ds = explained(explain_cfg, list(todo.values()), entities_uri)
        with tqdm(total=len(todo), desc=f"explain ({explain_cfg.engine})", disable=not progress) as bar:
            for chunk in ds.iter_batches(batch_size=explain_cfg.chunk_size, batch_format="numpy"):
                # Parts are keyed by input; sample ids are attached in the final table.
                rows = [{"key": k, "sample_id": "", "explanation": str(e), "engine": explain_cfg.engine,
                         "model": model, "prompt_version": PROMPT_VERSION}
                        for k, e in zip(chunk["key"], chunk["explanation"])]
                storage.write_parquet(storage.join(parts_uri, f"part-{uuid.uuid4().hex[:12]}.parquet"),
                                      pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA))
                cache.update((r["key"], r["explanation"]) for r in rows)
                generated += len(rows)
                bar.update(len(rows))
                chunks += 1
                if chunks == crash_after:
                    os.kill(os.getpid(), signal.SIGKILL)

    missing = [k for k in keys if k not in cache]
    if missing:  # never pass a partial table off as complete
        raise RuntimeError(f"{len(missing)} samples have no explanation after the explain stage")
    final = [{"key": k, "sample_id": s["sample_id"], "explanation": cache[k], "engine": explain_cfg.engine,
              "model": model, "prompt_version": PROMPT_VERSION} for k, s in zip(keys, samples)]
    storage.write_parquet(out_uri, pa.Table.from_pylist(final, schema=EXPLANATIONS_SCHEMA))
    for uri in storage.list_uris(parts_uri):
        storage.delete(uri)
    return ExplainStats(len(samples), len(set(keys)), len(set(keys)) - generated, generated, out_uri,
                        no_explanation=sum(cache[k] == NO_EXPLANATION for k in set(keys)),
                        seconds=round(time.time() - start, 2))
