"""Explanation engines: text (+ named entities) in, explanation text out.

- `KnowledgeEngine` (CPU): reads the entity knowledge records and writes the explanation an
  LLM with perfect world knowledge would. It stands in for an LLM offline and in tests.
- `VLLMEngine` (GPU): a real LLM through vLLM (`pip install 'entityclip-platform[gpu]'`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    """Greedy generation with `vllm.LLM`; one instance per Ray Data actor, holding one GPU."""

    name = "vllm"

    def __init__(self, model: str, max_tokens: int):
        if not model:
            raise ConfigError("the vllm engine needs explain.model (a local model directory or S3-synced path)")
        try:
            import vllm
        except ImportError:
            raise EntityClipError(
                "the vllm engine needs the GPU extra: pip install 'entityclip-platform[gpu]' on a CUDA machine"
            ) from None
        self.model = model
        self._llm = vllm.LLM(model=model, enforce_eager=False)
        self._params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def explain(self, requests: list[ExplainRequest]) -> list[str]:
        prompts = [build_prompt(r.text, list(r.entities)) for r in requests]
        return [o.outputs[0].text.strip() for o in self._llm.generate(prompts, self._params, use_tqdm=False)]


def make_engine(cfg: ExplainConfig, entities_uri: str) -> ExplanationEngine:
    if cfg.engine == "knowledge":
        return KnowledgeEngine(entities_uri)
    if cfg.engine == "vllm":
        return VLLMEngine(cfg.model, cfg.max_tokens)
    raise ConfigError(f"unknown explain.engine {cfg.engine!r}; choose knowledge or vllm")


def engine_model_name(cfg: ExplainConfig, entities_uri: str) -> str:
    """What goes in the `model` column: the knowledge base for the CPU engine, the LLM otherwise."""
    return entities_uri if cfg.engine == "knowledge" else cfg.model
