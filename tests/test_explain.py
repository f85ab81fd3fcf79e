"""The explain stage on real Ray Data, with the CPU knowledge engine; the vLLM engine's code
runs against a stand-in `vllm` module (no GPU here)."""

import sys
import types

import pyarrow as pa
import pytest

from entityclip import storage
from entityclip.config import DataConfig, ExplainConfig
from entityclip.data.synthetic import generate
from entityclip.errors import EntityClipError
from entityclip.explain.engines import ExplainRequest, KnowledgeEngine, VLLMEngine
from entityclip.explain.pipeline import EXPLANATIONS_SCHEMA, run_explain
from entityclip.explain.prompts import PROMPT_VERSION, build_prompt, explanation_key


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


def test_vllm_engine_builds_prompts_and_reads_greedy_outputs(monkeypatch):
    calls = {}

    class LLM:
        def __init__(self, model, **kwargs):
            calls["model"] = model

        def generate(self, prompts, params, use_tqdm):
            calls["prompts"], calls["params"] = prompts, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"  answer {i} ")]) for i in range(len(prompts))]

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = VLLMEngine("/models/mistral-7b", max_tokens=64)
    out = engine.explain([ExplainRequest("Velmora Rovers win", ("Velmora Rovers",)), ExplainRequest("x")])
    assert out == ["answer 0", "answer 1"]
    assert calls["model"] == "/models/mistral-7b"
    assert calls["params"] == {"temperature": 0.0, "max_tokens": 64}
    assert calls["prompts"][0] == build_prompt("Velmora Rovers win", ["Velmora Rovers"])


def test_vllm_engine_without_vllm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(EntityClipError, match=r"\[gpu\]"):
        VLLMEngine("/models/x", 32)
