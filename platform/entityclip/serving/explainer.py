"""The Serve deployment of an LLM explanation engine (vLLM) for online queries: batched across
requests, with its own resources and, for vLLM, its own interpreter (`vllm_runtime_env`). This
module imports nothing of the matcher, so it loads in vLLM's environment."""

from __future__ import annotations

from ray import serve

from entityclip.config import PipelineConfig, from_dict
from entityclip.explain.cache import ExplanationCache
from entityclip.explain.engines import make_engine, run_explain_config, vllm_runtime_env
from entityclip.paths import RunPaths


@serve.deployment
class Explainer:
    def __init__(self, config: dict):
        cfg = from_dict(PipelineConfig, config)
        engine = make_engine(run_explain_config(cfg), RunPaths.for_config(cfg).entities)
        self.cache = ExplanationCache(engine, cfg.serve.explain_cache_size)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def explain(self, texts: list[str]) -> list[str]:
        return self.cache.explain(texts)


def explainer_options(cfg: PipelineConfig) -> dict:
    """Ray actor options of the Explainer: a core (a GPU share on a cluster) and, for vLLM, its
    interpreter and CPU settings."""
    options = {"num_cpus": 1, "num_gpus": cfg.explain.num_gpus_per_actor}
    if cfg.explain.engine == "vllm":
        options["runtime_env"] = vllm_runtime_env(cfg.explain)
    return options
